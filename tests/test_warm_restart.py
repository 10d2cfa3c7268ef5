"""The cache survives the daemon itself: kill -9 under load, restart, and the blocks hit again."""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest

from daemon_helpers import SMALL
from pegaflow_core.client import PegaflowClient
from pegaflow_core.config import parse_config
from pegaflow_core.launcher import DaemonProcess, free_port
from pegaflow_core.sim_engine import SimulatedEngine, block_hashes

BLOCKS_PER_PROMPT = 20
# Sealing (checksum + journal) runs behind the acknowledgements; only sealed blocks are trusted
# after a kill -9. The blocks of the last moments before it may be lost, never older ones.
SEAL_LAG_S = 3.0

ENGINE = textwrap.dedent(
    """
    import random, sys
    from pegaflow_core.client import PegaflowClient
    from pegaflow_core.sim_engine import SimulatedEngine
    sys.path.insert(0, {tests!r})
    from daemon_helpers import SMALL
    import dataclasses
    client = PegaflowClient({endpoint!r}, timeout_s=2)
    engine = SimulatedEngine(client, dataclasses.replace(SMALL, num_blocks=64), model="warm", instance_id={name!r})
    seed = {first}
    while True:
        rng = random.Random(seed)
        stats = engine.prefill([rng.randrange(32000) for _ in range(16 * {blocks})])
        print(("DOWN" if stats.daemon_down else "ACK"), seed, stats.hit_blocks, stats.saved_blocks, flush=True)
        if not stats.daemon_down:
            seed += {step}
    """
)


def prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(16 * BLOCKS_PER_PROMPT)]


def config_text(tmp_path, port: int) -> str:
    return (
        f"server: {{listen: '127.0.0.1:{port}'}}\n"
        f"tiers: [{{kind: dram, capacity: 192mb, chunk: 1mb, pool_name: warm, shm_dir: '{tmp_path}'}}]\n"
    )


def test_kill_9_under_load_then_restart_serves_the_same_blocks(tmp_path, capsys):
    port = free_port()
    config = config_text(tmp_path, port)
    first = DaemonProcess(config, workdir=tmp_path).start()
    engines = [
        subprocess.Popen(
            [sys.executable, "-c", ENGINE.format(tests=os.path.dirname(__file__), endpoint=first.endpoint,
                                                  name=f"engine-{i}", first=i, step=3, blocks=BLOCKS_PER_PROMPT)],
            stdout=subprocess.PIPE, stderr=open(tmp_path / f"engine-{i}.log", "w"), text=True,
        )
        for i in range(3)
    ]
    acked: dict[int, float] = {}  # seed -> when its acknowledgement was read
    second = None
    try:
        while len(acked) < 200:  # 200 prompts x 20 blocks acknowledged by three engines
            for engine in engines:
                kind, seed, *_ = engine.stdout.readline().split()
                if kind == "ACK":
                    acked[int(seed)] = time.monotonic()
        first.kill()
        killed_at = time.monotonic()
        started = time.monotonic()
        second = DaemonProcess(config, workdir=tmp_path).start()
        time_to_serve = time.monotonic() - started
        # the engines kept running through the restart: misses while it was down, then hits
        deadline = time.monotonic() + 30
        for engine in engines:
            kind = "DOWN"
            while kind != "ACK" and time.monotonic() < deadline:
                kind, seed, hits, saved = engine.stdout.readline().split()
            assert kind == "ACK", "an engine never got through to the restarted daemon"
            assert engine.poll() is None, f"an engine failed during the restart:\n{(tmp_path / f'engine-{engines.index(engine)}.log').read_text()[-3000:]}"
        with PegaflowClient(second.endpoint) as client:
            checker = SimulatedEngine(client, dataclasses.replace(SMALL, num_blocks=64), model="warm", instance_id="checker")
            total = hit = 0
            lost_ages = []  # seconds between a prompt's acknowledgement and the kill, for prompts not whole
            for seed in sorted(acked):
                hashes = block_hashes(prompt(seed), 16)
                answer = client.query(checker.handle, hashes)
                total += len(hashes)
                hit += answer.hit_blocks
                client.release([answer.lease_id])
                if answer.hit_blocks < len(hashes):
                    lost_ages.append(killed_at - acked[seed])
            verified = checker.prefill(prompt(min(acked)), verify=True)
            checker.close()
        share = hit / total
        with capsys.disabled():
            print(f"\nwarm restart: {hit}/{total} acknowledged blocks hit again ({100 * share:.2f}%; {total - hit} lost: "
                  f"saved but not yet sealed at the kill, acknowledged at most {max(lost_ages, default=0):.2f}s before it), "
                  f"restarted daemon served after {time_to_serve:.2f}s ({time.monotonic() - killed_at:.2f}s after the kill)")
        assert max(lost_ages, default=0.0) < SEAL_LAG_S, "blocks acknowledged well before the kill were lost"
        assert share >= 0.5
        assert verified.hit_blocks == BLOCKS_PER_PROMPT and verified.failed_blocks == 0
    finally:
        for engine in engines:
            engine.kill()
            engine.wait()
        first.close()
        if second is not None:
            second.close()


