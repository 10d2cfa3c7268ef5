"""``pegaflow demo``: the main job on the embedded default config, end to end.

Starts a daemon, then a simulated Llama-3.1-8B engine sends prompts that share a system prompt:
a cold pass (only the shared prefix hits), a warm pass (every full block hits), a pass after the
engine restarts (a new engine with a fresh KV cache still hits: the cache lives in the daemon),
and a pass after the daemon itself is killed with kill -9 and started again (it re-attaches its
pool). Prints hit rate and copy speed per pass. The demo's pool gets its own name (so it never
meets a real daemon's) and is removed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import tempfile
import time
from pathlib import Path


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
    config = demo_config()
    with tempfile.TemporaryDirectory(prefix="pegaflow-demo-") as workdir:
        daemon = DaemonProcess(config, workdir=workdir).start()
        try:
            client = PegaflowClient(daemon.endpoint, timeout_s=60)
            print(f"daemon up at {daemon.endpoint}; faulting its pool in (it serves meanwhile) ...", flush=True)
            print(f"pool ready after {client.wait_warm():.1f}s\n")
            print(f"{'pass':<16}{'hit rate':>9}{'loaded':>11}{'load GB/s':>11}{'saved':>11}{'save GB/s':>11}{'prefill ms':>12}")
            engine = SimulatedEngine(client, shape, instance_id="engine-a")
            _pass("cold", engine, prompts)
            _pass("warm", engine, prompts)
            engine.close()
            client.close()
            client = PegaflowClient(daemon.endpoint, timeout_s=60)
            engine = SimulatedEngine(client, shape, instance_id="engine-a-restarted")
            _pass("engine restart", engine, prompts)
            daemon.kill()
            started = time.monotonic()
            daemon = DaemonProcess(config, workdir=workdir).start()
            ready = time.monotonic() - started
            _wait_reconnected(engine)
            _pass("daemon restart", engine, prompts)
            print(f"\n(the daemon was killed with kill -9 and served again {ready:.1f}s after its restart)\n")
            engine.close()
            client.close()
            status(argparse.Namespace(endpoint=daemon.endpoint, json=False))
        finally:
            daemon.close()
            _remove_pool(config)
    return 0


def demo_config() -> str:
    """The embedded default, with a pool name of the demo's own."""
    import yaml

    from ..config import default_config_text
    from ..launcher import free_port

    data = yaml.safe_load(default_config_text())
    data["tiers"][0]["pool_name"] = f"demo-{os.getpid()}"
    data["server"]["listen"] = f"127.0.0.1:{free_port()}"  # kept across the daemon's restart
    data["server"]["metrics"] = None
    return yaml.safe_dump(data, sort_keys=False)


def _remove_pool(config: str) -> None:
    import yaml

    tier = yaml.safe_load(config)["tiers"][0]
    for suffix in (".pool", ".journal"):
        Path(tier.get("shm_dir", "/dev/shm"), f"pegaflow-{tier['pool_name']}{suffix}").unlink(missing_ok=True)


def _wait_reconnected(engine: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    old = engine.handle.context_id
    while engine.handle.context_id == old and time.monotonic() < deadline:
        time.sleep(0.05)


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
