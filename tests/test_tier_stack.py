"""Several tiers in one daemon: eviction spills down, hits in a lower tier are promoted, and Query
says "loading" instead of making the engine wait on the lower tier."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest

from daemon_helpers import SMALL
from pegaflow_core.client import PegaflowClient
from pegaflow_core.config import parse_config
from pegaflow_core.errors import PegaflowError, PluginError
from pegaflow_core.index import Location
from pegaflow_core.keys import BlockKey
from pegaflow_core.launcher import DaemonProcess
from pegaflow_core.metrics import Metrics
from pegaflow_core.sim_engine import SimulatedEngine, block_hashes
from pegaflow_core.stack import TierStack

# top: 1 MiB = 64 blocks of 16 KiB; below it a second DRAM tier standing in for a slower one
TWO_TIERS = """
index: {kind: local}
tiers:
  - {kind: dram, capacity: 1mb, chunk: 256kb}
  - {kind: dram, name: lower, capacity: 16mb, chunk: 1mb}
"""


@pytest.fixture
def stack() -> Iterator[TierStack]:
    """The two tiers of TWO_TIERS in-process (no daemon): a TierStack with its own Metrics."""
    config = parse_config(TWO_TIERS, "test")
    tiers = [(c.name, c.build()) for c in config.tiers]
    try:
        yield TierStack(tiers, config.index.build(), Metrics())
    finally:
        for _, tier in tiers:
            tier.close()


def prompt(seed: int, blocks: int = 30) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(16 * blocks)]


def test_evicted_blocks_spill_down_and_come_back_exact():
    with DaemonProcess(TWO_TIERS) as daemon, PegaflowClient(daemon.endpoint) as client:
        engine = SimulatedEngine(client, SMALL, model="stack")
        for seed in range(5):  # 150 blocks through a 64-block top tier
            engine.prefill(prompt(seed))
        stats = client.stats()
        assert stats.counters["evictions_total{tier=dram}"] >= 86
        assert stats.tiers[1].blocks >= 86  # the evicted ones went down, not away
        first = block_hashes(prompt(0), 16)
        answer = client.query(engine.handle, first)
        assert answer.hit_blocks == 30 and answer.loading  # in the lower tier: promotion started
        deadline = time.monotonic() + 10
        while client.query(engine.handle, first).loading:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.release([answer.lease_id])
        again = engine.prefill(prompt(0), verify=True)  # raises if a promoted block is wrong
        assert again.hit_blocks == 30 and again.failed_blocks == 0
        assert client.stats().counters["bytes_total{direction=promote,tier=lower}"] > 0
        engine.close()


def test_a_load_before_promotion_finishes_promotes_synchronously():
    with DaemonProcess(TWO_TIERS) as daemon, PegaflowClient(daemon.endpoint) as client:
        engine = SimulatedEngine(client, SMALL, model="sync")
        for seed in range(4):
            engine.prefill(prompt(seed))
        assert engine.prefill(prompt(0), verify=True).hit_blocks == 30  # query, then load at once
        engine.close()


def test_polling_a_loading_query_promotes_each_block_once(stack):
    """An engine asks again and again while the answer is "loading": only the first answer may
    queue the promotion. Queued duplicates re-read every block from the lower tier (on an SSD,
    seconds per 10K-token prompt) and hold the daemon's worker threads."""
    tiers, metrics = stack.tiers, stack.metrics
    nbytes = 16 << 10
    keys = [BlockKey("ns", bytes([i]) * 32, 0) for i in range(8)]
    lower = tiers[1][1]
    assert all(lower.put(keys, [bytes([i]) * nbytes for i in range(8)]))
    stack.index.insert([(k, Location("lower", "", nbytes)) for k in keys])
    lease = stack.acquire(keys, 30.0, owner="t")
    queued: list[tuple] = []
    polls = [stack.start_promotion(lease.keys, nbytes, lambda *call: queued.append(call)) for _ in range(5)]
    assert polls == [True] * 5 and len(queued) == 1  # still loading; one promotion queued
    fn, *args = queued[0]
    fn(*args)
    assert stack.start_promotion(lease.keys, nbytes, lambda *call: queued.append(call)) is False
    assert len(queued) == 1
    assert [bytes(v[:1]) for v in stack.read_views(keys, nbytes)] == [bytes([i]) for i in range(8)]
    promoted = metrics.bytes.labels("lower", "promote")._value.get()
    assert promoted == 8 * nbytes


