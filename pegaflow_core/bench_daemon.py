"""``pegaflow bench daemon``: a simulated Llama-3.1-8B engine (32 layers, 16-token blocks,
8 KV heads x 128, bf16: 2 MiB per block) saving and loading a prompt's KV through a real daemon
process, timed against a plain one-thread memcpy of the same number of bytes in the same run.

Figures: save and load GB/s (end to end: RPC, index, copies between the engine's shared-memory KV
cache and the daemon's pool), Query latency, per-step control overhead (a Save whose blocks are
all present already: everything but the copy) and an empty round trip (Health) as p50/p99. The
client uses the daemon's local socket as engines on its machine do; ``--grpc-only`` times gRPC.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any

import numpy as np

from .client import PegaflowClient
from .launcher import DaemonProcess
from .sim_engine import LLAMA_8B, SimulatedEngine
from .sizes import parse_size


def memcpy_gbps(nbytes: int, rounds: int = 3) -> float:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.ones(nbytes, dtype=np.uint8)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(rounds))
    return nbytes / best / 1e9


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    blocks = args.tokens // LLAMA_8B.block_size
    shape = dataclasses.replace(LLAMA_8B, num_blocks=2 * blocks)
    nbytes = blocks * shape.block_bytes
    pool = parse_size(args.pool_size)
    if pool < 2 * nbytes:
        raise SystemExit(f"--pool-size {args.pool_size} is too small: the benchmark needs at least {2 * nbytes >> 20} MiB")
    baseline = memcpy_gbps(nbytes)
    config = f"tiers: [{{kind: dram, capacity: {pool}}}]\nindex: {{kind: local}}\n"
    with DaemonProcess(config) as daemon, PegaflowClient(daemon.endpoint, timeout_s=60, local=not args.grpc_only) as client:
        client.wait_warm()
        engine = SimulatedEngine(client, shape, fill=False, memory=args.memory)
        try:
            engine.cache.array[:] = 7  # fault every page in before timing
            save_s, load_s, hashes = [], [], []
            for it in range(args.iterations):
                keys = [f"bench-{it}-{i}".encode().ljust(32, b".") for i in range(blocks)]
                ids = engine.allocate(blocks)
                save_s.append(_timed(lambda: client.save(engine.handle, ids, keys)))
                hashes.append(keys)
            for it in range(args.iterations):
                keys = hashes[-1 - (it % 2)]
                ids = engine.allocate(blocks)
                hit = client.query(engine.handle, keys)
                assert hit.hit_blocks == blocks, f"expected {blocks} hits, got {hit.hit_blocks}"
                load_s.append(_timed(lambda: client.load(engine.handle, hit.lease_id, ids).wait()))
            query_s, control_s, health_s = [], [], []
            for _ in range(args.control_rounds):
                holder: dict[str, Any] = {}
                query_s.append(_timed(lambda: holder.setdefault("q", client.query(engine.handle, hashes[-1]))))
                client.release([holder["q"].lease_id])
                control_s.append(_timed(lambda: client.save(engine.handle, engine.allocate(blocks), hashes[-1])))
                health_s.append(_timed(client.health))
            path = "local socket" if client.local_socket else "gRPC"
        finally:
            engine.close()
    save_gbps = nbytes / statistics.median(save_s) / 1e9
    load_gbps = nbytes / statistics.median(load_s) / 1e9
    return {
        "bench": "daemon",
        "description": f"{args.tokens}-token prompt, {blocks} blocks x {shape.block_bytes >> 10} KiB = {nbytes / 1e9:.2f} GB "
        f"per step, engine KV in {'a shared-memory file' if args.memory == 'shm' else 'private memory (cross-memory attach)'}, "
        f"control calls over {path}",
        "figures": {
            "save_gbps": save_gbps,
            "load_gbps": load_gbps,
            "save_gbps_best": nbytes / min(save_s) / 1e9,
            "load_gbps_best": nbytes / min(load_s) / 1e9,
            "query_ms_p50": 1e3 * _pct(query_s, 0.5),
            "query_ms_p99": 1e3 * _pct(query_s, 0.99),
            "step_control_ms_p50": 1e3 * _pct(control_s, 0.5),
            "step_control_ms_p99": 1e3 * _pct(control_s, 0.99),
            "health_ms_p50": 1e3 * _pct(health_s, 0.5),
            "health_ms_p99": 1e3 * _pct(health_s, 0.99),
        },
        "baseline": {"memcpy_gbps": baseline},
        "ratios": {"save_vs_memcpy": save_gbps / baseline, "load_vs_memcpy": load_gbps / baseline},
    }
