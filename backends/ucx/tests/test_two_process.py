"""The UCX transport between two processes: the owner of a region in one, the reader in the test,
and what a reader sees when the owner is killed with SIGKILL in the middle of a transfer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from pegaflow_core.errors import TransportError
from pegaflow_core.transport import RemoteRegion, TransferOp
from pegaflow_ucx import UcxTransport

pytestmark = pytest.mark.skipif(not UcxTransport.availability().ok, reason=UcxTransport.availability().detail)

OWNER = Path(__file__).with_name("owner.py")
BLOCK = 2 << 20
REGION = 32 * BLOCK  # 64 MiB
SEED = 7


def _pattern(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


@pytest.fixture
def owner() -> Iterator[tuple[subprocess.Popen[str], RemoteRegion]]:
    proc = subprocess.Popen(
        [sys.executable, str(OWNER), str(REGION), str(SEED)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        line = proc.stdout.readline()  # the owner prints once it serves; it exits on error
        if not line:
            pytest.fail(f"owner process exited with {proc.wait(10)} before serving")
        info = json.loads(line)
        yield proc, RemoteRegion(info["address"], bytes.fromhex(info["descriptor"]))
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def reader() -> Iterator[UcxTransport]:
    with UcxTransport() as transport:
        yield transport


def _blocks(local, remote: RemoteRegion, count: int) -> list[TransferOp]:
    """Remote block i into local slot count-1-i: a gather, so misplaced blocks are caught."""
    return [TransferOp(local, (count - 1 - i) * BLOCK, remote, i * BLOCK, BLOCK) for i in range(count)]


def test_read_and_write_across_processes(owner, reader: UcxTransport) -> None:
    _, remote = owner
    want = _pattern(REGION, SEED)
    local_buffer = np.zeros(REGION, dtype=np.uint8)
    local = reader.register(local_buffer)
    count = REGION // BLOCK
    reader.read(_blocks(local, remote, count), timeout_s=20).result(timeout=30)
    for i in range(count):
        got = local_buffer[(count - 1 - i) * BLOCK : (count - i) * BLOCK]
        assert np.array_equal(got, want[i * BLOCK : (i + 1) * BLOCK]), f"block {i} differs"

    # Write fresh bytes over the owner's second block, read them back into a clean buffer.
    fresh = np.random.default_rng(SEED + 1).integers(0, 256, BLOCK, dtype=np.uint8)
    local_buffer[:BLOCK] = fresh
    reader.write([TransferOp(local, 0, remote, BLOCK, BLOCK)], timeout_s=20).result(timeout=30)
    local_buffer[:] = 0
    reader.read([TransferOp(local, 0, remote, BLOCK, BLOCK), TransferOp(local, BLOCK, remote, 0, BLOCK)],
                timeout_s=20).result(timeout=30)
    assert np.array_equal(local_buffer[:BLOCK], fresh)
    assert np.array_equal(local_buffer[BLOCK : 2 * BLOCK], want[:BLOCK]), "the neighbouring block changed"


def test_owner_killed_mid_transfer(owner, reader: UcxTransport) -> None:
    proc, remote = owner
    local = reader.register(np.zeros(REGION, dtype=np.uint8))
    count = REGION // BLOCK
    reader.read(_blocks(local, remote, count), timeout_s=20).result(timeout=30)  # connected and warm

    in_flight: list[Future[None]] = [reader.read(_blocks(local, remote, count), timeout_s=5) for _ in range(4)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    killed = time.monotonic()
    outcomes = []
    for future in in_flight:
        try:
            future.result(timeout=15)  # the transfer's own timeout (5 s) bounds this
            outcomes.append("done")
        except TransportError as exc:
            outcomes.append(exc)
    assert any(isinstance(o, TransportError) for o in outcomes), (
        "4 reads of 64 MiB each were in flight when the owner was killed; at least the last must fail")
    assert time.monotonic() - killed < 10, "the reader hung after its peer died"

    # The dead peer is refused quickly from now on (connection refused, not a timeout).
    started = time.monotonic()
    with pytest.raises(TransportError):
        reader.read(_blocks(local, remote, 1), timeout_s=5).result(timeout=15)
    assert time.monotonic() - started < 5
