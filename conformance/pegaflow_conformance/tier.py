"""``TierContract``: what every Tier must do, whatever it stores its bytes in.

Subclass it in a class named ``Test*`` and override ``tier_factory``::

    class TestMyTier(TierContract):
        @pytest.fixture
        def tier_factory(self, tmp_path):
            return lambda capacity_bytes: MyTier(MyTier.Options(path=tmp_path, capacity=capacity_bytes))

Every test closes the tiers it opens. Bytes are always checked against what the test put, never
against another call of the same tier.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from pegaflow_core.errors import ClosedError, InvalidArgument
from pegaflow_core.keys import BlockKey
from pegaflow_core.tier import Tier, TierUsage

from ._util import make_keys, random_blocks

TierFactory = Callable[[int], Tier]


class TierContract:
    """Contract tests for ``pegaflow_core.tier.Tier``."""

    pytestmark = pytest.mark.pegaflow_conformance

    #: Block sizes every byte round-trip test runs with.
    block_sizes: tuple[int, ...] = (4096, 65536)
    #: Size used by tests that do not care about block size.
    small_block: int = 4096
    #: Roomy capacity for tests that must never hit capacity.
    roomy_capacity: int = 64 * 1024 * 1024

    @pytest.fixture
    def tier_factory(self, tmp_path) -> TierFactory:
        """Override: return ``factory(capacity_bytes) -> Tier``. Calling it again after the tier
        was closed must reopen the same storage (persistent tiers keep their blocks)."""
        raise NotImplementedError(
            f"{type(self).__name__} must override the 'tier_factory' fixture: return a callable "
            "factory(capacity_bytes: int) -> Tier that builds your tier on tmp_path"
        )

    @pytest.fixture
    def open_tier(self, tier_factory) -> Iterator[TierFactory]:
        """``tier_factory`` that closes every tier it built at teardown."""
        opened: list[Tier] = []

        def factory(capacity_bytes: int) -> Tier:
            tier = tier_factory(capacity_bytes)
            assert isinstance(tier, Tier), f"tier_factory returned {type(tier).__name__}, not a Tier"
            opened.append(tier)
            return tier

        yield factory
        for tier in opened:
            try:
                tier.close()
            except ClosedError:
                pass

    @pytest.fixture
    def tier(self, open_tier) -> Tier:
        return open_tier(self.roomy_capacity)

    # -- helpers ---------------------------------------------------------------------------
    # Capabilities are read from the instance: a backend may declare them per configuration
    # (a named DRAM pool is persistent, an unnamed one is not).
    def _require_host_views(self, tier: Tier) -> None:
        if not tier.capabilities.host_views:
            pytest.skip(f"{type(tier).__name__} does not declare capabilities.host_views")

    def _require_persistent(self, tier: Tier) -> None:
        if not tier.capabilities.persistent:
            pytest.skip(f"{type(tier).__name__} does not declare capabilities.persistent")

    @staticmethod
    def _read(tier: Tier, keys: list[BlockKey], size: int) -> tuple[list[bool], list[bytes]]:
        dests = [bytearray(size) for _ in keys]
        hits = tier.get_into(keys, dests)
        assert isinstance(hits, list) and len(hits) == len(keys), f"get_into must answer one bool per key, got {hits!r}"
        return hits, [bytes(d) for d in dests]

    def _assert_stored(self, tier: Tier, keys: list[BlockKey], blocks: list[bytes]) -> None:
        hits, got = self._read(tier, keys, len(blocks[0]))
        assert hits == [True] * len(keys), "a stored block was reported as a miss"
        for i, (want, have) in enumerate(zip(blocks, got)):
            assert have == want, f"block {i} read back different bytes"

    # -- round trips -----------------------------------------------------------------------
    def test_round_trip_each_block_size(self, tier) -> None:
        for size in self.block_sizes:
            keys = make_keys(5, salt=size.to_bytes(4, "little"))
            blocks = random_blocks(5, size)
            assert tier.put(keys, blocks) == [True] * 5
            self._assert_stored(tier, keys, blocks)

    def test_get_into_numpy_and_bytearray_destinations(self, tier) -> None:
        keys = make_keys(6)
        blocks = random_blocks(6, self.small_block)
        assert tier.put(keys, [np.frombuffer(b, dtype=np.uint8) for b in blocks[:3]] + blocks[3:]) == [True] * 6
        dests = [np.zeros(self.small_block, dtype=np.uint8) for _ in range(3)] + [bytearray(self.small_block) for _ in range(3)]
        assert tier.get_into(keys, dests) == [True] * 6
        for want, dest in zip(blocks, dests):
            assert bytes(dest) == want

    def test_get_into_views_of_one_big_buffer(self, tier) -> None:
        keys = make_keys(4)
        blocks = random_blocks(4, self.small_block)
        tier.put(keys, blocks)
        staging = np.full(4 * self.small_block + 16, 0xAB, dtype=np.uint8)
        dests = [staging[8 + i * self.small_block : 8 + (i + 1) * self.small_block] for i in range(4)]
        assert tier.get_into(keys, dests) == [True] * 4
        assert staging[:8].tobytes() == b"\xab" * 8 and staging[-8:].tobytes() == b"\xab" * 8
        assert staging[8:-8].tobytes() == b"".join(blocks)

    def test_empty_batches(self, tier) -> None:
        assert tier.put([], []) == []
        assert tier.get_into([], []) == []
        assert tier.contains([]) == []
        assert tier.evict([]) == 0

    def test_partial_hits_are_a_mask(self, tier) -> None:
        keys = make_keys(6)
        blocks = random_blocks(6, self.small_block)
        stored = [0, 2, 5]
        tier.put([keys[i] for i in stored], [blocks[i] for i in stored])
        dests = [bytearray(b"\x5a" * self.small_block) for _ in keys]
        hits = tier.get_into(keys, dests)
        assert hits == [i in stored for i in range(6)]
        for i, dest in enumerate(dests):
            if i in stored:
                assert bytes(dest) == blocks[i]
            else:
                assert bytes(dest) == b"\x5a" * self.small_block, "a miss must leave its destination untouched"

    def test_contains(self, tier) -> None:
        keys = make_keys(4)
        tier.put(keys[:2], random_blocks(2, self.small_block))
        assert tier.contains(keys) == [True, True, False, False]

    def test_keys_differ_by_namespace_and_shard(self, tier) -> None:
        base = make_keys(1)[0]
        other_ns = BlockKey(base.namespace + "-other", base.block_hash, base.shard)
        other_shard = BlockKey(base.namespace, base.block_hash, base.shard + 1)
        blocks = random_blocks(3, self.small_block)
        assert tier.put([base, other_ns, other_shard], blocks) == [True] * 3
        self._assert_stored(tier, [base, other_ns, other_shard], blocks)

    def test_put_existing_key_answers_true_and_keeps_bytes(self, tier) -> None:
        key = make_keys(1)
        first, second = random_blocks(2, self.small_block)
        assert tier.put(key, [first]) == [True]
        used = tier.usage()
        assert tier.put(key, [second]) == [True]
        self._assert_stored(tier, key, [first])
        assert tier.usage() == used, "re-putting a stored key must not change usage"

    def test_duplicate_key_within_one_batch(self, tier) -> None:
        key = make_keys(1)[0]
        first, second = random_blocks(2, self.small_block)
        assert tier.put([key, key], [first, second]) == [True, True]
        hits, got = self._read(tier, [key], self.small_block)
        assert hits == [True] and got[0] in (first, second)
        assert tier.usage().blocks == 1

    def test_put_copies_the_source(self, tier) -> None:
        key = make_keys(1)
        src = bytearray(random_blocks(1, self.small_block)[0])
        want = bytes(src)
        tier.put(key, [src])
        src[:] = b"\x00" * len(src)
        self._assert_stored(tier, key, [want])

    # -- capacity and eviction -------------------------------------------------------------
    def _fill(self, tier: Tier, size: int, limit: int) -> tuple[list[BlockKey], list[bytes], list[BlockKey]]:
        stored_keys: list[BlockKey] = []
        stored_blocks: list[bytes] = []
        refused: list[BlockKey] = []
        for round_ in range(limit):
            keys = make_keys(2, salt=round_.to_bytes(4, "little"))
            blocks = random_blocks(2, size)
            answers = tier.put(keys, blocks)
            assert len(answers) == 2
            for key, block, ok in zip(keys, blocks, answers):
                if ok:
                    stored_keys.append(key)
                    stored_blocks.append(block)
                else:
                    refused.append(key)
            if refused:
                return stored_keys, stored_blocks, refused
        pytest.fail(f"a tier of capacity {8 * size} accepted {2 * limit} blocks of {size} bytes")

    def test_capacity_put_answers_false_when_full(self, open_tier) -> None:
        size = self.small_block
        tier = open_tier(8 * size)
        keys, blocks, refused = self._fill(tier, size, limit=64)
        assert keys, "a tier with room for 8 blocks stored none"
        self._assert_stored(tier, keys, blocks)
        assert tier.contains(refused) == [False] * len(refused), "a refused block must not be stored"
        usage = tier.usage()
        assert isinstance(usage, TierUsage)
        assert usage.capacity_bytes == 8 * size
        assert 0 < usage.used_bytes <= usage.capacity_bytes
        assert usage.blocks == len(keys)
        assert usage.used_bytes >= len(keys) * size

    def test_evict_frees_room(self, open_tier) -> None:
        size = self.small_block
        tier = open_tier(8 * size)
        keys, blocks, _ = self._fill(tier, size, limit=64)
        before = tier.usage()
        assert tier.evict(keys[:2]) == 2
        after = tier.usage()
        assert after.blocks == before.blocks - 2 and after.used_bytes < before.used_bytes
        assert tier.contains(keys[:2]) == [False, False]
        assert self._read(tier, keys[:2], size)[0] == [False, False]
        new_keys = make_keys(2, salt=b"new")
        new_blocks = random_blocks(2, size)
        assert tier.put(new_keys, new_blocks) == [True, True], "evicting two blocks must make room for two"
        self._assert_stored(tier, keys[2:] + new_keys, blocks[2:] + new_blocks)

    def test_evict_ignores_missing_keys(self, tier) -> None:
        keys = make_keys(3)
        blocks = random_blocks(1, self.small_block)
        tier.put(keys[:1], blocks)
        assert tier.evict(keys[1:]) == 0
        assert tier.evict([keys[0], keys[1], keys[0]]) == 1
        assert tier.usage().blocks == 0 and tier.usage().used_bytes == 0

    def test_usage_counts_blocks(self, tier) -> None:
        assert tier.usage().blocks == 0 and tier.usage().used_bytes == 0
        tier.put(make_keys(3), random_blocks(3, self.small_block))
        usage = tier.usage()
        assert usage.blocks == 3 and usage.used_bytes >= 3 * self.small_block
        assert usage.capacity_bytes == self.roomy_capacity

    # -- bad input -------------------------------------------------------------------------
    def test_put_length_mismatch_stores_nothing(self, tier) -> None:
        keys = make_keys(3)
        with pytest.raises(InvalidArgument, match=r"(?i)keys|blocks|length|mismatch|match"):
            tier.put(keys, random_blocks(2, self.small_block))
        assert tier.contains(keys) == [False] * 3
        assert tier.usage().blocks == 0

    def test_put_non_blockkey_stores_nothing(self, tier) -> None:
        keys: list = make_keys(2)
        bad = keys[:1] + [("ns", b"\x01", 0)] + keys[1:]
        with pytest.raises(InvalidArgument, match=r"(?i)key"):
            tier.put(bad, random_blocks(3, self.small_block))
        assert tier.contains(keys) == [False, False]
        assert tier.usage().blocks == 0

    def test_put_non_buffer_stores_nothing(self, tier) -> None:
        keys = make_keys(2)
        with pytest.raises(InvalidArgument):
            tier.put(keys, [random_blocks(1, self.small_block)[0], 12345])
        assert tier.contains(keys) == [False, False]

    def test_get_into_length_mismatch(self, tier) -> None:
        keys = make_keys(2)
        tier.put(keys, random_blocks(2, self.small_block))
        with pytest.raises(InvalidArgument):
            tier.get_into(keys, [bytearray(self.small_block)])

    def test_get_into_non_blockkey(self, tier) -> None:
        with pytest.raises(InvalidArgument, match=r"(?i)key"):
            tier.get_into(["not a key"], [bytearray(self.small_block)])
        with pytest.raises(InvalidArgument, match=r"(?i)key"):
            tier.contains([b"not a key"])

    def test_wrong_size_destination_is_left_untouched(self, tier) -> None:
        keys = make_keys(2)
        blocks = random_blocks(2, self.small_block)
        tier.put(keys, blocks)
        good = bytearray(b"\x11" * self.small_block)
        short = bytearray(b"\x22" * (self.small_block - 1))
        with pytest.raises(InvalidArgument, match=r"(?i)size|bytes|length"):
            tier.get_into(keys, [good, short])
        assert bytes(short) == b"\x22" * (self.small_block - 1)
        assert bytes(good) == b"\x11" * self.small_block, "a failed batch must write no destination"
        self._assert_stored(tier, keys, blocks)

    def test_read_only_destination(self, tier) -> None:
        keys = make_keys(1)
        blocks = random_blocks(1, self.small_block)
        tier.put(keys, blocks)
        with pytest.raises(InvalidArgument, match=r"(?i)read-only|writable|readonly"):
            tier.get_into(keys, [bytes(self.small_block)])
        self._assert_stored(tier, keys, blocks)

    # -- concurrency -----------------------------------------------------------------------
    def test_concurrent_put_and_get(self, tier) -> None:
        size = self.small_block
        keys = make_keys(24)
        blocks = random_blocks(24, size)
        truth = dict(zip(keys, blocks))
        errors: list[BaseException] = []
        barrier = threading.Barrier(4)

        def worker(seed: int) -> None:
            try:
                barrier.wait()
                rng = np.random.default_rng(seed)
                for _ in range(30):
                    picks = [keys[i] for i in rng.choice(len(keys), 4, replace=False)]
                    if rng.random() < 0.5:
                        tier.put(picks, [truth[k] for k in picks])
                    else:
                        dests = [bytearray(size) for _ in picks]
                        for key, dest, hit in zip(picks, dests, tier.get_into(picks, dests)):
                            assert not hit or bytes(dest) == truth[key], "a concurrent read returned wrong bytes"
            except BaseException as exc:  # collected and re-raised on the main thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "tier deadlocked under concurrent use"
        if errors:
            raise errors[0]
        stored = [k for k, hit in zip(keys, tier.contains(keys)) if hit]
        if stored:
            self._assert_stored(tier, stored, [truth[k] for k in stored])
        assert tier.usage().blocks == len(stored)

    # -- close / reopen --------------------------------------------------------------------
    def test_calls_after_close_raise_closed_error(self, tier) -> None:
        keys = make_keys(1)
        tier.put(keys, random_blocks(1, self.small_block))
        tier.close()
        with pytest.raises(ClosedError):
            tier.put(keys, random_blocks(1, self.small_block))
        with pytest.raises(ClosedError):
            tier.get_into(keys, [bytearray(self.small_block)])
        with pytest.raises(ClosedError):
            tier.contains(keys)
        with pytest.raises(ClosedError):
            tier.evict(keys)

    def test_close_is_idempotent(self, tier) -> None:
        tier.close()
        tier.close()

    def test_context_manager_closes(self, tier) -> None:
        with tier as same:
            assert same is tier
        with pytest.raises(ClosedError):
            tier.contains(make_keys(1))

    def test_persistent_tier_survives_reopen(self, open_tier) -> None:
        tier = open_tier(self.roomy_capacity)
        self._require_persistent(tier)
        keys = make_keys(4)
        blocks = random_blocks(4, self.small_block)
        assert tier.put(keys, blocks) == [True] * 4
        tier.evict(keys[3:])
        tier.close()
        reopened = open_tier(self.roomy_capacity)
        assert reopened.contains(keys) == [True, True, True, False]
        self._assert_stored(reopened, keys[:3], blocks[:3])
        assert reopened.usage().blocks == 3

    # -- capability: host_views ------------------------------------------------------------
    def test_host_views_reserve_commit(self, tier) -> None:
        self._require_host_views(tier)
        keys = make_keys(3)
        blocks = random_blocks(3, self.small_block)
        views = tier.reserve(keys, self.small_block)
        assert len(views) == 3 and all(v is not None for v in views)
        for view, block in zip(views, blocks):
            assert not view.readonly and view.nbytes == self.small_block
            view[:] = block
        assert tier.contains(keys) == [False] * 3, "reserved blocks must be invisible until commit"
        assert self._read(tier, keys, self.small_block)[0] == [False] * 3
        tier.commit(keys)
        assert tier.contains(keys) == [True] * 3
        self._assert_stored(tier, keys, blocks)
        got = tier.view(keys)
        assert [bytes(v) for v in got] == blocks
        assert all(v.readonly for v in got), "view() must hand out read-only views"

    def test_host_views_abort_frees(self, open_tier) -> None:
        size = self.small_block
        tier = open_tier(4 * size)
        self._require_host_views(tier)
        keys = make_keys(4)
        views = tier.reserve(keys, size)
        assert all(v is not None for v in views)
        tier.abort(keys)
        assert tier.contains(keys) == [False] * 4
        assert tier.usage().used_bytes == 0 and tier.usage().blocks == 0
        assert tier.put(keys, random_blocks(4, size)) == [True] * 4, "abort must give the room back"

    def test_host_views_reserve_when_full(self, open_tier) -> None:
        size = self.small_block
        tier = open_tier(4 * size)
        self._require_host_views(tier)
        views = tier.reserve(make_keys(16), size)
        assert 0 < sum(v is not None for v in views) <= 4
        assert views[-1] is None

    def test_host_views_view_of_missing_is_none(self, tier) -> None:
        self._require_host_views(tier)
        keys = make_keys(2)
        blocks = random_blocks(1, self.small_block)
        tier.put(keys[:1], blocks)
        got = tier.view(keys)
        assert got[1] is None and bytes(got[0]) == blocks[0]

    # -- stateful --------------------------------------------------------------------------
    @pytest.mark.pegaflow_stateful
    def test_stateful(self, tier_factory) -> None:
        from .stateful import run_tier_state_machine

        run_tier_state_machine(tier_factory)
