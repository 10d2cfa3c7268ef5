"""``pegaflow bench gpu``: a 10K-token prompt's KV saved from and loaded into GPU memory through a
real daemon over CUDA IPC, against plain pinned memcpy of the same bytes in the same run.

Shapes: Llama-3.1-8B (32 layers, 16-token blocks, 8 KV heads x 128, bf16, vLLM's
``(2, num_blocks, block_size, H, D)`` per layer in one flat allocation: 625 blocks x 64 planes of
32 KiB = 1.31 GB) and DeepSeek-V3 MLA (61 layers, 64-token blocks, one 576-wide latent plane per
layer). Block ids are scattered like a busy engine's. Every load is checked byte for byte.
Also timed: a 625-hash Query, and the daemon's start with a large pinned pool (time to serving,
and to the whole pool pinned in the background).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

from pegaflow_core.client import ContextSpec, PegaflowClient
from pegaflow_core.launcher import DaemonProcess
from pegaflow_core.layout import Plane, namespace_for
from pegaflow_core.regions import region_for_storage
from pegaflow_core.sizes import parse_size


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    block_size: int
    planes_per_layer: int  # 2: K and V; 1: an MLA latent
    plane_elems: int  # elements of one block in one plane

    def blocks_for(self, tokens: int) -> int:
        return tokens // self.block_size

    @property
    def plane_bytes(self) -> int:
        return self.plane_elems * 2  # bf16


LLAMA_8B = Shape("llama-3.1-8b", 32, 16, 2, 16 * 8 * 128)
DEEPSEEK_MLA = Shape("deepseek-v3-mla", 61, 64, 1, 64 * 576)


class GpuKVCache:
    """One flat bf16 allocation with a per-layer view, as vLLM allocates it."""

    def __init__(self, shape: Shape, num_blocks: int, device: int) -> None:
        import torch

        self.shape = shape
        self.num_blocks = num_blocks
        per_layer = shape.planes_per_layer * num_blocks * shape.plane_elems
        self.flat = torch.empty(shape.layers * per_layer, dtype=torch.bfloat16, device=f"cuda:{device}")
        self.layers = [
            self.flat[l * per_layer : (l + 1) * per_layer].view(shape.planes_per_layer, num_blocks, shape.plane_elems)
            for l in range(shape.layers)
        ]
        self.per_layer_bytes = per_layer * 2

    def context_spec(self, instance: str) -> ContextSpec:
        region = region_for_storage(self.flat, "cuda_ipc")
        s = self.shape
        planes = tuple(
            Plane(layer=l, region=0, offset=region.base_offset + l * self.per_layer_bytes + p * self.num_blocks * s.plane_bytes,
                  block_stride=s.plane_bytes, block_bytes=s.plane_bytes)
            for l in range(s.layers) for p in range(s.planes_per_layer)
        )
        namespace = namespace_for(s.name, layout="bench_gpu", block_size=s.block_size, planes=s.planes_per_layer,
                                  plane_elems=s.plane_elems, dtype="bfloat16", num_layers=s.layers)
        return ContextSpec(namespace=namespace, num_blocks=self.num_blocks, regions=(region.spec,), planes=planes,
                           instance_id=instance, device=self.flat.device.index)

    def blocks(self, ids: list[int]) -> Any:
        import torch

        index = torch.tensor(ids, device=self.flat.device)
        return torch.stack([layer.index_select(1, index) for layer in self.layers])


def pinned_memcpy_gbps(nbytes: int, device: int, rounds: int = 5) -> tuple[float, float]:
    """Best-of-``rounds`` one-piece D2H and H2D between GPU memory and pinned host memory."""
    import torch

    gpu = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{device}")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def best(fn: Any) -> float:
        times = []
        for _ in range(rounds):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return nbytes / min(times) / 1e9

    d2h = best(lambda: host.copy_(gpu, non_blocking=True))
    h2d = best(lambda: gpu.copy_(host, non_blocking=True))
    del gpu, host
    return d2h, h2d


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _scattered(num_blocks: int, n: int, seed: int) -> list[int]:
    import random

    return random.Random(seed).sample(range(num_blocks), n)


def run_shape(client: PegaflowClient, shape: Shape, tokens: int, iterations: int, device: int) -> dict[str, Any]:
    import torch

    blocks = shape.blocks_for(tokens)
    cache = GpuKVCache(shape, 3 * blocks, device)
    torch.manual_seed(0)
    cache.flat.uniform_(-1, 1)
    torch.cuda.synchronize()
    handle = client.register_context(cache.context_spec(f"bench-gpu-{shape.name}"))
    nbytes = blocks * shape.layers * shape.planes_per_layer * shape.plane_bytes
    save_s, load_s, query_s, engine_load_s = [], [], [], []
    here = handle.engine_copy_ready()  # this process may load by itself too (engine_copy.py)
    try:
        for it in range(iterations):
            src = _scattered(cache.num_blocks, blocks, 2 * it)
            hashes = [f"{shape.name}-{it}-{i}".encode().ljust(32, b".") for i in range(blocks)]
            t = time.perf_counter()
            result = client.save(handle, src, hashes)
            save_s.append(time.perf_counter() - t)
            assert result.stored == blocks, f"saved {result.stored} of {blocks} blocks (dropped {result.dropped})"
            dst = [b for b in _scattered(cache.num_blocks, 2 * blocks, 2 * it + 1) if b not in set(src)][:blocks]
            t = time.perf_counter()
            hit = client.query(handle, hashes)
            query_s.append(time.perf_counter() - t)
            assert hit.hit_blocks == len(dst), f"expected {len(dst)} hits, got {hit.hit_blocks}"
            t = time.perf_counter()
            loaded = client.load(handle, hit.lease_id, dst, release_after=True, engine_copy=False).wait()
            load_s.append(time.perf_counter() - t)
            assert not loaded.failed_block_ids, f"failed blocks {loaded.failed_block_ids[:5]}"
            if not torch.equal(cache.blocks(src[: len(dst)]), cache.blocks(dst)):
                raise AssertionError(f"{shape.name}: loaded blocks differ from the saved ones")
            if here:  # the same blocks again, copied by this process from its mapping of the pool
                expected = cache.blocks(dst)
                cache.flat.add_(1)
                torch.cuda.synchronize()
                hit = client.query(handle, hashes)
                t = time.perf_counter()
                load = client.load(handle, hit.lease_id, dst, release_after=True)
                loaded = load.wait()
                engine_load_s.append(time.perf_counter() - t)
                assert type(load).__name__ == "EngineLoad" and not loaded.failed_block_ids
                if not torch.equal(expected, cache.blocks(dst)):
                    raise AssertionError(f"{shape.name}: blocks loaded by the engine differ from the saved ones")
                del expected
            cache.flat.add_(1)  # next round saves different bytes
            torch.cuda.synchronize()
    finally:
        client.unregister_context(handle)
        del cache
        torch.cuda.empty_cache()
    return {
        "blocks": blocks,
        "bytes": nbytes,
        "save_gbps": nbytes / statistics.median(save_s) / 1e9,
        "load_gbps": nbytes / statistics.median(load_s) / 1e9,
        "save_gbps_best": nbytes / min(save_s) / 1e9,
        "load_gbps_best": nbytes / min(load_s) / 1e9,
        "query_ms_p50": 1e3 * _pct(query_s, 0.5),
    } | ({"engine_load_gbps": nbytes / statistics.median(engine_load_s) / 1e9,
          "engine_load_gbps_best": nbytes / min(engine_load_s) / 1e9} if engine_load_s else {})


def query_latency(client: PegaflowClient, device: int, rounds: int) -> dict[str, float]:
    """Query of a 625-block (10K-token) chain that hits everywhere: the engine's per-request cost."""
    shape = LLAMA_8B
    cache = GpuKVCache(shape, 700, device)
    handle = client.register_context(cache.context_spec("bench-gpu-query"))
    try:
        hashes = [f"q-{i}".encode().ljust(32, b".") for i in range(625)]
        client.save(handle, list(range(625)), hashes)
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            hit = client.query(handle, hashes)
            times.append(time.perf_counter() - t)
            client.release([hit.lease_id])
    finally:
        client.unregister_context(handle)
    return {"query_625_ms_p50": 1e3 * _pct(times, 0.5), "query_625_ms_p99": 1e3 * _pct(times, 0.99)}