def test_eviction_drops_blocks_the_lower_tier_holds_before_writing_others_down(stack):
    """Clean first: within a window of the LRU order, blocks with a copy in the tier below (e.g.
    promoted back from the SSD) are evicted without a write before blocks that would have to be
    spilled; each promotion from an SSD then costs one read instead of a write and a read."""
    tiers, metrics = stack.tiers, stack.metrics
    nbytes = 16 << 10

    def fill(batches, landed):
        for positions, views in batches:
            for p, view in zip(positions, views):
                view[:] = bytes([p]) * nbytes

    dirty = [BlockKey("ns", b"d" * 31 + bytes([i]), 0) for i in range(2)]
    clean = [BlockKey("ns", b"c" * 31 + bytes([i]), 0) for i in range(2)]
    stack.save(dirty, nbytes, fill)  # older: only in the top tier
    stack.save(clean, nbytes, fill)  # newer, and also held below
    lower = tiers[1][1]
    assert all(lower.put(clean, [bytes(nbytes)] * 2))
    stack.index.insert([(k, Location("lower", "", nbytes)) for k in clean])
    assert stack.make_room(0, 2) == 2
    assert tiers[0][1].contains(dirty + clean) == [True, True, False, False]
    assert lower.contains(dirty) == [False, False]  # nothing was written down
    assert metrics.bytes.labels("lower", "spill")._value.get() == 0
    assert stack.make_room(0, 2) == 2  # no clean block left in the window: the LRU ones spill
    assert lower.contains(dirty) == [True, True]


def test_blocks_a_fill_reports_landed_are_visible_even_if_the_rest_of_it_fails(stack):
    """A copy path reports blocks as they land (the GPU lanes do, tile by tile), and the stack
    publishes them at once. If the copy fails later, what was published is whole and stays; the
    rest never appears, and its slots are free to save again."""
    nbytes = 16 << 10
    keys = [BlockKey("ns", b"p" * 31 + bytes([i]), 0) for i in range(4)]
    seen: list[list[bool]] = []

    def fill(batches, landed):
        (_, views), = batches
        for view in views[:2]:
            view[:] = b"\x07" * nbytes
        landed([0, 1])
        seen.append(stack.stored_here(keys))  # visible while the copy is still going
        raise RuntimeError("copy failed after two blocks")

    with pytest.raises(RuntimeError, match="after two blocks"):
        stack.save(keys, nbytes, fill)
    assert seen == [[True, True, False, False]]
    assert stack.stored_here(keys) == [True, True, False, False]
    assert [bytes(v[:1]) if v is not None else None for v in stack.tiers[0][1].view(keys)] == [b"\x07", b"\x07", None, None]

    def whole(batches, landed):
        for _, views in batches:
            for view in views:
                view[:] = b"\x09" * nbytes

    outcome = stack.save(keys, nbytes, whole)
    assert (outcome.stored, outcome.already_present) == (2, 2)
    assert stack.stored_here(keys) == [True] * 4


def test_a_save_reserves_slots_batch_by_batch_as_its_fill_draws_them(stack, monkeypatch):
    """The GPU lanes queue one batch's copies before drawing the next, so the reservation of later
    slots overlaps the first blocks' transfer: the first batch is small, later ones grow, each is
    reserved only when drawn, and ``landed`` counts the views of all batches in order."""
    from pegaflow_core.stack import FIRST_BATCH

    nbytes = 4 << 10
    keys = [BlockKey("ns", b"b" * 30 + i.to_bytes(2, "big"), 0) for i in range(100)]
    top = stack.tiers[0][1]
    reserved: list[int] = []
    real_reserve = top.reserve
    monkeypatch.setattr(top, "reserve", lambda ks, n: reserved.append(len(ks)) or real_reserve(ks, n))
    sizes, seen = [], []

    def fill(batches, landed):
        for n, (positions, views) in enumerate(batches):
            assert sum(reserved) == sum(sizes) + len(views)  # this batch's slots, none of the next's
            for p, view in zip(positions, views):
                view[:] = bytes([p]) * nbytes
            sizes.append(len(views))
            if n == 1:
                landed([FIRST_BATCH])  # the second batch's first block
                seen.append(stack.stored_here(keys[FIRST_BATCH - 1 : FIRST_BATCH + 2]))

    outcome = stack.save(keys, nbytes, fill)
    assert sizes == [FIRST_BATCH, 4 * FIRST_BATCH, 100 - 5 * FIRST_BATCH]
    assert seen == [[False, True, False]]  # visible as soon as reported, the others not yet
    assert outcome.stored == 100 and stack.stored_here(keys) == [True] * 100
    assert [bytes(v[:1]) for v in top.view(keys)] == [bytes([i]) for i in range(100)]


