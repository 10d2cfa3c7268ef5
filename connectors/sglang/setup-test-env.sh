#!/usr/bin/env bash
# Builds the test venv of pegaflow-sglang (default: <repo>/.venv-sglang) with the real SGLang
# package on the CPU torch build. Idempotent: a stamp file records what was installed from which
# inputs, and a second run with the same inputs only re-checks that the SGLang classes the
# connector plugs into import. Fails loudly (set -e, and a final import check). Usage:
#   connectors/sglang/setup-test-env.sh [VENV_DIR]
# Environment: PYTHON (default python3.11), SGLANG_VERSION (default 0.5.23),
#              TORCH_WHEEL (default the CPU wheel under /opt/wheels).
set -euo pipefail

start=$(date +%s)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-$repo/.venv-sglang}"
python="${PYTHON:-python3.11}"
sglang_version="${SGLANG_VERSION:-0.5.23}"
torch_wheel="${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"
stamp="$venv/.pegaflow-sglang-installed"

inputs_digest() {
  cat "$here/requirements-test.txt" "$here/pyproject.toml" "$repo/pyproject.toml" "$repo/setup.py" \
      "$repo/backends/dram/pyproject.toml" "$repo/conformance/pyproject.toml" "$repo/connectors/vllm/pyproject.toml" \
      "$repo/proto/pegaflow/v1/pegaflow.proto" "$here/tests/cpu_shims/torchvision/__init__.py" "$0" 2>/dev/null \
    | sha256sum | cut -d' ' -f1
  echo "$sglang_version $torch_wheel"
}
digest="$(inputs_digest | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$digest" ]]; then
  echo "setup-test-env: $venv is up to date"
else
  if [[ ! -f "$torch_wheel" ]]; then
    # pip's find-links on these machines serves the CPU build under this plain requirement
    echo "setup-test-env: no wheel at $torch_wheel; installing torch==2.13.0 from the package index"
    torch_wheel="torch==2.13.0"
  fi
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
  "${pip[@]}" -q --upgrade pip
  "${pip[@]}" -q "$torch_wheel"
  keep_torch="$(mktemp)"
  trap 'rm -f "$keep_torch"' EXIT
  "$venv/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$keep_torch"
  # SGLang pins a CUDA torch and GPU kernels: install it without dependencies so pip never
  # replaces the CPU build; triton only because sglang.srt.utils imports it at module level.
  "${pip[@]}" -q --no-deps "sglang==$sglang_version" "triton==3.8.0"
  "${pip[@]}" -q -c "$keep_torch" -r "$here/requirements-test.txt"
  # torchvision: SGLang's multimodal modules import it at module level. The CPU wheel when this
  # machine can get one; otherwise the placeholder (raises if anything calls into it).
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  if "${pip[@]}" -q --no-deps --index-url https://download.pytorch.org/whl/cpu "torchvision==0.28.0+cpu" 2>/dev/null \
      && "$venv/bin/python" -c "import torchvision.ops" 2>/dev/null; then
    echo "setup-test-env: torchvision CPU wheel installed"
  else
    "$venv/bin/python" -m pip uninstall -q -y torchvision 2>/dev/null || true
    rm -rf "$site/torchvision"
    cp -r "$here/tests/cpu_shims/torchvision" "$site/torchvision"
    echo "setup-test-env: no CPU torchvision available; installed the placeholder from tests/cpu_shims"
  fi
  "${pip[@]}" -q -c "$keep_torch" -e "$repo" -e "$repo/backends/dram" -e "$repo/conformance" \
      -e "$repo/connectors/vllm" -e "$here"
  echo "$digest" > "$stamp"
fi

"$venv/bin/python" -W ignore - <<'PY'
import importlib.metadata as md
import torch
import pegaflow_core, pegaflow_sglang  # noqa: F401
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage  # noqa: F401
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: F401
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: F401
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost  # noqa: F401
from sglang.srt.mem_cache.registry import register_radix_cache_backend  # noqa: F401
assert not torch.version.cuda, f"a CUDA torch build ({torch.__version__}) replaced the CPU one"
print(f"setup-test-env: torch {torch.__version__}, sglang {md.version('sglang')}, "
      f"pegaflow-sglang {md.version('pegaflow-sglang')}")
PY
echo "setup-test-env: done in $(( $(date +%s) - start ))s"
