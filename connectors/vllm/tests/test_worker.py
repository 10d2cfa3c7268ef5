"""The worker side on its own: KV tensors in shared memory ('shm') or plain process memory
('cma'), vLLM's current and legacy layouts, MLA and tensor parallelism, exact bytes."""

from __future__ import annotations

import random

import pytest

from vllm_harness import BLOCK, HEAD, KV_HEADS, LAYERS, kv_cache_config, need_vllm, vllm_config

need_vllm()

import torch  # noqa: E402

from pegaflow_core.shm import SharedRegion  # noqa: E402
from pegaflow_vllm.kv_layout import CacheLayout, planes_of_tensor  # noqa: E402
from pegaflow_vllm.metadata import LoadSpec, PegaflowMetadata  # noqa: E402
from pegaflow_vllm.worker_side import PegaflowWorker, Ranks  # noqa: E402

NUM_BLOCKS = 32


def shm_kv_caches(layout_config, region: SharedRegion) -> dict[str, torch.Tensor]:
    """vLLM-shaped per-layer views over a shared-memory file (LBNHC)."""
    flat = torch.frombuffer(region.array, dtype=torch.int8)
    from vllm.v1.kv_cache_interface import create_kv_cache_views
    from vllm.v1.kv_cache_layout import KVCacheLayout

    tensor = layout_config.kv_cache_tensors[0]
    spec = layout_config.kv_cache_groups[0].kv_cache_spec
    views = create_kv_cache_views(flat, spec, NUM_BLOCKS, KVCacheLayout.LBNHC, tensor)
    return dict(zip(tensor.layers, views))


def make_worker(model_dir, endpoint, kv_config, tp_rank=0, tp=1, role="kv_both"):
    config = vllm_config(model_dir, endpoint, role=role, tp=tp)
    layout = CacheLayout.from_config(config, kv_config)
    return PegaflowWorker(config, ConnectorOptions_from(config), layout, "tiny", f"w{tp_rank}", Ranks(tp_rank, tp))


def ConnectorOptions_from(config):
    from pegaflow_vllm.options import ConnectorOptions

    return ConnectorOptions.from_extra_config(config.kv_transfer_config.kv_connector_extra_config)


