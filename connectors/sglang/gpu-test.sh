#!/usr/bin/env bash
# The GPU test of pegaflow-sglang, in ONE command on the GPU machine (from the repository root):
#   bash connectors/sglang/gpu-test.sh
# Needs a daemon that serves cuda_ipc regions (backends/cuda, installed here when present).
# SGLang is not installed there: the test drives the connector's own code with torch tensors
# shaped like SGLang's pools (see connectors/sglang/tests/test_gpu.py for what it covers).
# The generated gRPC code travels as pegaflow_core/_proto; without it, grpcio-tools and setuptools
# are taken from .wheels/ to generate it there. Results go to $OUT (junit XML + log).
# Environment: OUT (default /tmp/pegaflow-sglang-gpu), PYTHON (default python3),
#              PEGAFLOW_GPU_DAEMON_CONFIG (daemon YAML; default: one 2 GB DRAM tier).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${OUT:-/tmp/pegaflow-sglang-gpu}"
python="${PYTHON:-python3}"
mkdir -p "$out"
cd "$repo"

# Installed into the machine's own Python (the one with CUDA torch), offline and without deps.
pip=("$python" -m pip install --disable-pip-version-check -q --no-deps)
if [[ ! -f pegaflow_core/_proto/pegaflow_pb2.py ]] && ! "$python" -c "import grpc_tools, setuptools" 2>/dev/null; then
  "${pip[@]}" --no-index --find-links "$repo/.wheels" grpcio-tools setuptools
fi
packages=(-e . -e backends/dram -e connectors/sglang)
[[ -d backends/cuda ]] && packages+=(-e backends/cuda)
"${pip[@]}" --no-build-isolation "${packages[@]}"

"$python" - <<'PY' | tee "$out/environment.txt"
import torch, grpc, google.protobuf
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device {torch.cuda.get_device_name(0)}")
print(f"grpcio {grpc.__version__}, protobuf {google.protobuf.__version__}")
PY
set +e
"$python" -m pytest connectors/sglang/tests/test_gpu.py -v -rA -p no:cacheprovider \
  --junitxml="$out/sglang-gpu.xml" 2>&1 | tee "$out/sglang-gpu.log"
rc=${PIPESTATUS[0]}
set -e
echo "gpu-test: pytest exit $rc; results in $out"
exit "$rc"
