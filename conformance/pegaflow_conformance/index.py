"""``IndexContract``: what every Index must do (locations, leases, recency).

Subclass it in a class named ``Test*`` and override ``index_factory`` to return ``factory() -> Index``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from pegaflow_core.errors import InvalidArgument
from pegaflow_core.index import Index, IndexStats, Lease, Location

from ._util import make_keys

IndexFactory = Callable[[], Index]
DRAM = Location("dram", "", 4096)
SSD = Location("ssd", "", 4096)


class IndexContract:
    """Contract tests for ``pegaflow_core.index.Index``."""

    pytestmark = pytest.mark.pegaflow_conformance

    @pytest.fixture
    def index_factory(self) -> IndexFactory:
        """Override: return ``factory() -> Index`` building a fresh, empty index."""
        raise NotImplementedError(
            f"{type(self).__name__} must override the 'index_factory' fixture: return a callable "
            "factory() -> Index that builds a fresh, empty index"
        )

    @pytest.fixture
    def index(self, index_factory) -> Iterator[Index]:
        index = index_factory()
        assert isinstance(index, Index), f"index_factory returned {type(index).__name__}, not an Index"
        yield index
        index.close()

    # -- insert / lookup -------------------------------------------------------------------
    def test_insert_and_lookup(self, index) -> None:
        keys = make_keys(3)
        index.insert([(keys[0], DRAM), (keys[1], SSD)])
        assert index.lookup(keys) == [(DRAM,), (SSD,), ()]
        assert index.lookup([]) == []

    def test_lookup_here_knows_what_was_inserted_here(self, index) -> None:
        keys = make_keys(3)
        index.insert([(keys[0], DRAM), (keys[1], SSD)])
        assert index.lookup_here(keys) == [(DRAM,), (SSD,), ()]

    def test_several_locations_per_key(self, index) -> None:
        key = make_keys(1)[0]
        remote = Location("dram", "node-b", 4096, checksum=7)
        index.insert([(key, DRAM), (key, SSD), (key, remote)])
        assert set(index.lookup([key])[0]) == {DRAM, SSD, remote}
        assert index.stats().blocks == 1

    def test_insert_replaces_same_tier_and_node(self, index) -> None:
        key = make_keys(1)[0]
        index.insert([(key, Location("dram", "", 4096, checksum=1))])
        index.insert([(key, Location("dram", "", 8192, checksum=2))])
        assert index.lookup([key]) == [(Location("dram", "", 8192, checksum=2),)]

    def test_a_location_keeps_its_offset(self, index) -> None:
        """Peers read a block at the offset its owner published, before its Pin answers."""
        keys = make_keys(2)
        placed = Location("dram", "node-b", 4096, checksum=2**64 - 1, offset=3 << 40)
        index.insert([(keys[0], placed), (keys[1], DRAM)])
        assert index.lookup(keys) == [(placed,), (DRAM,)]
        assert index.lookup(keys)[1][0].offset == -1

    def test_lookup_does_not_touch_recency(self, index) -> None:
        keys = make_keys(3)
        index.insert([(k, DRAM) for k in keys])
        index.lookup(keys[:1])
        assert index.victims("dram", 3) == keys

    # -- acquire / release -----------------------------------------------------------------
    def test_acquire_longest_prefix_stops_at_first_miss(self, index) -> None:
        keys = make_keys(5)
        index.insert([(keys[i], DRAM) for i in (0, 1, 3, 4)])
        lease = index.acquire(keys, ttl_s=30)
        assert isinstance(lease, Lease)
        assert lease.keys == tuple(keys[:2]) and lease.hits == 2
        assert lease.locations == ((DRAM,), (DRAM,))
        assert index.is_pinned(keys) == [True, True, False, False, False]
        assert lease.expires_at > time.monotonic()

    def test_acquire_with_no_hit_is_valid(self, index) -> None:
        keys = make_keys(2)
        index.insert([(keys[1], DRAM)])
        lease = index.acquire(keys, ttl_s=30)
        assert lease.hits == 0 and lease.keys == ()
        assert index.is_pinned(keys) == [False, False]
        assert index.release(lease.lease_id) is True
        assert index.release(lease.lease_id) is False

    def test_pinned_keys_are_never_victims(self, index) -> None:
        keys = make_keys(4)
        index.insert([(k, DRAM) for k in keys])
        lease = index.acquire(keys[:2], ttl_s=30)
        assert index.victims("dram", 10) == keys[2:]
        assert index.stats() == IndexStats(blocks=4, pinned=2, leases=1)
        assert index.release(lease.lease_id) is True
        assert index.is_pinned(keys) == [False] * 4
        assert index.release(lease.lease_id) is False, "a second release must answer False"
        assert set(index.victims("dram", 10)) == set(keys)

    def test_two_leases_pin_until_both_released(self, index) -> None:
        keys = make_keys(2)
        index.insert([(k, DRAM) for k in keys])
        first = index.acquire(keys, ttl_s=30)
        second = index.acquire(keys[:1], ttl_s=30)
        assert first.lease_id != second.lease_id
        index.release(first.lease_id)
        assert index.is_pinned(keys) == [True, False]
        assert index.stats().pinned == 1 and index.stats().leases == 1
        index.release(second.lease_id)
        assert index.stats().pinned == 0 and index.stats().leases == 0

    def test_release_unknown_lease(self, index) -> None:
        assert index.release("no-such-lease") is False

    def test_expire_by_deadline(self, index) -> None:
        keys = make_keys(2)
        index.insert([(k, DRAM) for k in keys])
        short = index.acquire(keys[:1], ttl_s=5)
        long = index.acquire(keys[1:], ttl_s=500)
        assert index.expire(now=time.monotonic()) == 0
        assert index.expire(now=short.expires_at + 1) == 1
        assert index.is_pinned(keys) == [False, True]
        assert index.release(short.lease_id) is False, "an expired lease cannot be released"
        assert index.expire(now=long.expires_at + 1) == 1
        assert index.stats().leases == 0 and index.stats().pinned == 0

    def test_expire_uses_the_clock_by_default(self, index) -> None:
        keys = make_keys(1)
        index.insert([(keys[0], DRAM)])
        lease = index.acquire(keys, ttl_s=0.05)
        assert lease.expires_at <= time.monotonic() + 0.05 + 1e-3
        time.sleep(0.1)
        assert index.expire() == 1
        assert index.is_pinned(keys) == [False]

    def test_release_owner(self, index) -> None:
        keys = make_keys(3)
        index.insert([(k, DRAM) for k in keys])
        a1 = index.acquire(keys[:1], ttl_s=30, owner="client-a")
        index.acquire(keys[1:2], ttl_s=30, owner="client-a")
        b = index.acquire(keys[2:], ttl_s=30, owner="client-b")
        assert a1.owner == "client-a"
        assert index.release_owner("client-a") == 2
        assert index.is_pinned(keys) == [False, False, True]
        assert index.release_owner("client-a") == 0
        assert index.release_owner("nobody") == 0
        assert index.release(b.lease_id) is True

    # -- remove ----------------------------------------------------------------------------
    def test_remove_all_locations(self, index) -> None:
        keys = make_keys(3)
        index.insert([(keys[0], DRAM), (keys[0], SSD), (keys[1], DRAM)])
        assert index.remove(keys) == 2
        assert index.lookup(keys) == [(), (), ()]
        assert index.stats().blocks == 0

    def test_remove_filtered_by_tier_and_node(self, index) -> None:
        key, other = make_keys(2)
        remote = Location("dram", "node-b")
        index.insert([(key, DRAM), (key, SSD), (key, remote), (other, SSD)])
        assert index.remove([key, other], tier="dram", node="node-b") == 1
        assert set(index.lookup([key])[0]) == {DRAM, SSD}
        assert index.remove([key, other], tier="ssd") == 2
        assert index.lookup([key, other]) == [(DRAM,), ()]
        index.insert([(key, remote)])
        assert index.remove([key], node="") == 1
        assert index.lookup([key]) == [(remote,)]
        assert index.victims("dram", 10) == []
        assert index.victims("dram", 10, node="node-b") == [key]

    def test_remove_pinned_key(self, index) -> None:
        keys = make_keys(1)
        index.insert([(keys[0], DRAM)])
        lease = index.acquire(keys, ttl_s=30)
        assert index.remove(keys) == 1
        assert index.lookup(keys) == [()]
        assert index.release(lease.lease_id) is True
        assert index.stats() == IndexStats(0, 0, 0)

    # -- recency ---------------------------------------------------------------------------
    def test_victims_lru_order(self, index) -> None:
        keys = make_keys(5)
        for k in keys:
            index.insert([(k, DRAM)])
        assert index.victims("dram", 5) == keys
        assert index.victims("dram", 2) == keys[:2]
        assert index.victims("dram", 0) == []
        assert index.victims("ssd", 5) == []

    def test_acquire_and_insert_make_keys_recent(self, index) -> None:
        keys = make_keys(5)
        for k in keys:
            index.insert([(k, DRAM)])
        index.release(index.acquire(keys[:2], ttl_s=30).lease_id)
        assert index.victims("dram", 5) == keys[2:] + keys[:2]
        index.insert([(keys[2], DRAM)])
        assert index.victims("dram", 5) == keys[3:] + keys[:3]

    def test_victims_only_on_requested_tier(self, index) -> None:
        keys = make_keys(3)
        index.insert([(keys[0], DRAM), (keys[1], SSD), (keys[2], DRAM), (keys[2], SSD)])
        assert index.victims("dram", 5) == [keys[0], keys[2]]
        assert index.victims("ssd", 5) == [keys[1], keys[2]]

    # -- bad input -------------------------------------------------------------------------
    def test_non_blockkey_is_invalid(self, index) -> None:
        with pytest.raises(InvalidArgument, match=r"(?i)key"):
            index.insert([(("ns", b"\x01", 0), DRAM)])
        with pytest.raises(InvalidArgument, match=r"(?i)key"):
            index.lookup(["nope"])
        with pytest.raises(InvalidArgument, match=r"(?i)key"):
            index.acquire([b"nope"], ttl_s=30)
        assert index.stats() == IndexStats(0, 0, 0)

    def test_insert_bad_batch_inserts_nothing(self, index) -> None:
        keys = make_keys(2)
        with pytest.raises(InvalidArgument):
            index.insert([(keys[0], DRAM), (keys[1], "not a location")])
        assert index.lookup(keys) == [(), ()]

    @pytest.mark.parametrize("ttl", [0, -1.0])
    def test_ttl_must_be_positive(self, index, ttl) -> None:
        keys = make_keys(1)
        index.insert([(keys[0], DRAM)])
        with pytest.raises(InvalidArgument, match=r"(?i)ttl"):
            index.acquire(keys, ttl_s=ttl)
        assert index.stats().leases == 0 and index.is_pinned(keys) == [False]

    # -- concurrency -----------------------------------------------------------------------
    def test_concurrent_acquire_release(self, index) -> None:
        keys = make_keys(32)
        index.insert([(k, DRAM) for k in keys])
        errors: list[BaseException] = []
        barrier = threading.Barrier(4)

        def worker(offset: int) -> None:
            try:
                barrier.wait()
                for i in range(200):
                    start = (offset * 7 + i) % 16
                    lease = index.acquire(keys[start : start + 8], ttl_s=30, owner=f"w{offset}")
                    assert lease.hits == 8
                    assert all(index.is_pinned(list(lease.keys)))
                    assert index.release(lease.lease_id) is True
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "index deadlocked under concurrent use"
        if errors:
            raise errors[0]
        assert index.stats() == IndexStats(blocks=32, pinned=0, leases=0)

    # -- stateful --------------------------------------------------------------------------
    @pytest.mark.pegaflow_stateful
    def test_stateful(self, index_factory) -> None:
        from .stateful import run_index_state_machine

        run_index_state_machine(index_factory)
