"""GPU worker test of pegaflow-vllm (gpu-test.sh runs it on the GPU machine; elsewhere it skips).

vLLM cannot be installed on the GPU machine, so the worker half of the connector (which never
imports vLLM) is driven directly, the way vLLM's model runner drives it: register_kv_caches with
CUDA tensors in vLLM's layouts, submit_save at the end of a step, start_load + wait_for_layer per
attention layer, take_load_errors. The CacheLayout is the one CacheLayout.from_config derives for
these shapes (the CPU tests check from_config against vLLM's own config objects).

Covered against a real daemon serving cuda_ipc regions: vLLM 0.33's default layout (one
allocation, per-layer [B, H, N, C] views, LBNHC), the legacy (2, num_blocks, ...) per-layer
tensors (K and V planes), a cross-layer (block-outermost) cache, MLA with TP 2 stored once and
loaded by rank 1, a lease that cannot be loaded (reported, recomputed, memory untouched) and the
daemon killed with SIGKILL and restarted (misses, then hits again).
"""

from __future__ import annotations

import os
import random
import time
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the GPU worker test runs on the GPU machine (connectors/vllm/gpu-test.sh)",
                allow_module_level=True)

from pegaflow_core.launcher import DaemonProcess  # noqa: E402

from pegaflow_vllm.kv_layout import CacheLayout  # noqa: E402
from pegaflow_vllm.metadata import LoadSpec, PegaflowMetadata  # noqa: E402
from pegaflow_vllm.options import ConnectorOptions  # noqa: E402
from pegaflow_vllm.worker_side import PegaflowWorker, Ranks  # noqa: E402

LAYERS, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD = 4, 64, 16, 8, 128
MLA_DIM = 576
PAGE_BYTES = BLOCK * KV_HEADS * 2 * HEAD * 2  # bf16, K and V of one layer of one block
NAMES = tuple(f"model.layers.{i}.self_attn.attn" for i in range(LAYERS))
DAEMON_CONFIG = os.environ.get("PEGAFLOW_GPU_DAEMON_CONFIG",
                               "index: {kind: local}\ntiers: [{kind: dram, capacity: 2gb}]\n")


@pytest.fixture(scope="module")
def daemon():
    with DaemonProcess(DAEMON_CONFIG) as d:
        yield d


def layout(page_order: str = "NHC", mla: bool = False, tp: int = 1) -> CacheLayout:
    heads, page = (1, BLOCK * MLA_DIM * 2) if mla else (KV_HEADS, PAGE_BYTES)
    return CacheLayout(
        group_id=0, layer_names=NAMES, block_size=BLOCK, num_heads=heads, head_size=MLA_DIM if mla else HEAD,
        head_size_v=MLA_DIM if mla else HEAD, dtype="torch.bfloat16", cache_dtype="auto", page_bytes=page,
        page_order=page_order, is_mla=mla, tp_shards=1 if mla else tp, tp_replicas=tp if mla else 1, pp_size=1,
    )


def worker(daemon, cache_layout: CacheLayout, name: str, tp_rank: int = 0, tp: int = 1) -> PegaflowWorker:
    config = SimpleNamespace(kv_transfer_config=SimpleNamespace(is_kv_consumer=True, is_kv_producer=True,
                                                                kv_role="kv_both"))
    options = ConnectorOptions.from_extra_config({"pegaflow.endpoint": daemon.endpoint, "pegaflow.timeout_s": 10,
                                                  "pegaflow.retry_interval_s": 0.2})
    return PegaflowWorker(config, options, cache_layout, "gpu-model", name, Ranks(tp_rank, tp))


def default_layout_caches() -> dict[str, torch.Tensor]:
    """vLLM 0.33's allocate_kv_cache with LBNHC: one buffer, layer-outermost, each layer's view
    logical [B, H, N, C] over physical [B, N, H, C]."""
    raw = torch.zeros(LAYERS * NUM_BLOCKS * PAGE_BYTES, dtype=torch.int8, device="cuda")
    per_layer = raw.view(torch.bfloat16).view(LAYERS, NUM_BLOCKS, BLOCK, KV_HEADS, 2 * HEAD)
    return {name: per_layer[i].permute(0, 2, 1, 3) for i, name in enumerate(NAMES)}


