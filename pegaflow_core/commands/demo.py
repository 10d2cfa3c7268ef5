"""``pegaflow demo``: the main job on the embedded default config, end to end.

Starts a daemon, then a simulated Llama-3.1-8B engine sends prompts that share a system prompt:
a cold pass (only the shared prefix hits), a warm pass (every full block hits), and a pass after
the engine restarts (a new process-like engine with a fresh KV cache still hits: the cache lives
in the daemon). Prints hit rate and copy speed per pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import random


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="start a daemon and show cache hits and throughput with a simulated engine")
    p.add_argument("--prompts", type=int, default=4, help="prompts per pass (default %(default)s)")
    p.add_argument("--system-tokens", type=int, default=2048, help="shared system prompt length (default %(default)s)")
    p.add_argument("--user-tokens", type=int, default=2048, help="unique tokens per prompt (default %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..client import PegaflowClient
    from ..launcher import DaemonProcess
    from ..sim_engine import LLAMA_8B, SimulatedEngine
    from ..sizes import format_size
    from .status import run as status

    rng = random.Random(0)
    system = [rng.randrange(128_000) for _ in range(args.system_tokens)]
    prompts = [system + [rng.randrange(128_000) for _ in range(args.user_tokens)] for _ in range(args.prompts)]
    blocks_per_prompt = len(prompts[0]) // LLAMA_8B.block_size
    shape = dataclasses.replace(LLAMA_8B, num_blocks=2 * blocks_per_prompt)
    print(f"pegaflow demo: daemon on the embedded default config; engine shaped like Llama-3.1-8B "
          f"({format_size(shape.block_bytes)} per {shape.block_size}-token block); {args.prompts} prompts of "
          f"{len(prompts[0])} tokens sharing a {args.system_tokens}-token system prompt\n")
    with DaemonProcess(None) as daemon:
        print(f"daemon up at {daemon.endpoint}\n")
        print(f"{'pass':<16}{'hit rate':>9}{'loaded':>11}{'load GB/s':>11}{'saved':>11}{'save GB/s':>11}{'prefill ms':>12}")
        engine = SimulatedEngine(PegaflowClient(daemon.endpoint, timeout_s=60), shape, instance_id="engine-a")
        _pass("cold", engine, prompts)
        _pass("warm", engine, prompts)
        engine.close()
        engine.client.close()
        engine = SimulatedEngine(PegaflowClient(daemon.endpoint, timeout_s=60), shape, instance_id="engine-a-restarted")
        _pass("engine restart", engine, prompts)
        engine.close()
        engine.client.close()
        print()
        status(argparse.Namespace(endpoint=daemon.endpoint, json=False))
    return 0


def _pass(name: str, engine: object, prompts: list[list[int]]) -> None:
    from ..sizes import format_size

    stats = [engine.prefill(p, verify=True) for p in prompts]
    blocks = sum(s.blocks for s in stats)
    hits = sum(s.hit_blocks for s in stats)
    loaded = sum(s.loaded_bytes for s in stats)
    load_s = sum(s.load_s for s in stats)
    saved = sum(s.saved_blocks for s in stats) * engine.shape.block_bytes
    save_s = sum(s.save_s for s in stats)
    prefill_ms = 1e3 * sum(s.total_s for s in stats) / len(stats)
    load_rate = f"{loaded / load_s / 1e9:.2f}" if load_s and loaded else "-"
    save_rate = f"{saved / save_s / 1e9:.2f}" if save_s and saved else "-"
    print(f"{name:<16}{100 * hits / blocks:>8.1f}%{format_size(loaded):>11}{load_rate:>11}{format_size(saved):>11}{save_rate:>11}{prefill_ms:>12.1f}")
