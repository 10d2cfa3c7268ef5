"""Two real `pegaflow serve` daemons with the remote tier over RDMA verbs: node a saves, node b's
engine loads the same prefix, fetched from a's pool with one-sided READs into b's. The cluster
index is a real redis-server; daemons, index and transport listen on PEGAFLOW_RDMA_HOST /
PEGAFLOW_RDMA_PEER_HOST (in the VM: the two ends of a veth pair, never loopback)."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pegaflow_core.client import PegaflowClient
from pegaflow_core.host_kv import KVShape
from pegaflow_core.launcher import DaemonProcess
from pegaflow_core.sim_engine import SimulatedEngine

pytestmark = [pytest.mark.rdma,
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")]

SHAPE = KVShape(num_layers=4, num_blocks=64, block_size=16, num_kv_heads=2, head_size=32, dtype="float16")  # 16 KiB blocks


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@pytest.fixture
def redis_url(tmp_path: Path, rdma_site: dict[str, str]) -> Iterator[str]:
    host = rdma_site["host"]
    port = free_port(host)
    # protected-mode refuses clients from anything but loopback (-DENIED) when there is no password
    proc = subprocess.Popen(["redis-server", "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no",
                             "--protected-mode", "no", "--dir", str(tmp_path), "--logfile", str(tmp_path / "redis.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"redis-server did not answer on {host}:{port}: {(tmp_path / 'redis.log').read_text()[-2000:]}")
        time.sleep(0.1)
    yield f"redis://{host}:{port}/0"
    proc.terminate()
    proc.wait(10)


def node_config(node: str, host: str, redis_url: str, prefix: str, devices: str) -> str:
    return f"""
server: {{listen: '{host}:{free_port(host)}', node: {node}}}
index: {{kind: redis, url: '{redis_url}', node: {node}, key_prefix: {prefix}, heartbeat: 200ms, node_ttl: 2s}}
transport: {{kind: rdma, devices: '{devices}', host: '{host}', timeout: 20s}}
tiers:
  - {{kind: dram, capacity: 16mb, chunk: 1mb}}
  - {{kind: remote, timeout: 20s}}
"""


def prompt(seed: int, blocks: int = 12) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(16 * blocks)]


def test_two_daemons_fetch_over_rdma_and_a_dead_owner_is_a_miss(redis_url: str, rdma_site: dict[str, str]) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    host, peer_host, devices = rdma_site["host"], rdma_site["peer_host"], rdma_site["devices"]
    a = DaemonProcess(node_config("a", host, redis_url, prefix, devices)).start(timeout_s=120)
    try:
        with DaemonProcess(node_config("b", peer_host, redis_url, prefix, devices)).start(timeout_s=120) as b, \
                PegaflowClient(a.endpoint, timeout_s=60) as on_a, PegaflowClient(b.endpoint, timeout_s=60) as on_b:
            assert a.endpoint.startswith(host) and b.endpoint.startswith(peer_host)
            saver = SimulatedEngine(on_a, SHAPE, model="rdma", instance_id="a0")
            loader = SimulatedEngine(on_b, SHAPE, model="rdma", instance_id="b0")
            assert saver.prefill(prompt(1)).saved_blocks == 12
            got = loader.prefill(prompt(1), verify=True)  # raises if any fetched byte is wrong
            assert got.hit_blocks == 12 and got.failed_blocks == 0
            promoted = on_b.stats().counters["bytes_total{direction=promote,tier=remote}"]
            assert promoted == 12 * SHAPE.block_bytes
            print(f"two-daemon fetch: 12 blocks, {promoted} bytes over RDMA verbs from node a to node b")

            saver.prefill(prompt(2))
            saver.cache.close()
            a.kill()
            started = time.monotonic()
            missed = loader.prefill(prompt(2), verify=True)
            assert missed.hit_blocks == 0 and not missed.daemon_down
            assert time.monotonic() - started < 60
            assert loader.prefill(prompt(2), verify=True).hit_blocks == 12  # recomputed and saved on b
            loader.close()
    finally:
        a.close()
