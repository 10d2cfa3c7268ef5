#!/usr/bin/env bash
# Builds the test venv of pegaflow-vllm (default: <repo>/.venv-vllm) with the real vLLM package
# on the CPU torch build. Idempotent: a stamp file records what was installed from which inputs,
# and a second run with the same inputs only re-checks that vllm and pegaflow_vllm import.
# Fails loudly (set -e, and a final import check). Usage:
#   connectors/vllm/setup-test-env.sh [VENV_DIR]
# Environment: PYTHON (default python3.11), VLLM_VERSION (default 0.33.0),
#              TORCH_WHEEL (default the CPU wheel under /opt/wheels).
set -euo pipefail

start=$(date +%s)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-$repo/.venv-vllm}"
python="${PYTHON:-python3.11}"
vllm_version="${VLLM_VERSION:-0.33.0}"
torch_wheel="${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"
stamp="$venv/.pegaflow-vllm-installed"

inputs_digest() {
  # Everything that changes what gets installed; editable installs pick up source edits by
  # themselves, but a changed pyproject.toml/setup.py (entry points, deps) needs a reinstall.
  cat "$here/requirements-test.txt" "$here/pyproject.toml" "$repo/pyproject.toml" \
      "$repo/setup.py" "$repo/backends/dram/pyproject.toml" "$repo/conformance/pyproject.toml" \
      "$repo/proto/pegaflow/v1/pegaflow.proto" "$0" 2>/dev/null | sha256sum | cut -d' ' -f1
  echo "$vllm_version $torch_wheel"
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
  # vLLM pins a CUDA torch: install it without dependencies so pip never replaces the CPU build.
  "${pip[@]}" -q --no-deps "vllm==$vllm_version"
  # vLLM's scheduler imports xgrammar; xgrammar would pull triton (~1 GB), which nothing imports on CPU.
  "${pip[@]}" -q --no-deps "xgrammar==0.2.8"
  "${pip[@]}" -q -r "$here/requirements-test.txt"
  "${pip[@]}" -q -e "$repo" -e "$repo/backends/dram" -e "$repo/conformance" -e "$here"
  echo "$digest" > "$stamp"
fi

"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch, vllm, pegaflow_core, pegaflow_vllm  # noqa: F401  (fails loudly if any is broken)
print(f"setup-test-env: torch {torch.__version__}, vllm {md.version('vllm')}, "
      f"pegaflow-vllm {md.version('pegaflow-vllm')}")
PY
echo "setup-test-env: done in $(( $(date +%s) - start ))s"
