"""The radix-cache route on CPU: its registration through SGLang's own plugin loader and
registry, the GPU KV pool (SGLang's real pool classes, allocated on the CPU) saved and loaded
layer by layer through a real daemon, SGLang's real radix cache admitting a prefix another
instance saved, and the namespace it shares with HiCache layer_first pages. CUDA IPC itself runs
in the GPU test (gpu-test.sh)."""

from __future__ import annotations

import importlib.metadata
from types import SimpleNamespace

import pytest

from sglang_pools import LAYERS, PAGE, device_pool, fill_pages, host_pool, indices, make_store, need_sglang

need_sglang()

import torch  # noqa: E402

from pegaflow_sglang.device_kv import DeviceKV  # noqa: E402
from pegaflow_sglang.naming import Placement  # noqa: E402
from pegaflow_sglang.options import SglangOptions  # noqa: E402


def options(daemon, **extra):
    return SglangOptions.from_mapping({"endpoint": daemon.endpoint, "timeout_s": 2, "retry_interval_s": 0.2, **extra}, "test")


def fill_device(pool, pages, seed, mla=False):
    gen = torch.Generator().manual_seed(seed)
    buffers = pool.kv_buffer if mla else list(pool.k_buffer) + list(pool.v_buffer)
    for buf in buffers:
        for p in pages:
            view = buf[p * PAGE:(p + 1) * PAGE].view(torch.uint8)
            view.copy_(torch.randint(0, 256, view.shape, generator=gen, dtype=torch.uint8))


def layer_bytes(pool, layer, pages, mla=False):
    buffers = [pool.kv_buffer[layer]] if mla else [pool.k_buffer[layer], pool.v_buffer[layer]]
    return [b[p * PAGE:(p + 1) * PAGE].contiguous().view(torch.uint8).numpy().tobytes() for b in buffers for p in pages]


def attach(kv, pool, mla=False):
    if mla:
        kv.attach(pool.kv_buffer, None, PAGE)
    else:
        kv.attach(pool.k_buffer, pool.v_buffer, PAGE)
    return kv


def test_entry_point_registers_the_backend_through_sglangs_plugin_loader():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="sglang.srt.plugins")}
    assert eps.get("pegaflow") == "pegaflow_sglang.sglang_plugin:register"
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, registered_radix_cache_backends
    from sglang.srt.plugins import load_plugins

    from pegaflow_sglang.radix import pegaflow_radix_cache

    load_plugins()
    assert "pegaflow" in registered_radix_cache_backends()
    assert get_radix_cache_factory("pegaflow") is pegaflow_radix_cache
    from pegaflow_sglang.sglang_plugin import register

    register()  # a second load in the same process is harmless


def test_factory_and_options_refuse_clearly(monkeypatch):
    from pegaflow_sglang.radix import pegaflow_radix_cache

    with pytest.raises(ValueError, match="drop --enable-hierarchical-cache"):
        pegaflow_radix_cache(SimpleNamespace(enable_hierarchical_cache=True))
    with pytest.raises(NotImplementedError, match="full-attention"):
        pegaflow_radix_cache(SimpleNamespace(enable_hierarchical_cache=False, is_hybrid_swa=True, is_hybrid_ssm=False))
    monkeypatch.setenv("PEGAFLOW_SGLANG_CONFIG", '{"load_mode": "eager"}')
    with pytest.raises(ValueError, match=r"PEGAFLOW_SGLANG_CONFIG\['load_mode'\]: expected one of"):
        SglangOptions.from_env()
    monkeypatch.setenv("PEGAFLOW_SGLANG_CONFIG", "{endpoint: x}")
    with pytest.raises(ValueError, match="not valid JSON"):
        SglangOptions.from_env()
    monkeypatch.setenv("PEGAFLOW_SGLANG_CONFIG", '{"endpoint": "10.0.0.1:1", "staging_pages": "4"}')
    assert SglangOptions.from_env().staging_pages == 4


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_device_pages_round_trip_layer_by_layer(daemon, mla):
    a, b = device_pool(mla), device_pool(mla)
    saver = attach(DeviceKV(options(daemon), Placement("tiny-model"), mla, "a"), a, mla)
    loader = attach(DeviceKV(options(daemon), Placement("tiny-model"), mla, "b"), b, mla)
    try:
        keys = [f"{i:064x}" for i in range(100, 103)]
        fill_device(a, [1, 2, 3], seed=1, mla=mla)
        assert saver.save([1, 2, 3], keys).result(30) is True
        hit = loader.lookup(keys + [f"{999:064x}"])
        assert hit.pages == 3 and hit.lease_id
        load = loader.start_load(hit, [7, 9, 4])
        for layer in range(LAYERS):  # what SGLang's attention layers do before reading a layer
            loader.waiter.wait_until(layer)
            assert load.handle.layers_done > layer
            assert layer_bytes(b, layer, [7, 9, 4], mla) == layer_bytes(a, layer, [1, 2, 3], mla)
        assert loader.waiter.take_finished() == [load] and load.finish()
    finally:
        saver.close()
        loader.close()


