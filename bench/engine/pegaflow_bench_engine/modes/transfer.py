"""``transfer``: a prompt's KV saved from and loaded into the engine's paged cache through the KV
backend alone (no model), so pegaflow's daemon and pegaflow-llm's server (``--backend reference``)
move the same blocks through the same adapter interface, side by side.

The cache is vLLM's FlashAttention layout (per layer ``[2, blocks, block_size, kv_heads,
head_dim]``); each round saves a 10K-token prompt's blocks (scattered ids) and loads them into
other blocks, checked byte for byte. A save is timed until a Query answers every block (pegaflow
answers Save after its copy; pegaflow-llm's save call may return before its copy, so both are timed
to the moment the blocks can be served); a load until the backend says the blocks are in place.
Baseline, in the same run: one-piece pinned memcpy of the same bytes (D2H for saves, H2D for loads).
pegaflow-llm is registered with its ``kernel`` transfer backend here (its faster one for this
workload, per issue #12), not the ``direct`` one the engine modes use.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from ..bench import Settings
from ..kv_cache import PagedKVCache
from ..report import say, table
from .common import device, kv_server

QUERY_DEADLINE_S = 30.0


def run(settings: Settings) -> dict[str, Any]:
    import torch

    shape, T, N = settings.shape, settings.prompt_tokens, settings.prompts
    blocks = T // shape.block_size
    nbytes = blocks * shape.block_bytes
    dev = device(settings)
    baseline = None
    if dev.type == "cuda":
        from pegaflow_cuda.bench import pinned_memcpy_gbps

        baseline = pinned_memcpy_gbps(nbytes, dev.index or 0)
    cache = PagedKVCache(shape, 2 * blocks + 8, dev, seed=settings.seed)

    def synchronize() -> None:  # the clock starts and stops with the GPU idle
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    rng = random.Random(settings.seed)
    save_s, load_s = [], []
    say(f"transfer: {shape.name} on {settings.device}, {blocks} blocks = {nbytes / 1e9:.2f} GB per round, "
        f"backend {settings.backend}, {N} rounds")
    with kv_server(settings, int(nbytes * (N + 2) * 1.25)) as server:
        backend = _backend(server, settings)
        try:
            backend.register(cache, shape.namespace(weights_seed=settings.seed) + "-transfer", "transfer-0")
            for it in range(N):
                ids = rng.sample(range(cache.num_blocks), 2 * blocks)
                src, dst = ids[:blocks], ids[blocks:]
                cache.flat.random_(0, 256, generator=torch.Generator(device=dev).manual_seed(it))
                hashes = [f"transfer-{settings.seed}-{it}-{i}".encode().ljust(32, b".") for i in range(blocks)]
                synchronize()
                started = time.perf_counter()
                backend.save(src, hashes)
                hit = _query_all(backend, hashes, blocks)
                save_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                failed = backend.load(hit, dst).finish()
                synchronize()
                load_s.append(time.perf_counter() - started)
                if failed:
                    raise RuntimeError(f"transfer: {len(failed)} blocks failed to load in round {it}")
                _check(cache, src, dst)
        finally:
            backend.close()
            cache.close()
    figures = {
        "blocks": blocks, "bytes": nbytes,
        "save_gbps": nbytes / statistics.median(save_s) / 1e9, "load_gbps": nbytes / statistics.median(load_s) / 1e9,
        "save_gbps_best": nbytes / min(save_s) / 1e9, "load_gbps_best": nbytes / min(load_s) / 1e9,
    }
    report: dict[str, Any] = {"mode": "transfer", "backend": settings.backend, "figures": figures}
    rows = [["save", f"{figures['save_gbps']:.1f}", f"{figures['save_gbps_best']:.1f}"],
            ["load", f"{figures['load_gbps']:.1f}", f"{figures['load_gbps_best']:.1f}"]]
    if baseline is not None:
        report["baseline"] = {"pinned_d2h_gbps": baseline[0], "pinned_h2d_gbps": baseline[1]}
        report["ratios"] = {"save_vs_d2h": figures["save_gbps"] / baseline[0], "load_vs_h2d": figures["load_gbps"] / baseline[1]}
        rows[0].append(f"{report['ratios']['save_vs_d2h']:.3f} of {baseline[0]:.1f}")
        rows[1].append(f"{report['ratios']['load_vs_h2d']:.3f} of {baseline[1]:.1f}")
    header = ["direction", "median GB/s", "best GB/s"] + (["ratio to pinned memcpy GB/s"] if baseline else [])
    say(table(f"transfer, {shape.name}, {blocks} blocks = {nbytes / 1e9:.2f} GB ({settings.backend})", header, rows))
    return report


def _backend(server: Any, settings: Settings) -> Any:
    if settings.backend == "reference":
        from ..reference_backend import ReferenceBackend

        return ReferenceBackend(server.endpoint, gqa_transfer="kernel")
    return server.backend()


def _query_all(backend: Any, hashes: list[bytes], blocks: int) -> Any:
    """Query until every block is served (at once for pegaflow, whose Save returns after the copy)."""
    deadline = time.perf_counter() + QUERY_DEADLINE_S
    while True:
        hit = backend.lookup(hashes)
        if hit.blocks == blocks:
            return hit
        if time.perf_counter() > deadline:
            raise RuntimeError(f"transfer: {hit.blocks} of {blocks} saved blocks served after {QUERY_DEADLINE_S:.0f}s")
        time.sleep(0.0005)


def _check(cache: PagedKVCache, src: list[int], dst: list[int]) -> None:
    import torch

    index_src = torch.tensor(src, device=cache.flat.device)
    index_dst = torch.tensor(dst, device=cache.flat.device)
    axis = 1 if cache.layers[0].dim() == 5 else 0
    for layer, view in enumerate(cache.layers):
        raw = view.view(torch.uint8)  # random bytes: compared as bytes (as floats, NaN != NaN)
        if not torch.equal(raw.index_select(axis, index_src), raw.index_select(axis, index_dst)):
            raise AssertionError(f"transfer: layer {layer} of the loaded blocks differs from the saved ones")
