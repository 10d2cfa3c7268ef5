"""DRAM over SSD in a real daemon: spilled blocks survive a daemon crash on the SSD, come back
exact, and a bit flipped on the disk is detected and recomputed, never served."""

from __future__ import annotations

import random
import time

import pytest

from daemon_helpers import SMALL
from pegaflow_core.client import PegaflowClient
from pegaflow_core.launcher import DaemonProcess, free_port
from pegaflow_core.sim_engine import SimulatedEngine, block_hashes, fill_block

pytest.importorskip("pegaflow_ssd")


def config(tmp_path, port: int) -> str:
    return f"""
server: {{listen: '127.0.0.1:{port}'}}
index: {{kind: local}}
tiers:
  - {{kind: dram, capacity: 1mb, chunk: 256kb}}
  - {{kind: ssd, path: '{tmp_path / "ssd"}', capacity: 32mb, segment_size: 4mb}}
"""


def prompt(seed: int, blocks: int = 30) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(16 * blocks)]


def fill_all(engine: SimulatedEngine, seeds: range) -> None:
    for seed in seeds:
        engine.prefill(prompt(seed))


def test_spilled_blocks_survive_a_daemon_crash_on_ssd(tmp_path):
    port = free_port()
    first = DaemonProcess(config(tmp_path, port), workdir=tmp_path).start()
    client = PegaflowClient(first.endpoint, timeout_s=10)
    engine = SimulatedEngine(client, SMALL, model="ssd")
    fill_all(engine, range(5))  # 150 blocks through a 64-block DRAM tier: most go to the SSD
    assert client.stats().tiers[1].blocks >= 86
    first.kill()
    second = DaemonProcess(config(tmp_path, port), workdir=tmp_path).start()
    try:
        hashes = block_hashes(prompt(0), 16)
        deadline_hits = 0
        for _ in range(100):  # the client re-registers by itself; the SSD was indexed at start
            stats = engine.prefill(prompt(0), verify=True)  # raises if any byte is wrong
            if not stats.daemon_down:
                deadline_hits = stats.hit_blocks
                break
            time.sleep(0.1)  # gRPC's reconnect backoff: give the channel time to see the new daemon
        assert deadline_hits == 30
        assert client.query(engine.handle, hashes).hit_blocks == 30
    finally:
        engine.close()
        client.close()
        second.close()


def test_a_flipped_bit_on_the_ssd_is_a_recomputed_miss(tmp_path):
    port = free_port()
    with DaemonProcess(config(tmp_path, port), workdir=tmp_path) as daemon, PegaflowClient(daemon.endpoint) as client:
        engine = SimulatedEngine(client, SMALL, model="flip")
        fill_all(engine, range(5))
        # find block 3 of prompt 0 on the disk by its content and flip one bit of its payload
        hashes = block_hashes(prompt(0), 16)
        fill_block(engine.cache, 0, hashes[3])
        payload = engine.cache.block_bytes_view(0).tobytes()
        flipped = False
        for segment in sorted((tmp_path / "ssd").rglob("*")):
            if not segment.is_file():
                continue
            data = bytearray(segment.read_bytes())
            at = data.find(payload[:4096])
            if at >= 0:
                data[at + 5000] ^= 0x04
                segment.write_bytes(bytes(data))
                flipped = True
                break
        assert flipped, "block not found on the SSD"
        stats = engine.prefill(prompt(0), verify=True)  # verify raises if a wrong byte is served
        assert stats.hit_blocks == 3  # blocks 0-2 served, block 3 failed its checksum: recomputed
        counters = client.stats().counters
        assert counters.get("load_failures_total{reason=missing}", 0) >= 1
        text = client.stats()
        assert any(t.name == "ssd" for t in text.tiers)
        engine.close()


def test_an_ssd_that_cannot_be_opened_leaves_the_daemon_serving_from_dram(tmp_path, capsys):
    from pegaflow_core.cli import main

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the SSD directory should be")
    text = f"""
index: {{kind: local}}
tiers:
  - {{kind: dram, capacity: 1mb, chunk: 256kb}}
  - {{kind: ssd, path: '{blocker}', capacity: 32mb, segment_size: 4mb}}
"""
    with DaemonProcess(text) as daemon, PegaflowClient(daemon.endpoint) as client:
        assert "tiers[1] (ssd 'ssd') is unavailable" in client.health().degraded[0]
        engine = SimulatedEngine(client, SMALL, model="degraded")
        engine.prefill(prompt(1))
        assert engine.prefill(prompt(1), verify=True).hit_blocks == 30
        engine.close()
        assert main(["status", "--endpoint", daemon.endpoint]) == 0
        assert "DEGRADED" in capsys.readouterr().out
