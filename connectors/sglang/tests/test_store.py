"""PegaflowStore (the HiCache storage backend) built by SGLang's own dynamic backend loader over
SGLang's real host pool classes, against a real daemon: exact bytes through the daemon for every
host layout, MHA and MLA, prefix semantics, namespaces, restarts, bad input and threads."""

from __future__ import annotations

import threading

import pytest

from sglang_pools import HOST_LAYOUTS, PAGE, fill_pages, host_pool, indices, keys, make_store, need_sglang, page_bytes

need_sglang()

import torch  # noqa: E402

from pegaflow_core.client import ContextSpec, PegaflowClient  # noqa: E402
from pegaflow_core.layout import Plane  # noqa: E402


@pytest.fixture
def stores(daemon):
    made = []

    def make(pool, **kwargs):
        store = make_store(daemon.endpoint, pool, **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("layout", HOST_LAYOUTS)
def test_round_trip_is_byte_exact(stores, layout, mla):
    pool = host_pool(layout, mla)
    store = stores(pool, mla=mla)
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage

    assert isinstance(store, HiCacheStorage) and type(store).__name__ == "PegaflowStore"
    names = keys(5, f"rt-{layout}-{mla}")
    src, dst = [1, 2, 3, 4, 5], [9, 7, 12, 20, 6]
    fill_pages(pool, src, seed=1)
    before = page_bytes(pool, src)
    assert store.batch_set_v1(names, indices(src)) == [True] * 5
    fill_pages(pool, dst, seed=2)  # garbage where the load goes
    assert store.batch_get_v1(names, indices(dst)) == [True] * 5
    assert page_bytes(pool, dst) == before


def test_batch_exists_counts_the_leading_run(stores):
    store = stores(host_pool("page_first"))
    names = keys(6, "prefix")
    fill_pages(store.mem_pool_host, [1, 2, 3, 4, 5, 6], seed=3)
    assert store.batch_set_v1([names[0], names[1], names[3]], indices([1, 2, 4])) == [True] * 3
    assert store.batch_exists(names) == 2  # names[2] is missing: names[3] does not count
    assert store.batch_exists(names[3:4]) == 1
    assert store.batch_exists([]) == 0
    assert store.exists(names[1]) and not store.exists(names[2])
    results = store.batch_get_v1(names[:4], indices([10, 11, 12, 13]))
    assert results == [True, True, False, False]


def test_layer_first_and_page_first_direct_share_pages_page_first_does_not(stores):
    """Same flat page bytes -> same namespace: an engine restarted with the other of these two
    layouts still hits; page_first orders a page's bytes differently and must miss."""
    layer_first, direct, page_first = host_pool("layer_first"), host_pool("page_first_direct"), host_pool("page_first")
    a, b, c = stores(layer_first), stores(direct), stores(page_first)
    names = keys(3, "share")
    fill_pages(layer_first, [1, 2, 3], seed=4)
    assert a.batch_set_v1(names, indices([1, 2, 3])) == [True] * 3
    assert b.batch_get_v1(names, indices([4, 5, 6])) == [True] * 3
    # the same logical KV: K/V of every layer and token, whatever the buffer order
    for side in ("k_buffer", "v_buffer"):
        want = getattr(layer_first, side)[:, 4:16]
        got = getattr(direct, side)[4:7].transpose(0, 1).reshape(want.shape)
        assert torch.equal(want.contiguous().view(torch.uint8), got.contiguous().view(torch.uint8))
    assert c.batch_exists(names) == 0


def test_mla_is_stored_once_for_all_tp_ranks_mha_per_rank(stores):
    mla0, mla1 = host_pool("page_first", mla=True), host_pool("page_first", mla=True)
    r0 = stores(mla0, mla=True, tp_rank=0, tp_size=2)
    r1 = stores(mla1, mla=True, tp_rank=1, tp_size=2)
    names = keys(2, "mla-tp")
    fill_pages(mla0, [1, 2], seed=5)
    assert r0.batch_set_v1(names, indices([1, 2])) == [True, True]
    assert r1.batch_get_v1(names, indices([3, 4])) == [True, True]
    assert page_bytes(mla1, [3, 4]) == page_bytes(mla0, [1, 2])
    single = stores(host_pool("page_first", mla=True), mla=True, tp_rank=0, tp_size=1)
    assert single.batch_exists(names) == 2  # MLA: one copy whatever the TP size
    mha0, mha1 = host_pool("page_first"), host_pool("page_first")
    m0 = stores(mha0, tp_rank=0, tp_size=2)
    m1 = stores(mha1, tp_rank=1, tp_size=2)
    fill_pages(mha0, [1], seed=6)
    assert m0.batch_set_v1(names[:1], indices([1])) == [True]
    assert m1.batch_exists(names[:1]) == 0  # another rank's heads
    assert stores(host_pool("page_first"), tp_rank=0, tp_size=1).batch_exists(names[:1]) == 0  # another TP split
    assert stores(host_pool("page_first"), tp_rank=0, tp_size=2, model="other").batch_exists(names[:1]) == 0


def test_namespaces_are_apart_from_vllm_contexts(stores, daemon):
    """A vLLM worker of the same model saving blocks under the very same hashes (equal size)
    never feeds SGLang, and SGLang's pages never feed vLLM."""
    from pegaflow_vllm.kv_layout import CacheLayout

    pool = host_pool("page_first")
    store = stores(pool)
    names = keys(2, "vllm")
    hashes = [bytes.fromhex(n) for n in names]
    page = store.pages.layout.page_bytes
    vllm = CacheLayout(group_id=0, layer_names=("l0",), block_size=PAGE, num_heads=1, head_size=page // (2 * PAGE * 2),
                       head_size_v=page // (2 * PAGE * 2), dtype="torch.float16", cache_dtype="auto", page_bytes=page,
                       page_order="NC", is_mla=False, tp_shards=1, tp_replicas=1, pp_size=1)
    buffer = torch.ones((4, page), dtype=torch.uint8)
    from pegaflow_core.regions import region_for_storage

    region = region_for_storage(buffer, "auto")
    with PegaflowClient(daemon.endpoint) as client:
        handle = client.register_context(ContextSpec(
            namespace=vllm.namespace("tiny-model"), num_blocks=4, regions=(region.spec,),
            planes=(Plane(0, 0, region.base_offset, page, page),), instance_id="vllm-worker"))
        assert client.save(handle, [0, 1], hashes).stored == 2
        assert store.batch_exists(names) == 0
        fill_pages(pool, [1, 2], seed=7)
        assert store.batch_set_v1(names, indices([1, 2])) == [True, True]
        assert client.query(handle, hashes).hit_blocks == 2  # its own two, not SGLang's
        assert store.batch_get_v1(names, indices([3, 4])) == [True, True]
        assert page_bytes(pool, [3, 4]) == page_bytes(pool, [1, 2])  # SGLang's bytes, not vLLM's ones


def test_key_based_calls_share_blocks_with_zero_copy_ones(stores):
    """What older releases call: flat page tensors in and out, through a bounce buffer."""
    for layout in HOST_LAYOUTS:
        pool = host_pool(layout)
        store = stores(pool)
        names = keys(3, f"legacy-{layout}")
        fill_pages(pool, [1, 2, 3], seed=8)
        flats = [pool.get_data_page(p * PAGE, flat=True).clone() for p in (1, 2, 3)]
        assert store.batch_set(names[:2], flats[:2]) is True
        assert store.set(names[2], flats[2]) is True
        assert store.batch_get_v1(names, indices([5, 6, 7])) == [True] * 3  # zero-copy sees them
        assert page_bytes(pool, [5, 6, 7]) == page_bytes(pool, [1, 2, 3])
        targets = [pool.get_dummy_flat_data_page() for _ in range(3)]
        assert all(t is not None for t in store.batch_get(names, targets))
        assert [t.view(torch.uint8).numpy().tobytes() for t in targets] == page_bytes(pool, [1, 2, 3])
        assert store.get(keys(1, "absent")[0], pool.get_dummy_flat_data_page()) is None
        assert store.batch_get(names + keys(1, "absent"), [pool.get_dummy_flat_data_page() for _ in range(4)])[3] is None


def test_bad_keys_and_sizes_answer_misses_not_errors(stores, caplog):
    pool = host_pool("page_first")
    store = stores(pool)
    names = keys(4, "bad")
    fill_pages(pool, [1, 2, 3, 4], seed=9)
    assert store.batch_set_v1(names[:2], indices([1, 2])) == [True, True]
    # wrong number of host indices for the keys: nothing moves
    assert store.batch_get_v1(names[:2], indices([3])) == [False, False]
    assert store.batch_set_v1(names[2:], indices([3])) == [False, False]
    assert "need 8 host indices" in caplog.text
    # a page that is not page aligned, or outside the pool
    shifted = indices([3, 4]) + 1
    assert store.batch_set_v1(names[2:], shifted) == [False, False]
    assert store.batch_get_v1(names[:2], torch.tensor(list(range(1000 * PAGE, 1002 * PAGE)))) == [False, False]
    assert "not whole pages" in caplog.text
    # bad keys: a bad one fails alone on set and ends the prefix on get/exists
    assert store.batch_set_v1(["", names[2], None, "not hex at all, still a key"], indices([1, 2, 3, 4])) == [False, True, False, True]
    assert store.batch_exists([names[0], None, names[1]]) == 1
    assert store.batch_get_v1([names[0], 17, names[1]], indices([5, 6, 7])) == [True, False, False]
    assert store.batch_exists(["not hex at all, still a key"]) == 1
    # key-based calls: wrong page size
    assert store.batch_set(names[:1], [torch.zeros(3, dtype=torch.float16)]) is False
    assert store.batch_get(names[:1], [torch.zeros(3, dtype=torch.float16)]) == [None]
    assert "a page of this pool holds" in caplog.text


def test_unsupported_pools_and_options_fail_clearly(daemon):
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    from sglang_pools import storage_config

    with pytest.raises(ValueError, match=r"unknown pegaflow option; known: .*endpoint"):
        StorageBackendFactory.create_backend("dynamic", storage_config(daemon.endpoint, endpont="x"), None)
    with pytest.raises(ValueError, match="no model name"):
        StorageBackendFactory.create_backend("dynamic", storage_config(daemon.endpoint, model=None), None)
    with pytest.raises(ValueError, match=r"\['memory'\]: expected one of"):
        StorageBackendFactory.create_backend("dynamic", storage_config(daemon.endpoint, memory="gpu"), None)
    pool = host_pool("page_first")
    pool.layout = "page_head"  # what a split-head deployment would hand over
    store = StorageBackendFactory.create_backend("dynamic", storage_config(daemon.endpoint), pool)
    with pytest.raises(ValueError, match="page_head"):
        store.register_mem_pool_host(pool)
    store.close()


def test_daemon_kill_and_restart_gives_misses_then_hits(daemon, stores):
    pool = host_pool("page_first")
    store = stores(pool)
    names = keys(3, "restart")
    fill_pages(pool, [1, 2, 3], seed=10)
    before = page_bytes(pool, [1, 2, 3])
    assert store.batch_set_v1(names, indices([1, 2, 3])) == [True] * 3
    daemon.kill()
    try:
        for _ in range(3):  # down: misses, never None, never an exception
            assert store.batch_get_v1(names, indices([4, 5, 6])) == [False] * 3
            assert store.batch_set_v1(names, indices([1, 2, 3])) == [False] * 3
            assert store.batch_exists(names) == 0
    finally:
        daemon.start()
    import time

    deadline = time.monotonic() + 15
    while store.batch_set_v1(names, indices([1, 2, 3])) != [True] * 3:  # re-registered with the new daemon
        assert time.monotonic() < deadline, "the store never reached the restarted daemon"
        time.sleep(0.2)
    assert store.batch_exists(names) == 3
    fill_pages(pool, [4, 5, 6], seed=11)
    assert store.batch_get_v1(names, indices([4, 5, 6])) == [True] * 3
    assert page_bytes(pool, [4, 5, 6]) == before


def test_eight_threads_at_once(stores):
    pool = host_pool("page_first")
    store = stores(pool)
    threads, per = 8, 3  # 24 distinct pages of the 33-page pool, each thread its own
    errors: list[BaseException] = []
    expected: dict[int, list[bytes]] = {}
    fill_pages(pool, list(range(1, 1 + threads * per)), seed=12)
    for t in range(threads):
        expected[t] = page_bytes(pool, list(range(1 + t * per, 1 + (t + 1) * per)))

    def work(t: int) -> None:
        try:
            names = keys(per, f"thread-{t}")
            src = list(range(1 + t * per, 1 + (t + 1) * per))
            for _ in range(5):
                assert store.batch_set_v1(names, indices(src)) == [True] * per
                assert store.batch_exists(names) == per
                assert store.batch_get_v1(names, indices(src)) == [True] * per  # load onto itself: same bytes
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not errors, errors
    for t in range(threads):
        assert page_bytes(pool, list(range(1 + t * per, 1 + (t + 1) * per))) == expected[t]