def test_a_fill_that_leaves_batches_undrawn_fails_and_leaves_nothing_reserved(stack):
    nbytes = 4 << 10
    keys = [BlockKey("ns", b"u" * 30 + i.to_bytes(2, "big"), 0) for i in range(40)]

    def first_only(batches, landed):
        next(iter(batches))

    with pytest.raises(PegaflowError, match="without drawing every batch"):
        stack.save(keys, nbytes, first_only)
    assert stack.stored_here(keys) == [False] * 40

    def whole(batches, landed):
        for _, views in batches:
            for view in views:
                view[:] = b"\x01" * nbytes

    assert stack.save(keys, nbytes, whole).stored == 40  # no slot or in-flight mark was left behind


def test_a_promotion_commits_the_checksums_the_lower_tier_verified(stack):
    """A lower tier that checked the bytes it delivered against their checksum (the remote tier,
    against the owner's) says so, and the top tier is committed with those checksums: it seals
    the block with them instead of hashing it again."""
    nbytes = 16 << 10
    keys = [BlockKey("ns", b"v" * 31 + bytes([i]), 0) for i in range(3)]
    lower = stack.tiers[1][1]
    assert all(lower.put(keys, [bytes([i]) * nbytes for i in range(3)]))
    stack.index.insert([(k, Location("lower", "", nbytes)) for k in keys])
    delivered = lower.get_into

    def get_into_located(wanted, dests, locations, verified=None):  # written before ``delivered`` existed
        hits = delivered(wanted, dests)
        for n, key in enumerate(wanted):
            if verified is not None and key != keys[1]:  # the middle one came unchecked
                verified[n] = 1000 + keys.index(key)
        return hits

    lower.get_into_located = get_into_located
    stack._delivers["lower"] = False  # as the stack finds it for such a tier's class
    lease = stack.acquire(keys, 30.0, owner="t")
    queued: list[tuple] = []
    assert stack.start_promotion(lease.keys, nbytes, lambda *call: queued.append(call), locations=lease.locations)
    fn, *args = queued[0]
    fn(*args)
    assert stack.tiers[0][1].checksums(keys) == [1000, None, 1002]


def test_blocks_a_lower_tier_delivers_early_are_served_before_its_call_returns(stack):
    """A lower tier that hands blocks over while the rest still move (the remote tier, batch by
    batch of one read) has them committed, indexed and sealed with their checksums at once; what
    it delivers counts as a hit even where its answer says otherwise (the rest of its read was
    cut), and the rest of its hits are committed when it returns."""
    nbytes = 16 << 10
    keys = [BlockKey("ns", b"e" * 31 + bytes([i]), 0) for i in range(4)]
    lower = stack.tiers[1][1]
    assert all(lower.put(keys, [bytes([i]) * nbytes for i in range(4)]))
    stack.index.insert([(k, Location("lower", "", nbytes)) for k in keys])
    top = stack.tiers[0][1]
    seen_during: list[list[bool]] = []

    def get_into_located(wanted, dests, locations, verified=None, delivered=None):
        hits = lower.get_into(wanted, dests)
        verified[0], verified[1] = 7, 8
        delivered([0, 1])
        seen_during.append(top.contains(wanted))
        with pytest.raises(PluginError, match=r"tier 'lower' delivered blocks at positions \[1\] twice"):
            delivered([1, 2])  # a tier's bug: nothing of that batch is committed
        return [False, False, True, False]  # 0 and 1 delivered already; 3 did not arrive

    lower.get_into_located = get_into_located
    stack._delivers["lower"] = True
    lease = stack.acquire(keys, 30.0, owner="t")
    queued: list[tuple] = []
    assert stack.start_promotion(lease.keys, nbytes, lambda *call: queued.append(call), locations=lease.locations)
    fn, *args = queued[0]
    fn(*args)
    assert seen_during == [[True, True, False, False]]
    assert top.contains(keys) == [True, True, True, False]
    assert top.checksums(keys)[:2] == [7, 8]
    assert [bytes(v[:1]) for v in top.view(keys[:3])] == [b"\x00", b"\x01", b"\x02"]
    assert stack.index.lookup_here(keys[:3]) and all(stack.index.lookup_here(keys[:3]))