def fill_random(kv: dict[str, torch.Tensor], block_ids: list[int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for t in kv.values():
        for b in block_ids:
            t[b].copy_(torch.randint(-30000, 30000, t[b].shape, generator=gen, dtype=torch.int16).view(t.dtype))


def snapshot(kv: dict[str, torch.Tensor], block_ids: list[int]) -> list[bytes]:
    return [b"".join(t[b].contiguous().view(torch.uint8).numpy().tobytes() for t in kv.values()) for b in block_ids]


def hashes(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(n)]


def save_and_load(worker: PegaflowWorker, kv, src: list[int], dst: list[int], block_hashes: list[bytes], lease_from=None):
    worker.submit_save(PegaflowMetadata(save_block_ids=src, save_hashes=block_hashes, save_req_ids=["r"]))
    worker.drain_saves()
    querier = lease_from or worker
    hit = querier.client.query(querier.handle, block_hashes)
    assert hit.hit_blocks == len(block_hashes)
    spec = LoadSpec("r2", hit.lease_id, querier.namespace, querier.shard, dst, block_hashes)
    worker.start_load(PegaflowMetadata(loads=[spec]))
    for name in kv:
        worker.wait_for_layer(name)
    worker.finish_loads()
    assert worker.take_load_errors() == set()
    querier.client.release([hit.lease_id])


def test_shm_backed_tensors_register_as_shm_and_round_trip(model_dir, daemon, daemon_client):
    kv_config = kv_cache_config(NUM_BLOCKS)
    region = SharedRegion.create(kv_config.kv_cache_tensors[0].size)
    worker = make_worker(model_dir, daemon.endpoint, kv_config)
    try:
        kv = shm_kv_caches(kv_config, region)
        spec = worker.register_kv_caches(kv, NUM_BLOCKS)
        assert [r.kind for r in spec.regions] == ["shm"] and spec.regions[0].path == str(region.path)
        fill_random(kv, [1, 2, 3], seed=1)
        expected = snapshot(kv, [1, 2, 3])
        save_and_load(worker, kv, [1, 2, 3], [10, 20, 30], hashes(3, seed=1))
        assert snapshot(kv, [10, 20, 30]) == expected
    finally:
        worker.shutdown()
        region.close()


def test_plain_tensors_register_as_cma_and_round_trip(model_dir, daemon):
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    kv_config = kv_cache_config(NUM_BLOCKS)
    worker = make_worker(model_dir, daemon.endpoint, kv_config)
    try:
        kv = allocate_kv_cache(kv_config, torch.device("cpu"), KVCacheLayout.LBNHC)
        spec = worker.register_kv_caches(kv, NUM_BLOCKS)
        assert [r.kind for r in spec.regions] == ["cma"] and len(spec.planes) == LAYERS
        fill_random(kv, [4, 5], seed=2)
        expected = snapshot(kv, [4, 5])
        save_and_load(worker, kv, [4, 5], [6, 0], hashes(2, seed=2))
        assert snapshot(kv, [6, 0]) == expected
    finally:
        worker.shutdown()


def test_tensor_parallel_ranks_store_separate_shards_and_load_their_own(model_dir, daemon):
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    kv_config = kv_cache_config(NUM_BLOCKS)
    ranks = [make_worker(model_dir, daemon.endpoint, kv_config, tp_rank=r, tp=2) for r in range(2)]
    try:
        assert [w.shard for w in ranks] == [0, 1] and ranks[0].namespace == ranks[1].namespace
        caches = [allocate_kv_cache(kv_config, torch.device("cpu"), KVCacheLayout.LBNHC) for _ in ranks]
        for w, kv in zip(ranks, caches):
            w.register_kv_caches(kv, NUM_BLOCKS)
        for r, kv in enumerate(caches):
            fill_random(kv, [1, 2], seed=10 + r)  # each rank holds different heads: different bytes
        expected = [snapshot(kv, [1, 2]) for kv in caches]
        block_hashes = hashes(2, seed=3)
        ranks[0].submit_save(PegaflowMetadata(save_block_ids=[1, 2], save_hashes=block_hashes, save_req_ids=["r"]))
        ranks[0].drain_saves()
        # rank 1 loads with the lease rank 0's shard gave: it must query its own shard, which it has not
        # saved yet -> every block fails and is recomputed, never rank 0's bytes in rank 1's memory
        hit = ranks[0].client.query(ranks[0].handle, block_hashes)
        ranks[1].start_load(PegaflowMetadata(loads=[LoadSpec("r", hit.lease_id, ranks[0].namespace, 0, [5, 6], block_hashes)]))
        ranks[1].finish_loads()
        assert ranks[1].take_load_errors() == {5, 6}
        ranks[0].client.release([hit.lease_id])
        save_and_load(ranks[1], caches[1], [1, 2], [7, 8], block_hashes, lease_from=ranks[0])
        assert snapshot(caches[1], [7, 8]) == expected[1]
    finally:
        for w in ranks:
            w.shutdown()


def test_mla_uses_shard_zero_on_every_rank(model_dir, daemon):
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    spec = MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=576, dtype=torch.float16)
    kv_config = kv_cache_config(NUM_BLOCKS, spec=spec)
    layouts = [CacheLayout.from_config(vllm_config(model_dir, daemon.endpoint, tp=4), kv_config) for _ in range(2)]
    assert layouts[0].is_mla and layouts[0].tp_shards == 1
    assert {layouts[0].shard_of(r) for r in range(4)} == {0}
    assert layouts[0].namespace("m") == CacheLayout.from_config(vllm_config(model_dir, daemon.endpoint, tp=2), kv_config).namespace("m")
    # a rank > 0 registers its latent cache under shard 0: one copy serves every rank
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    worker = make_worker(model_dir, daemon.endpoint, kv_config, tp_rank=1, tp=2)
    try:
        registered = worker.register_kv_caches(allocate_kv_cache(kv_config, torch.device("cpu"), KVCacheLayout.LBNHC), NUM_BLOCKS)
        assert (registered.shard, registered.tp_rank, len(registered.planes)) == (0, 1, LAYERS)
        assert worker.layout.page_order == "NC" and registered.planes[0].block_bytes == BLOCK * 576 * 2
    finally:
        worker.shutdown()
    full = CacheLayout.from_config(vllm_config(model_dir, daemon.endpoint, tp=2), kv_cache_config(NUM_BLOCKS))
    assert full.namespace("m") != CacheLayout.from_config(vllm_config(model_dir, daemon.endpoint, tp=1), kv_cache_config(NUM_BLOCKS)).namespace("m")


def test_planes_of_current_legacy_and_head_outer_layouts():
    elem = 2
    page = BLOCK * KV_HEADS * 2 * HEAD * elem
    # current layout, LBNHC: logical [B, H, N, C], physical B, N, H, C -> one plane per layer
    current = torch.zeros(NUM_BLOCKS, BLOCK, KV_HEADS, 2 * HEAD, dtype=torch.float16).permute(0, 2, 1, 3)
    described = planes_of_tensor(current, NUM_BLOCKS, layer=3, storage_base=current.data_ptr())
    assert described.page_order == "NHC" and described.page_bytes == page
    assert [(p.layer, p.offset, p.block_stride, p.block_bytes) for p in described.planes] == [(3, 0, page, page)]
    # legacy (2, num_blocks, block_size, heads, head_size): K plane then V plane
    legacy = torch.zeros(2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD, dtype=torch.float16)
    half = page // 2
    described = planes_of_tensor(legacy, NUM_BLOCKS, layer=0, storage_base=legacy.data_ptr())
    assert [(p.offset, p.block_stride, p.block_bytes) for p in described.planes] == [(0, half, half), (NUM_BLOCKS * half, half, half)]
    # head-outer (LHBNC): a block of a layer is one run per head
    head_outer = torch.zeros(KV_HEADS, NUM_BLOCKS, BLOCK, 2 * HEAD, dtype=torch.float16).permute(1, 0, 2, 3)
    described = planes_of_tensor(head_outer, NUM_BLOCKS, layer=0, storage_base=head_outer.data_ptr())
    run = BLOCK * 2 * HEAD * elem
    assert described.page_order == "HNC"
    assert [(p.offset, p.block_stride, p.block_bytes) for p in described.planes] == [(0, run, run), (NUM_BLOCKS * run, run, run)]
    with pytest.raises(ValueError, match="expected num_blocks=32 in dim 0"):
        planes_of_tensor(torch.zeros(3, 4), NUM_BLOCKS, layer=0, storage_base=0)
