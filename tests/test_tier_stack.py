"""Several tiers in one daemon: eviction spills down, hits in a lower tier are promoted, and Query
says "loading" instead of making the engine wait on the lower tier."""

from __future__ import annotations

import random
import time

from daemon_helpers import SMALL
from pegaflow_core.client import PegaflowClient
from pegaflow_core.launcher import DaemonProcess
from pegaflow_core.sim_engine import SimulatedEngine, block_hashes

# top: 1 MiB = 64 blocks of 16 KiB; below it a second DRAM tier standing in for a slower one
TWO_TIERS = """
index: {kind: local}
tiers:
  - {kind: dram, capacity: 1mb, chunk: 256kb}
  - {kind: dram, name: lower, capacity: 16mb, chunk: 1mb}
"""


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
