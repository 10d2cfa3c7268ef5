"""DramTier behaviour beyond the shared contract: pool file, views, races, options."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pegaflow_core import BlockKey, CapacityError, ClosedError, ConfigError, InvalidArgument, MemoryKind
from pegaflow_core.sizes import Size
from pegaflow_dram import DramOptions, DramTier
from pegaflow_dram import tier as tier_module
from pegaflow_dram.poolfile import MAGIC, read_header

MIB = 1 << 20
Make = Callable[..., DramTier]


def key(i: int, ns: str = "model") -> BlockKey:
    return BlockKey(ns, i.to_bytes(8, "little"))


def block(i: int, nbytes: int = 8192) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, nbytes, dtype=np.uint8)


def test_round_trip_of_mixed_sizes_and_buffer_types(make_tier: Make) -> None:
    tier = make_tier()
    blocks = [block(0, 100), bytes(block(1, 4096)), bytearray(block(2, 70_000)), memoryview(block(3, MIB))]
    keys = [key(i) for i in range(4)]
    assert tier.put(keys, blocks) == [True] * 4
    dests = [np.zeros(len(memoryview(b)), np.uint8) for b in blocks]
    assert tier.get_into(keys + [key(9)], dests + [np.zeros(1, np.uint8)]) == [True] * 4 + [False]
    for got, want in zip(dests, blocks):
        assert got.tobytes() == bytes(want)
    usage = tier.usage()
    assert (usage.capacity_bytes, usage.blocks, usage.used_bytes) == (8 * MIB, 4, 100 + 4096 + 70_000 + MIB)


def test_full_tier_answers_false_and_never_evicts_by_itself(make_tier: Make) -> None:
    tier = make_tier(capacity=2 * MIB)
    keys = [key(i) for i in range(10)]
    stored = tier.put(keys, [block(i, 512 * 1024) for i in range(10)])
    assert stored == [True] * 4 + [False] * 6
    assert tier.contains(keys[:4]) == [True] * 4
    assert tier.evict(keys[:2] + [key(99)]) == 2
    assert tier.put(keys[4:6], [block(i, 512 * 1024) for i in (4, 5)]) == [True, True]


def test_bad_batch_stores_nothing(make_tier: Make) -> None:
    tier = make_tier()
    with pytest.raises(InvalidArgument, match=r"blocks\[1\]: expected a buffer"):
        tier.put([key(0), key(1)], [block(0), 42])
    with pytest.raises(InvalidArgument, match=r"keys\[1\]: expected a BlockKey, got str"):
        tier.put([key(0), "k"], [block(0), block(1)])
    with pytest.raises(InvalidArgument, match=r"expected one buffer per key \(2\), got 1"):
        tier.put([key(0), key(1)], [block(0)])
    with pytest.raises(CapacityError, match=rf"{MIB + 1} bytes .* chunk of {MIB} bytes"):
        tier.put([key(0), key(1)], [block(0), block(1, MIB + 1)])
    assert tier.contains([key(0), key(1)]) == [False, False]
    assert tier.usage().blocks == 0


def test_existing_and_duplicate_keys_keep_the_first_bytes(make_tier: Make) -> None:
    tier = make_tier()
    assert tier.put([key(0), key(0)], [block(0), block(1)]) == [True, True]
    assert tier.put([key(0)], [block(2)]) == [True]
    out = np.zeros(8192, np.uint8)
    tier.get_into([key(0)], [out])
    assert (out == block(0)).all() and tier.usage().blocks == 1


def test_get_into_checks_destinations_before_copying(make_tier: Make) -> None:
    tier = make_tier()
    tier.put([key(0), key(1)], [block(0), block(1)])
    first = np.zeros(8192, np.uint8)
    with pytest.raises(InvalidArgument, match=r"dests\[1\]: .* is 8192 bytes, the destination is 100 bytes"):
        tier.get_into([key(0), key(1)], [first, np.zeros(100, np.uint8)])
    assert not first.any()
    with pytest.raises(InvalidArgument, match=r"dests\[0\]: buffer is read-only"):
        tier.get_into([key(0)], [bytes(8192)])


def test_reserve_commit_abort_and_views(make_tier: Make) -> None:
    tier = make_tier()
    views = tier.reserve([key(0), key(1)], 8192)
    assert all(v is not None and len(v) == 8192 and not v.readonly for v in views)
    views[0][:] = block(0).tobytes()
    views[1][:] = block(1).tobytes()
    assert tier.contains([key(0), key(1)]) == [False, False]  # invisible until commit
    tier.commit([key(0)])
    tier.abort([key(1), key(7)])  # unknown keys are ignored
    assert tier.contains([key(0), key(1)]) == [True, False]
    (seen, missing) = tier.view([key(0), key(1)])
    assert missing is None and seen is not None and seen.readonly and bytes(seen) == block(0).tobytes()
    with pytest.raises(InvalidArgument, match="no reservation to commit"):
        tier.commit([key(1)])
    tier.reserve([key(2)], 100)
    with pytest.raises(InvalidArgument, match="already reserved"):
        tier.reserve([key(2)], 100)
    assert tier.capabilities.host_views and MemoryKind.HOST in tier.capabilities.memory


def test_reserve_answers_none_when_full_and_commit_keeps_stored_block(make_tier: Make) -> None:
    tier = make_tier(capacity=MIB)
    views = tier.reserve([key(i) for i in range(3)], 512 * 1024)
    assert [v is None for v in views] == [False, False, True]
    tier.commit([key(0), key(1)])
    tier.reserve([key(0)], 512 * 1024)  # no room: key(0) already occupies a slot
    again = tier.reserve([key(5)], 512 * 1024)
    assert again == [None]


def test_views_carry_the_addresses_the_buffer_protocol_gives(make_tier: Make) -> None:
    """Reserve and view hand out PoolViews: the GPU path reads each view's address from them
    instead of asking every view. They must be the views' real addresses, 0 for a miss, and stay
    right when an entry is replaced or a subset picked."""
    from pegaflow_core.buffers import PoolViews, joined, pick, put
    from pegaflow_core.copier import buffer_addresses

    tier = make_tier(capacity=MIB)
    reserved = tier.reserve([key(i) for i in range(3)], 512 * 1024)  # the third finds no room
    assert isinstance(reserved, PoolViews)
    assert list(reserved.addresses[:2]) == list(buffer_addresses(list(reserved[:2]))) and reserved.addresses[2] == 0
    tier.commit([key(0), key(1)])
    viewed = tier.view([key(1), key(7), key(0)])
    assert viewed[1] is None and viewed.addresses[1] == 0
    assert [viewed.addresses[0], viewed.addresses[2]] == list(buffer_addresses([viewed[0], viewed[2]]))
    picked = pick(viewed, [2, 0])
    assert list(picked.addresses) == list(buffer_addresses(list(picked)))
    other = tier.view([key(0)])[0]
    viewed[1] = other  # a replaced entry (a promotion fills a miss) gets its own address
    assert viewed.addresses[1] == buffer_addresses([other])[0]
    viewed[0] = None
    assert viewed.addresses[0] == 0
    with pytest.raises(TypeError, match="one address per view"):
        viewed.append(other)
    assert buffer_addresses(viewed) is not None and list(buffer_addresses(viewed)) == list(viewed.addresses)
    together = joined([picked, viewed])  # a save's batches drawn into one gather keep their addresses
    assert isinstance(together, PoolViews) and len(together) == 5
    assert list(together.addresses) == list(picked.addresses) + list(viewed.addresses)
    assert not isinstance(joined([picked, list(viewed)]), PoolViews)  # a plain part: addresses found the slow way
    put(reserved, [2], tier.view([key(1)]))  # a slot found on a second try (after evicting) fills the gap
    assert list(reserved.addresses) == list(buffer_addresses(list(reserved)))
    plain = [None, None]
    put(plain, [1], tier.view([key(0)]))
    assert plain[0] is None and buffer_addresses([plain[1]])[0] == buffer_addresses([tier.view([key(0)])[0]])[0]


def test_buffer_and_locate_address_the_same_bytes(make_tier: Make) -> None:
    tier = make_tier()
    tier.put([key(0), key(1)], [block(0, 5000), block(1, 300)])
    pool = tier.buffer()
    located = tier.locate([key(0), key(1), key(2)])
    assert located[2] is None
    for i, loc in enumerate(located[:2]):
        assert loc is not None
        offset, nbytes = loc
        assert bytes(pool[offset : offset + nbytes]) == block(i, nbytes).tobytes()
    assert len(pool) == tier.usage().capacity_bytes


def test_evict_while_reading_defers_reuse_of_the_slot(make_tier: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = make_tier(capacity=MIB, chunk=MIB)
    tier.put([key(0)], [block(0)])
    (where,) = tier.locate([key(0)])
    reading, evicted = threading.Event(), threading.Event()
    real_copyto = np.copyto

    def slow_copyto(dst: np.ndarray, src: np.ndarray) -> None:
        if threading.current_thread().name == "reader":
            reading.set()
            assert evicted.wait(5)
        real_copyto(dst, src)

    monkeypatch.setattr(tier_module.np, "copyto", slow_copyto)
    out = np.zeros(8192, np.uint8)
    results: list[list[bool]] = []
    reader = threading.Thread(target=lambda: results.append(tier.get_into([key(0)], [out])), name="reader")
    reader.start()
    assert reading.wait(5)
    assert tier.evict([key(0)]) == 1
    assert tier.put([key(1)], [block(1)]) == [True]
    assert tier.locate([key(1)])[0] != where  # the slot being read was not handed out again
    evicted.set()
    reader.join(5)
    assert results == [[True]] and (out == block(0)).all()
    assert tier.put([key(2)], [block(2)]) == [True]
    assert tier.locate([key(2)])[0] == where  # freed once the reader left


def test_concurrent_put_get_evict_never_serves_wrong_bytes(make_tier: Make) -> None:
    tier = make_tier(capacity=2 * MIB, chunk=MIB)
    size = 16384
    expected = {i: block(i, size) for i in range(64)}
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        out = np.empty(size, np.uint8)
        for _ in range(400):
            i = rng.randrange(64)
            op = rng.random()
            if op < 0.4:
                tier.put([key(i)], [expected[i]])
            elif op < 0.8:
                if tier.get_into([key(i)], [out])[0] and not (out == expected[i]).all():
                    errors.append(f"block {i} came back with other bytes")
            else:
                tier.evict([key(i)])

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = tier._alloc.stats()  # every slot is accounted for by a stored block
    assert sum(stats.slots_used.values()) == tier.usage().blocks


def test_every_method_raises_closed_error_after_close(make_tier: Make) -> None:
    tier = make_tier()
    tier.put([key(0)], [block(0)])
    tier.close()
    tier.close()  # idempotent
    out = np.zeros(8192, np.uint8)
    calls = [
        lambda: tier.put([key(1)], [block(1)]),
        lambda: tier.get_into([key(0)], [out]),
        lambda: tier.contains([key(0)]),
        lambda: tier.evict([key(0)]),
        tier.usage,
        lambda: tier.reserve([key(1)], 10),
        lambda: tier.commit([key(1)]),
        lambda: tier.abort([key(1)]),
        lambda: tier.view([key(0)]),
        tier.buffer,
        lambda: tier.locate([key(0)]),
    ]
    for call in calls:
        with pytest.raises(ClosedError, match="dram tier .* is closed"):
            call()


def test_unnamed_pool_is_unlinked_on_close(make_tier: Make, tmp_path: Path) -> None:
    tier = make_tier()
    path = tier.pool_path
    assert path.parent == tmp_path and path.name.startswith(f"pegaflow-anon-{os.getpid()}-")
    assert path.stat().st_size == 4096 + 8 * MIB
    tier.close()
    assert not path.exists()


def test_named_pool_is_kept_locked_and_reattached(make_tier: Make, tmp_path: Path) -> None:
    tier = make_tier(pool_name="warm")
    assert tier.pool_path == tmp_path / "pegaflow-warm.pool"
    with pytest.raises(ConfigError, match="in use by another process"):
        make_tier(pool_name="warm")
    tier.close()
    assert tier.pool_path.exists()
    header = read_header(tier.pool_path.read_bytes()[:4096])
    assert header is not None and (header.chunk_bytes, header.chunks) == (MIB, 8)
    again = make_tier(pool_name="warm")
    assert again._pool.reattached
    again.close()
    bigger = make_tier(pool_name="warm", capacity=16 * MIB)  # other geometry: started afresh
    assert not bigger._pool.reattached and bigger.usage().capacity_bytes == 16 * MIB


def test_foreign_file_under_the_pool_name_is_not_clobbered(make_tier: Make, tmp_path: Path) -> None:
    (tmp_path / "pegaflow-mine.pool").write_bytes(b"precious data")
    with pytest.raises(ConfigError, match=f"is not a pegaflow pool \\(no {MAGIC!r} header\\)"):
        make_tier(pool_name="mine")
    assert (tmp_path / "pegaflow-mine.pool").read_bytes() == b"precious data"


def test_options_are_validated_with_the_key_named() -> None:
    with pytest.raises(InvalidArgument, match="capacity: expected a size above 0"):
        DramOptions(capacity=Size(-1))
    with pytest.raises(InvalidArgument, match="chunk: expected a positive multiple of 4096"):
        DramOptions(chunk=Size(1000))
    with pytest.raises(InvalidArgument, match="pin: expected 'auto', 'always' or 'never'"):
        DramOptions(pin="sometimes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="numa: expected 'auto', null or a NUMA node number"):
        DramOptions(numa=-2)
    with pytest.raises(InvalidArgument, match="pool_name: expected letters, digits"):
        DramOptions(pool_name="../etc")


def test_yaml_options_go_through_the_config_loader() -> None:
    from pegaflow_core.config import options_from_mapping

    options = options_from_mapping(
        DramOptions, {"capacity": "2gb", "chunk": "2mb", "numa": None, "pool_name": "warm"}, file="x.yaml", path="tiers[0]"
    )
    assert (options.capacity, options.chunk, options.numa, options.pool_name) == (2 << 30, 2 << 20, None, "warm")
    with pytest.raises(ConfigError, match=r"x.yaml: tiers\[0\].chunk: expected a positive multiple of 4096"):
        options_from_mapping(DramOptions, {"chunk": 1000}, file="x.yaml", path="tiers[0]")
    with pytest.raises(ConfigError, match=r"tiers\[0\].pin: expected"):
        options_from_mapping(DramOptions, {"pin": "sometimes"}, file="x.yaml", path="tiers[0]")


def test_capacity_smaller_than_a_chunk_is_refused(make_tier: Make) -> None:
    with pytest.raises(ConfigError, match=r"capacity: capacity 1000000 bytes .* smaller than one chunk of 1048576"):
        make_tier(capacity=1_000_000)


def test_auto_capacity_is_a_quarter_of_available_memory(make_tier: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tier_module, "mem_available", lambda: 40 * MIB + 123)
    tier = make_tier(capacity="auto", populate=False)
    assert tier.usage().capacity_bytes == 10 * MIB


def test_pin_always_without_gpu_fails_clearly(make_tier: Make) -> None:
    from pegaflow_dram import pinning

    if pinning.gpu_present():
        pytest.skip("a GPU is present here; this test checks the no-GPU error")
    with pytest.raises(ConfigError, match="pin: 'always' but the pool cannot be pinned: no NVIDIA GPU"):
        make_tier(pin="always")
    tier = make_tier(pin="auto")
    assert not tier.pinned and MemoryKind.PINNED_HOST not in tier.capabilities.memory


def test_hugepages_on_plain_directory_fails_clearly(make_tier: Make) -> None:
    with pytest.raises(ConfigError, match="hugepages: true needs shm_dir on a hugetlbfs mount"):
        make_tier(hugepages=True)


def test_explicit_numa_node_binds_or_is_refused(make_tier: Make) -> None:
    from pegaflow_dram import numa

    node = numa.online_nodes()[0]
    tier = make_tier(numa=node)
    assert f"bound to NUMA node {node}" in tier._pool.detail
    with pytest.raises(ConfigError, match="numa: expected 'auto', null or one of the nodes"):
        make_tier(numa=999)


def test_availability_reports_shared_memory_and_pinning() -> None:
    result = DramTier.availability()
    assert result.ok and "shared memory" in result.detail and "pinning:" in result.detail


def test_reattached_pool_keeps_its_bytes_for_a_later_warm_restart(make_tier: Make) -> None:
    tier = make_tier(pool_name="keep")
    tier.put([key(0)], [block(0)])
    (where,) = tier.locate([key(0)])
    assert where is not None
    tier.close()
    again = make_tier(pool_name="keep")  # index recovery is a later issue; the raw bytes must survive
    offset, nbytes = where
    assert bytes(again.buffer()[offset : offset + nbytes]) == block(0).tobytes()


def test_populate_falls_back_to_touching_pages(make_tier: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    from pegaflow_dram import poolfile

    monkeypatch.setattr(poolfile, "_MADV_POPULATE_WRITE", 0x7FFF)  # an advice the kernel rejects (EINVAL)
    tier = make_tier()
    assert "pre-faulting in the background" in tier._pool.detail
    assert tier.wait_ready(30)
    assert tier.put([key(0)], [block(0)]) == [True]


def test_pin_always_on_a_gpu_machine_pins_the_pool(make_tier: Make) -> None:
    from pegaflow_dram import pinning

    if not pinning.gpu_present():
        pytest.skip("no NVIDIA GPU on this machine; pinning needs one")
    tier = make_tier(pin="always", shm_dir="/dev/shm")  # CUDA registers tmpfs mappings, not disk files
    assert tier.pinned and MemoryKind.PINNED_HOST in tier.capabilities.memory
    assert tier.put([key(0)], [block(0)]) == [True]


def test_pin_always_explains_a_disk_backed_shm_dir(make_tier: Make, tmp_path: Path) -> None:
    from pegaflow_dram import pinning
    from pegaflow_dram.poolfile import filesystem_of

    if not pinning.gpu_present():
        pytest.skip("no NVIDIA GPU on this machine; pinning needs one")
    if filesystem_of(tmp_path) in ("tmpfs", "hugetlbfs"):
        pytest.skip(f"{tmp_path} is on a memory filesystem here; the case needs a disk-backed directory")
    with pytest.raises(ConfigError, match="pinning needs shm_dir on a tmpfs"):
        make_tier(pin="always")
