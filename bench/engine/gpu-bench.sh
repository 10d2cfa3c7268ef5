#!/usr/bin/env bash
# `pegaflow bench engine` on a GPU machine, every mode with full shapes, in one command:
#   bash bench/engine/gpu-bench.sh
# Results under $OUT (default /tmp/pegaflow-bench-engine): <mode>.json (figures), <mode>.md (tables),
# ttft-vs-prefix.{csv,png}, gpu.txt (hardware), install.log. About 8 minutes on an H100.
#
# Offline machine: installs with --no-deps --no-build-isolation. Without grpcio-tools there, the
# generated gRPC code must travel with the tree: carry pegaflow_core/_proto (made here by any
# `pip install -e .`). Optional carries: .wheels/engine/plot (matplotlib, for the PNG; else the CSV
# is written and `python -m pegaflow_bench_engine.report CSV` plots it elsewhere) and
# .wheels/engine/reference (pegaflow-llm-cu13, for the side-by-side run).
# Environment: MODES (default "ttft share restart mla transfer reference"), PROMPTS (default 6),
# ENGINES (share, default 8), TP (mla, default 2), PYTHON, SSD_DIR (default: under /var/tmp).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/pegaflow-bench-engine}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
MODES=${MODES:-ttft share restart mla transfer reference}
PROMPTS=${PROMPTS:-6}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False  # CUDA IPC cannot export expandable segments

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  lscpu | grep -E "^Model name|^CPU\(s\)" ; free -g | head -2
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  df -h /var/tmp | tail -1; } 2>&1 | tee "$OUT/gpu.txt"

if ! $PY -c "import grpc_tools" 2>/dev/null && [[ ! -f pegaflow_core/_proto/pegaflow_pb2.py ]]; then
  echo "gpu-bench: no grpcio-tools here and no generated code in pegaflow_core/_proto: carry pegaflow_core/_proto" >&2
  exit 2
fi
packages=(-e . -e backends/dram -e backends/ssd -e bench/engine)
[[ -d backends/cuda ]] && packages+=(-e backends/cuda)
$PY -m pip install -q --no-deps --no-build-isolation "${packages[@]}" >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
if compgen -G ".wheels/engine/plot/*.whl" >/dev/null; then
  $PY -m pip install -q --no-deps .wheels/engine/plot/*.whl >>"$OUT/install.log" 2>&1 || echo "gpu-bench: matplotlib did not install; CSV only"
fi
pegaflow backends 2>&1 | grep -E "memory|dram|ssd|engine" | tee -a "$OUT/gpu.txt"

status=0
run() {  # run MODE [args...]: JSON on stdout, tables on stderr
  local name=$1; shift
  echo "== $name: pegaflow bench engine $*" | tee -a "$OUT/commands.txt"
  local started=$SECONDS
  pegaflow bench engine "$@" --json --out "$OUT" ${SSD_DIR:+--ssd-dir "$SSD_DIR"} \
    >"$OUT/$name.json" 2> >(tee "$OUT/$name.md" >&2) || { echo "gpu-bench: $name failed" >&2; status=1; }
  echo "   $name took $((SECONDS - started)) s" | tee -a "$OUT/commands.txt"
}

for mode in $MODES; do
  case $mode in
    ttft) run ttft ttft --prompts "$PROMPTS" ;;
    share) run share share --engines "${ENGINES:-8}" --requests 8 ;;
    restart) run restart restart ;;
    mla) run mla mla --prompts "$PROMPTS" --tp "${TP:-2}" ;;
    transfer) run transfer transfer --prompts "$PROMPTS" ;;
    reference)
      wheel=$(compgen -G ".wheels/engine/reference/pegaflow_llm_cu13-*.whl" | head -1)
      if [[ -z "$wheel" ]]; then echo "gpu-bench: no .wheels/engine/reference wheel carried; skipping the pegaflow-llm run"; continue; fi
      export PEGAFLOW_LLM_PATH=/tmp/pegaflow-llm
      $PY -m pip install -q --no-deps --target "$PEGAFLOW_LLM_PATH" "$wheel" >>"$OUT/install.log" 2>&1 \
        || { echo "gpu-bench: pegaflow-llm did not install" >&2; status=1; continue; }
      mkdir -p "$OUT/reference"
      OUT="$OUT/reference" run reference-ttft ttft --prompts "$PROMPTS" --backend reference
      OUT="$OUT/reference" run reference-transfer transfer --prompts "$PROMPTS" --backend reference
      ;;
    *) echo "gpu-bench: unknown mode $mode (ttft share restart mla transfer reference)" >&2; status=2 ;;
  esac
done
exit $status
