"""``pegaflow bench engine MODE``: what an engine feels, measured with the reference engine.

Modes (each prints a markdown table on stderr and its figures on stdout; every ratio is against a
baseline measured in the same run):

- ``ttft``: TTFT of long prompts cold, warm from the daemon's DRAM and warm from an SSD tier
  (mean, p99), and TTFT against the cached prefix length (PNG, or CSV without matplotlib);
- ``share``: K engine processes with one shared daemon vs each with a private daemon of 1/K the
  pool, on prompts with shared system prompts: hit rate and prefill tokens/s;
- ``restart``: kill -9 the engine and start it again: start-to-ready and first-request TTFT, with
  pegaflow holding the pool, without pegaflow, and with the daemon restarted too (warm pool);
- ``mla``: a DeepSeek-shaped MLA model with TP ranks as processes: stored once, loaded by all.

Full shapes on a GPU; ``--size tiny`` (the default on CPU) shrinks shapes and counts so every
mode runs in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pegaflow_core.errors import InvalidArgument

from .shapes import PRESETS, ModelShape, tiny

MODES = ("ttft", "share", "restart", "mla", "transfer")

# Per size: prompt tokens, prompts, share (engines, requests per engine, system prompts, system
# tokens, user tokens), tp ranks, warmup tokens.
_DEFAULTS = {
    "full": dict(prompt_tokens=10_000, prompts=8, engines=4, requests=12, system_prompts=8, system_tokens=4096,
                 user_tokens=1024, tp=2, warmup_tokens=2048),
    "tiny": dict(prompt_tokens=160, prompts=3, engines=2, requests=4, system_prompts=3, system_tokens=64,
                 user_tokens=16, tp=2, warmup_tokens=32),
}


@dataclass(frozen=True)
class Settings:
    """The resolved options of one run."""

    mode: str
    size: str
    device: str
    shape: ModelShape
    backend: str
    prompt_tokens: int
    prompts: int
    engines: int
    requests: int
    system_prompts: int
    system_tokens: int
    user_tokens: int
    tp: int
    warmup_tokens: int
    pool_size: int | None
    ssd_dir: str  # "": a temporary directory under /var/tmp, removed afterwards
    out_dir: Path
    seed: int
    tied: bool | None
    eager: bool = False  # no CUDA graphs (graphs.py)

    @property
    def gpu(self) -> bool:
        return self.device.startswith("cuda")


class EngineBenchmark:
    kind = "engine"
    help = "reference torch engine (Llama-3.1-8B / DeepSeek MLA shapes) driving pegaflow like vLLM: TTFT, sharing, restart, MLA"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("mode", choices=MODES, help="ttft: TTFT cold / warm-DRAM / warm-SSD and vs cached prefix; share: K engines, "
                       "one shared daemon vs private ones; restart: kill -9 the engine, start again; mla: MLA latent "
                       "cache with TP ranks as processes; transfer: save/load GB/s of the KV backend alone")
        p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default %(default)s)")
        p.add_argument("--size", choices=("full", "tiny"), help="full model shapes or CPU-test shapes and counts "
                       "(default: full on a GPU, tiny on CPU)")
        p.add_argument("--backend", choices=("pegaflow", "reference"), default="pegaflow",
                       help="KV backend: pegaflow's daemon, or pegaflow-llm's Rust server (GPU only; modes ttft, restart, transfer)")
        shape = p.add_argument_group("model shape (overrides the preset: llama for ttft/share/restart, mla for mla)")
        for flag in ("layers", "hidden", "q-heads", "kv-heads", "head-dim", "mlp", "vocab", "block-size"):
            shape.add_argument(f"--{flag}", type=int)
        shape.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
        shape.add_argument("--tied", action=argparse.BooleanOptionalAction, default=None,
                           help="one set of layer weights reused by every layer (same FLOPs, 1/layers the memory; "
                                "default: on for share, off otherwise)")
        work = p.add_argument_group("workload (defaults depend on --size)")
        for flag in ("prompt-tokens", "prompts", "engines", "requests", "system-prompts", "system-tokens",
                     "user-tokens", "tp", "warmup-tokens"):
            work.add_argument(f"--{flag}", type=int)
        p.add_argument("--pool-size", help="daemon DRAM pool (ttft, restart: default fits the workload; share: the "
                       "total split across private daemons)")
        p.add_argument("--ssd-dir", default="", help="directory for the SSD tier of ttft's warm-SSD phase "
                       "(default: a temporary directory under /var/tmp)")
        p.add_argument("--out", default="", help="where to write the TTFT plot/CSV (default: $OUT or the current directory)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--eager", action="store_true", help="never replay CUDA graphs (by default suffixes of at most "
                       "64 tokens replay per-layer graphs captured after their first request, as vLLM does)")

    @staticmethod
    def run(args: argparse.Namespace) -> dict[str, Any]:
        settings = resolve(args)
        if settings.mode == "ttft":
            from .modes.ttft import run
        elif settings.mode == "share":
            from .modes.share import run
        elif settings.mode == "restart":
            from .modes.restart import run
        elif settings.mode == "transfer":
            from .modes.transfer import run
        else:
            from .modes.mla import run
        report = run(settings)
        report["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()
                              if k != "shape"} | {"shape": dataclasses.asdict(settings.shape)}
        return report


def resolve(args: argparse.Namespace) -> Settings:
    """Fill the defaults that depend on the device and size; reject what cannot work, saying why."""
    try:
        import torch
    except ImportError:
        raise InvalidArgument("pegaflow bench engine needs torch: install the build for this machine "
                         "(CPU: pip install torch --index-url https://download.pytorch.org/whl/cpu)") from None
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgument(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__})")
    if device != "cpu" and not device.startswith("cuda"):
        raise InvalidArgument(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    size = args.size or ("full" if device.startswith("cuda") else "tiny")
    if args.backend == "reference" and (not device.startswith("cuda") or args.mode not in ("ttft", "restart", "transfer")):
        raise InvalidArgument("--backend reference runs on a GPU (pegaflow-llm registers CUDA IPC handles only) and for "
                         "modes ttft, restart and transfer")
    preset = PRESETS["mla" if args.mode == "mla" else "llama"]
    base = preset if size == "full" else tiny(preset)
    overrides = {"layers": args.layers, "hidden": args.hidden, "q_heads": args.q_heads, "kv_heads": args.kv_heads,
                 "head_dim": args.head_dim, "mlp": args.mlp, "vocab": args.vocab, "block_size": args.block_size,
                 "dtype": args.dtype}
    try:
        shape = base.scaled(**overrides)
    except ValueError as exc:
        raise InvalidArgument(f"model shape: {exc}") from None
    if args.mode == "mla" and (shape.q_heads % (args.tp or 1) or shape.mlp % (args.tp or 1)):
        raise InvalidArgument(f"--tp {args.tp} must divide the heads ({shape.q_heads}) and the MLP width ({shape.mlp})")
    counts = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in _DEFAULTS[size].items()}
    for key, value in counts.items():
        if value <= 0 and key != "warmup_tokens":
            raise InvalidArgument(f"--{key.replace('_', '-')} must be > 0, got {value}")
    if counts["prompt_tokens"] < 2 * shape.block_size:
        raise InvalidArgument(f"--prompt-tokens must be at least two blocks ({2 * shape.block_size}), got {counts['prompt_tokens']}")
    pool = None
    if args.pool_size:
        from pegaflow_core.sizes import parse_size

        try:
            pool = parse_size(args.pool_size)
        except InvalidArgument as exc:
            raise InvalidArgument(f"--pool-size: {exc}") from None
    out = Path(args.out or os.environ.get("OUT") or ".")
    return Settings(mode=args.mode, size=size, device=device, shape=shape, backend=args.backend, pool_size=pool,
                    ssd_dir=args.ssd_dir, out_dir=out, seed=args.seed, tied=args.tied, eager=args.eager, **counts)