def legacy_caches() -> dict[str, torch.Tensor]:
    """The pre-0.29 FlashAttention layout: one (2, num_blocks, block, heads, head) tensor per layer."""
    return {name: torch.zeros(2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD, dtype=torch.bfloat16, device="cuda")
            for name in NAMES}


def cross_layer_caches() -> dict[str, torch.Tensor]:
    """Block-outermost (BLNHC): a block of every layer is one contiguous run."""
    raw = torch.zeros(NUM_BLOCKS, LAYERS, BLOCK, KV_HEADS, 2 * HEAD, dtype=torch.bfloat16, device="cuda")
    return {name: raw[:, i].permute(0, 2, 1, 3) for i, name in enumerate(NAMES)}


def mla_caches() -> dict[str, torch.Tensor]:
    return {name: torch.zeros(NUM_BLOCKS, BLOCK, MLA_DIM, dtype=torch.bfloat16, device="cuda") for name in NAMES}


def block_of(tensor: torch.Tensor, block: int) -> torch.Tensor:
    return tensor[:, block] if tensor.shape[0] == 2 and tensor.shape[1] == NUM_BLOCKS else tensor[block]


def fill(kv: dict[str, torch.Tensor], blocks: list[int], seed: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for tensor in kv.values():
        for b in blocks:
            view = block_of(tensor, b)
            view.copy_(torch.randint(-30000, 30000, view.shape, generator=gen, device="cuda",
                                     dtype=torch.int16).view(torch.bfloat16))
    torch.cuda.synchronize()


def snapshot(kv: dict[str, torch.Tensor], blocks: list[int]) -> list[torch.Tensor]:
    return [torch.cat([block_of(t, b).contiguous().view(torch.uint8).flatten() for t in kv.values()]) for b in blocks]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def hashes(n: int, tag: str) -> list[bytes]:
    rng = random.Random(tag)
    return [rng.randbytes(32) for _ in range(n)]


def save(w: PegaflowWorker, blocks: list[int], block_hashes: list[bytes]) -> None:
    w.submit_save(PegaflowMetadata(save_block_ids=blocks, save_hashes=block_hashes, save_req_ids=["r"]))
    w.drain_saves()


def load(w: PegaflowWorker, kv: dict[str, torch.Tensor], blocks: list[int], block_hashes: list[bytes],
         querier: PegaflowWorker | None = None) -> set[int]:
    """What the model runner does: start the step's loads, each attention layer waits for its own
    layer, then the step ends. Returns the block ids reported as failed."""
    querier = querier or w
    hit = querier.client.query(querier.handle, block_hashes)
    assert hit.hit_blocks == len(block_hashes)
    w.start_load(PegaflowMetadata(loads=[LoadSpec("r2", hit.lease_id, querier.namespace, querier.shard, blocks,
                                                  block_hashes)]))
    for name in kv:
        w.wait_for_layer(name)
    w.finish_loads()
    torch.cuda.synchronize()
    querier.client.release([hit.lease_id])
    return w.take_load_errors()


@pytest.mark.parametrize("make, order, planes", [
    (default_layout_caches, "NHC", LAYERS),
    (legacy_caches, "KVNHC", 2 * LAYERS),
    (cross_layer_caches, "NHC", 1),
], ids=["vllm-0.33-LBNHC", "legacy-2xNB", "cross-layer"])
def test_gpu_kv_round_trips_layer_by_layer_over_cuda_ipc(daemon, make, order, planes):
    kv = make()
    w = worker(daemon, layout(order), f"gpu-{make.__name__}")
    try:
        spec = w.register_kv_caches(kv, NUM_BLOCKS)
        assert {r.kind for r in spec.regions} == {"cuda_ipc"} and len(spec.planes) == planes
        assert spec.device == torch.cuda.current_device()
        src, dst = [1, 2, 3, 40], [50, 51, 5, 0]
        fill(kv, src, seed=len(make.__name__))
        expected, untouched = snapshot(kv, src), snapshot(kv, [4, 63])
        block_hashes = hashes(len(src), make.__name__)
        save(w, src, block_hashes)
        assert load(w, kv, dst, block_hashes) == set()
        assert same(snapshot(kv, dst), expected)
        assert same(snapshot(kv, [4, 63]), untouched)
    finally:
        w.shutdown()


def test_the_worker_copies_its_loads_itself_with_the_schedulers_lease(daemon):
    """vLLM's scheduler queries in another process, so the worker's load asks Locate for the
    offsets and copies from its own mapping of the daemon's pool (engine_copy.py)."""
    from pegaflow_core.client import ContextSpec, PegaflowClient
    from pegaflow_core.engine_copy import EngineLoad

    kv = default_layout_caches()
    w = worker(daemon, layout("NHC"), "gpu-engine-side")
    try:
        w.register_kv_caches(kv, NUM_BLOCKS)
        assert w.handle.engine_copy_ready(60)
        src, dst = [6, 7, 30, 41], [12, 61, 8, 33]
        fill(kv, src, seed=21)
        expected = snapshot(kv, src)
        block_hashes = hashes(len(src), "engine-side")
        save(w, src, block_hashes)
        with PegaflowClient(daemon.endpoint, timeout_s=10) as scheduler_client:
            scheduler = SimpleNamespace(client=scheduler_client, namespace=w.namespace, shard=w.shard,
                                        handle=scheduler_client.register_context(
                                            ContextSpec.query_only(w.namespace, w.handle.block_bytes)))
            started = []
            original = w.client.load
            w.client.load = lambda *a, **k: started.append(original(*a, **k)) or started[-1]
            assert load(w, kv, dst, block_hashes, querier=scheduler) == set()
        assert [type(h) for h in started] == [EngineLoad]
        assert same(snapshot(kv, dst), expected)
    finally:
        w.shutdown()


def test_mla_tp2_stored_once_and_loaded_by_rank_1(daemon):
    rank_caches = [mla_caches(), mla_caches()]
    ranks = [worker(daemon, layout("NC", mla=True, tp=2), f"mla-{r}", tp_rank=r, tp=2) for r in range(2)]
    try:
        for w, kv in zip(ranks, rank_caches):
            w.register_kv_caches(kv, NUM_BLOCKS)
        assert [w.shard for w in ranks] == [0, 0] and ranks[0].namespace == ranks[1].namespace
        fill(rank_caches[0], [3, 4], seed=7)
        block_hashes = hashes(2, "mla")
        save(ranks[0], [3, 4], block_hashes)
        assert load(ranks[1], rank_caches[1], [9, 10], block_hashes, querier=ranks[0]) == set()
        assert same(snapshot(rank_caches[1], [9, 10]), snapshot(rank_caches[0], [3, 4]))
    finally:
        for w in ranks:
            w.shutdown()


def test_a_lease_that_cannot_load_is_reported_and_leaves_gpu_memory_alone(daemon):
    kv = default_layout_caches()
    w = worker(daemon, layout(), "gpu-bad-lease")
    try:
        w.register_kv_caches(kv, NUM_BLOCKS)
        fill(kv, [20, 21], seed=11)
        before = snapshot(kv, [20, 21])
        w.start_load(PegaflowMetadata(loads=[LoadSpec("r", "no-such-lease", w.namespace, w.shard, [20, 21],
                                                      hashes(2, "never-saved"))]))
        for name in kv:
            w.wait_for_layer(name)
        w.finish_loads()
        torch.cuda.synchronize()
        assert w.take_load_errors() == {20, 21}
        assert same(snapshot(kv, [20, 21]), before)
    finally:
        w.shutdown()


def test_daemon_killed_and_restarted_misses_then_hits(daemon):
    kv = default_layout_caches()
    w = worker(daemon, layout(), "gpu-restart")
    try:
        w.register_kv_caches(kv, NUM_BLOCKS)
        fill(kv, [6], seed=13)
        expected = snapshot(kv, [6])
        block_hashes = hashes(1, "restart")
        daemon.kill()
        try:
            save(w, [6], block_hashes)  # the daemon is down: the step goes on, nothing raises
            assert w.take_load_errors() == set()
        finally:
            daemon.start()
        deadline = time.monotonic() + 30
        while True:  # the worker re-registers its CUDA IPC regions with the new daemon on first use
            save(w, [6], block_hashes)
            hit = w.client.query(w.handle, block_hashes)
            if hit.lease_id:
                w.client.release([hit.lease_id])
            if hit.hit_blocks == 1:
                break
            assert time.monotonic() < deadline, "the worker never saved into the restarted daemon"
            time.sleep(0.3)
        assert load(w, kv, [33], block_hashes) == set()
        assert same(snapshot(kv, [33]), expected)
    finally:
        w.shutdown()