def test_gpu_pages_share_blocks_with_hicache_layer_first_pages(daemon):
    """The GPU route stores a page in the layer-major flat order: a HiCache engine with a
    layer_first (or page_first_direct) host pool reads it, and the reverse."""
    dev = device_pool()
    kv = attach(DeviceKV(options(daemon), Placement("tiny-model"), False, "gpu"), dev)
    host = host_pool("layer_first")
    store = make_store(daemon.endpoint, host)
    try:
        keys = [f"{i:064x}" for i in range(200, 202)]
        fill_device(dev, [2, 3], seed=2)
        assert kv.save([2, 3], keys).result(30)
        assert store.batch_get_v1(keys, indices([5, 6])) == [True, True]
        for layer in range(LAYERS):
            assert torch.equal(host.k_buffer[layer, 20:28].view(torch.uint8), dev.k_buffer[layer][8:16].view(torch.uint8))
            assert torch.equal(host.v_buffer[layer, 20:28].view(torch.uint8), dev.v_buffer[layer][8:16].view(torch.uint8))
        back = [f"{i:064x}" for i in range(300, 302)]
        fill_pages(host, [8, 9], seed=3)
        assert store.batch_set_v1(back, indices([8, 9])) == [True, True]
        hit = kv.lookup(back)
        assert hit.pages == 2
        assert kv.start_load(hit, [10, 11], layerwise=False).finish()
        assert torch.equal(dev.k_buffer[1][40:48].view(torch.uint8), host.k_buffer[1, 32:40].view(torch.uint8))
    finally:
        kv.close()
        store.close()


def radix_cache(daemon, instance, layerwise=True):
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    from pegaflow_sglang.radix import PegaflowRadixCache

    pool = device_pool()
    allocator = PagedTokenToKVPoolAllocator(size=64, page_size=PAGE, dtype=torch.float16, device="cpu", kvcache=pool,
                                            need_sort=False)
    params = CacheInitParams(disable=False, req_to_token_pool=ReqToTokenPool(size=4, max_context_len=128, device="cpu",
                             enable_memory_saver=False), token_to_kv_pool_allocator=allocator, page_size=PAGE)
    kv = DeviceKV(options(daemon), Placement("tiny-model"), False, instance)
    return PegaflowRadixCache(params, kv, layerwise=layerwise), pool


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "sync"])
def test_radix_cache_admits_a_prefix_another_instance_saved(daemon, layerwise):
    from sglang.srt.mem_cache.base_prefix_cache import CacheRequestHandle, InitLoadBackParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    from pegaflow_sglang.radix import page_keys

    first, first_pool = radix_cache(daemon, f"engine-1-{layerwise}")
    second, second_pool = radix_cache(daemon, f"engine-2-{layerwise}", layerwise=layerwise)
    try:
        tokens = list(range(1000, 1014))  # 3 full pages + 2 tokens
        keys = page_keys(RadixKey(tokens), PAGE)
        assert len(keys) == 3
        fill_device(first_pool, [1, 2, 3], seed=4)
        assert first.kv.save([1, 2, 3], keys).result(30)
        # the request as the scheduler hands it to the tree: only its handle is read here
        req = SimpleNamespace(cache_request_handle=CacheRequestHandle("req-1", 0), rid="req-1")
        match = second.match_prefix(MatchPrefixParams(key=RadixKey(tokens), req=req))
        assert (match.device_prefix_len, match.host_hit_length) == (0, 12)
        loaded, node = second.init_load_back(InitLoadBackParams(best_match_node=match.best_match_node,
                                                                 host_hit_length=match.host_hit_length, req=req))
        assert loaded == 12 and len(node.value) == 12
        counter = second_pool.layer_transfer_counter  # registered on SGLang's KV pool (layer-wise only)
        assert (counter is second.kv.waiter) if layerwise else counter is None
        for layer in range(LAYERS):
            if counter is not None:
                counter.wait_until(layer)
            slots = node.value
            for src, dst in ((first_pool.k_buffer, second_pool.k_buffer), (first_pool.v_buffer, second_pool.v_buffer)):
                assert torch.equal(dst[layer][slots].view(torch.uint8), src[layer][4:16].view(torch.uint8))
        again = second.match_prefix(MatchPrefixParams(key=RadixKey(tokens)))
        assert again.device_prefix_len == 12  # the tree holds the loaded pages now
        assert not second.has_pending_cache_operations() or second.check_hicache_events() is None
        # other tokens, or another extra key (LoRA, salt): a miss, no load planned
        other = second.match_prefix(MatchPrefixParams(key=RadixKey(tokens, extra_key="lora-7"),
                                                      req=SimpleNamespace(cache_request_handle=CacheRequestHandle("r2", 0))))
        assert other.host_hit_length == 0
    finally:
        first.shutdown()
        second.shutdown()


def test_radix_cache_serves_misses_while_the_daemon_is_down(daemon):
    from sglang.srt.mem_cache.base_prefix_cache import CacheRequestHandle, InitLoadBackParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    cache, _ = radix_cache(daemon, "engine-down")
    req = SimpleNamespace(cache_request_handle=CacheRequestHandle("req-d", 0), rid="req-d")
    daemon.kill()
    try:
        match = cache.match_prefix(MatchPrefixParams(key=RadixKey(list(range(16))), req=req))
        assert match.host_hit_length == 0
        assert cache.init_load_back(InitLoadBackParams(best_match_node=match.best_match_node, host_hit_length=0,
                                                       req=req)) == (0, match.best_match_node)
        assert cache.kv.save([1], [f"{1:064x}"]).result(30) is False
    finally:
        daemon.start()
        cache.shutdown()
