#!/usr/bin/env bash
# The GPU worker test of pegaflow-vllm, in one command on the GPU machine (repository root):
#   bash connectors/vllm/gpu-test.sh
# vLLM is not installed there (its wheel pins its own CUDA torch and does not fit the machine's
# carry limit): tests/test_gpu.py drives the connector's worker half, which never imports vLLM,
# with CUDA tensors in vLLM's layouts against a daemon serving cuda_ipc regions (pegaflow-cuda).
# Offline: installs with --no-deps; the generated gRPC code travels as pegaflow_core/_proto.
# Results go to $OUT (default /tmp/pegaflow-vllm-gpu). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/pegaflow-vllm-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
$PY -m pip install -q --no-deps --no-build-isolation -e . -e backends/dram -e backends/cuda -e connectors/vllm \
  >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
$PY -m pytest -v -rA -p no:cacheprovider connectors/vllm/tests/test_gpu.py --junitxml="$OUT/vllm-gpu.xml" \
  2>&1 | tee "$OUT/vllm-gpu.log"
exit "${PIPESTATUS[0]}"