def startup(pool: int) -> dict[str, float]:
    """Seconds from spawning a daemon with a ``pool``-byte pinned pool to serving, and to all of
    it pinned (the rest is pinned in the background while it serves)."""
    config = f"tiers: [{{kind: dram, capacity: {pool}, pin: always}}]\nindex: {{kind: local}}\n"
    daemon = DaemonProcess(config)
    t = time.perf_counter()
    try:
        daemon.start(timeout_s=120)
        serving = time.perf_counter() - t
        with PegaflowClient(daemon.endpoint, timeout_s=60) as client:
            client.wait_warm(timeout_s=600)
        warm = time.perf_counter() - t
    finally:
        daemon.close()
    return {"startup_pool_gb": pool / 1e9, "startup_serving_s": serving, "startup_all_pinned_s": warm}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Save and load through the daemon over CUDA IPC (``load_gbps``: the daemon copies), and the
    same loads copied by this process from its mapping of the pool (``engine_load_gbps``)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("pegaflow bench gpu needs a CUDA GPU (torch sees none)")
    device = args.device
    pool = parse_size(args.pool_size)
    d2h, h2d = pinned_memcpy_gbps(LLAMA_8B.blocks_for(args.tokens) * 64 * LLAMA_8B.plane_bytes, device)
    config = f"tiers: [{{kind: dram, capacity: {pool}, pin: always, device: {device}}}]\nindex: {{kind: local}}\n"
    figures: dict[str, Any] = {}
    daemon = DaemonProcess(config).start(timeout_s=120)
    try:
        with PegaflowClient(daemon.endpoint, timeout_s=120) as client:
            client.wait_warm(timeout_s=600)
            for shape in (LLAMA_8B, DEEPSEEK_MLA):
                figures[shape.name] = run_shape(client, shape, args.tokens, args.iterations, device)
            figures.update(query_latency(client, device, args.query_rounds))
    finally:
        daemon.close()
    if args.startup_pool:
        figures.update(startup(parse_size(args.startup_pool)))
    llama = figures[LLAMA_8B.name]
    mla = figures[DEEPSEEK_MLA.name]
    return {
        "bench": "gpu",
        "description": f"{args.tokens}-token prompt through a daemon over CUDA IPC on {torch.cuda.get_device_name(device)}; "
        f"Llama-3.1-8B {llama['blocks']} blocks = {llama['bytes'] / 1e9:.2f} GB, MLA {mla['blocks']} blocks = {mla['bytes'] / 1e9:.2f} GB",
        "figures": figures,
        "baseline": {"pinned_d2h_gbps": d2h, "pinned_h2d_gbps": h2d},
        "ratios": {
            "llama_save_vs_d2h": llama["save_gbps"] / d2h,
            "llama_load_vs_h2d": llama["load_gbps"] / h2d,
            "mla_save_vs_d2h": mla["save_gbps"] / d2h,
            "mla_load_vs_h2d": mla["load_gbps"] / h2d,
        } | {f"{name}_engine_load_vs_h2d": f["engine_load_gbps"] / h2d
             for name, f in (("llama", llama), ("mla", mla)) if "engine_load_gbps" in f},
    }


class GpuBenchmark:
    """Save/load of a 10K-token prompt between GPU KV and the daemon's pinned pool over CUDA IPC."""

    kind = "gpu"
    help = "10K-token save/load between GPU KV (CUDA IPC) and the daemon's pinned pool, vs pinned memcpy"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tokens", type=int, default=10_000, help="prompt length (default %(default)s)")
        p.add_argument("--iterations", type=int, default=5, help="timed saves and loads per shape (default %(default)s)")
        p.add_argument("--query-rounds", type=int, default=200, help="625-hash queries timed (default %(default)s)")
        p.add_argument("--pool-size", default="24gb", help="daemon DRAM tier capacity (default %(default)s)")
        p.add_argument("--startup-pool", default="16gb", help="pool size for the start-up measurement; '' skips it")
        p.add_argument("--device", type=int, default=0, help="CUDA device (default %(default)s)")

    @staticmethod
    def run(args: argparse.Namespace) -> dict[str, Any]:
        return run(args)