def test_cold_start_discards_the_pool(tmp_path):
    port = free_port()
    config = config_text(tmp_path, port)
    with DaemonProcess(config, workdir=tmp_path) as daemon, PegaflowClient(daemon.endpoint) as client:
        engine = SimulatedEngine(client, SMALL, model="cold")
        engine.prefill(prompt(1))
        engine.close()
    with DaemonProcess(config, workdir=tmp_path, extra_args=("--cold",)) as daemon, PegaflowClient(daemon.endpoint) as client:
        engine = SimulatedEngine(client, SMALL, model="cold")
        assert engine.prefill(prompt(1)).hit_blocks == 0
        assert client.stats().tiers[0].blocks == BLOCKS_PER_PROMPT  # only what was saved just now
        engine.close()
    with DaemonProcess(config, workdir=tmp_path) as daemon, PegaflowClient(daemon.endpoint) as client:
        engine = SimulatedEngine(client, SMALL, model="cold")
        assert engine.prefill(prompt(1)).hit_blocks == BLOCKS_PER_PROMPT  # a clean stop keeps it
        engine.close()


def test_without_recovery_turns_off_recover_where_a_tier_has_it():
    config = parse_config("tiers: [{kind: dram, capacity: 8mb, pool_name: p}]", "stack.yaml")
    assert config.tiers[0].options.recover is True
    assert config.without_recovery().tiers[0].options.recover is False


def test_a_bit_flipped_in_the_pool_while_the_daemon_was_down_is_recomputed(tmp_path):
    from pegaflow_core.sim_engine import fill_block

    port = free_port()
    config = config_text(tmp_path, port)
    with DaemonProcess(config, workdir=tmp_path) as daemon, PegaflowClient(daemon.endpoint) as client:
        engine = SimulatedEngine(client, SMALL, model="flip")
        engine.prefill(prompt(5))
        fill_block(engine.cache, 0, block_hashes(prompt(5), 16)[4])  # block 4's bytes, to find it
        needle = engine.cache.block_bytes_view(0).tobytes()[:4096]
        engine.close()
    pool = tmp_path / "pegaflow-warm.pool"
    data = bytearray(pool.read_bytes())
    at = data.find(needle)
    assert at > 0, "block not found in the pool file"
    data[at + 100] ^= 0x01
    pool.write_bytes(bytes(data))
    with DaemonProcess(config, workdir=tmp_path) as daemon, PegaflowClient(daemon.endpoint) as client:
        engine = SimulatedEngine(client, SMALL, model="flip")
        got = engine.prefill(prompt(5), verify=True)  # raises if a wrong byte is served
        assert got.hit_blocks == 4 and got.failed_blocks == 1  # blocks 0-3 served, 4 recomputed
        assert engine.prefill(prompt(5), verify=True).hit_blocks == BLOCKS_PER_PROMPT  # saved again
        engine.close()
