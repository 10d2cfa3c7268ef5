#!/usr/bin/env bash
# The GPU data path on a GPU machine, in one command: install (offline: --no-deps, the generated
# gRPC code travels with the tree as pegaflow_core/_proto), run the GPU tests, then
# `pegaflow bench gpu`. Results go to $OUT (default /tmp/pegaflow-gpu).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/pegaflow-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, cuda.bindings; print('torch', torch.__version__, 'cuda-bindings', cuda.bindings.__version__)" | tee -a "$OUT/gpu.txt"
$PY -m pip install -q --no-deps --no-build-isolation -e . -e backends/dram -e backends/cuda >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
pegaflow backends | grep -E "memory|dram" | tee -a "$OUT/gpu.txt"
set +e
$PY -m pytest -q -p no:cacheprovider backends/cuda/tests backends/dram/tests/test_tier.py ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/gpu-tests.txt"
tests=${PIPESTATUS[0]}
set -e
if [[ "${BENCH:-1}" == 1 ]]; then
  pegaflow bench gpu ${BENCH_ARGS:-} --json | tee "$OUT/bench-gpu.json"
fi
exit "$tests"
