"""RdmaTransport beyond the contract, over real verbs: striping over NICs and queue pairs, large
scatter lists, queue pairs forced into the error state and replaced, access errors, timeouts, and
an owner killed with SIGKILL mid-transfer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pegaflow_core.errors import TransportError
from pegaflow_core.transport import RemoteRegion, TransferOp
from pegaflow_rdma import RdmaTransport

pytestmark = pytest.mark.rdma

OWNER = Path(__file__).with_name("owner.py")
BLOCK = 64 << 10
COUNT = 128  # 8 MiB per batch: seconds under qemu's emulation, so a fault lands mid-transfer
SEED = 11


def pattern(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


@pytest.fixture
def pair(rdma_options) -> Iterator[tuple[RdmaTransport, RdmaTransport]]:
    with RdmaTransport(rdma_options()) as reader, RdmaTransport(rdma_options()) as owner:
        yield reader, owner


def gather(local, remote: RemoteRegion, count: int = COUNT, block: int = BLOCK) -> list[TransferOp]:
    """Remote block i into local slot count-1-i, so a misplaced block is caught."""
    return [TransferOp(local, (count - 1 - i) * block, remote, i * block, block) for i in range(count)]


def check_gathered(local_buffer: np.ndarray, want: np.ndarray, count: int = COUNT, block: int = BLOCK) -> None:
    for i in range(count):
        got = local_buffer[(count - 1 - i) * block : (count - i) * block]
        assert np.array_equal(got, want[i * block : (i + 1) * block]), f"block {i} differs"


def test_transport_uses_every_nic(pair, rdma_options) -> None:
    reader, _ = pair
    wanted = [d for d in rdma_options().devices.split(",") if d != "auto"]
    used = [n.split(":")[0] for n in reader.nics]
    if wanted:
        assert used == wanted
    assert reader.address.startswith("rdma://")


def test_a_batch_is_striped_over_nics_and_queue_pairs(pair) -> None:
    reader, owner = pair
    want = pattern(COUNT * BLOCK, SEED)
    remote = RemoteRegion(owner.address, owner.register(want).descriptor)
    local_buffer = np.zeros(COUNT * BLOCK, dtype=np.uint8)
    local = reader.register(local_buffer)
    reader.read(gather(local, remote)).result(timeout=60)
    check_gathered(local_buffer, want)
    lanes = reader._engine._peers[owner.address].lanes
    assert len(lanes) == len(reader.nics) * reader.options.qps_per_nic
    assert {lane.nic.index for lane in lanes} == set(range(len(reader.nics)))

    # one large op is cut into wr_size requests, which go over every lane as well
    fresh = pattern(COUNT * BLOCK, SEED + 1)
    local_buffer[:] = fresh
    reader.write([TransferOp(local, 0, remote, 0, COUNT * BLOCK)]).result(timeout=60)
    assert np.array_equal(want, fresh), "the owner's region must hold what was written"


def test_adjacent_ops_travel_as_scatter_lists(pair) -> None:
    reader, owner = pair
    block, count = 4096, 64
    source = pattern(block * count, SEED + 2)
    remote = RemoteRegion(owner.address, owner.register(source).descriptor)
    local_buffer = np.zeros(block * count, dtype=np.uint8)
    local = reader.register(local_buffer)
    reader.read(gather(local, remote, count, block)).result(timeout=60)
    check_gathered(local_buffer, source, count, block)
    # 64 blocks contiguous on the owner, into reversed local slots: one request per max_sge blocks
    stats = reader.stats()
    assert stats["posted"] - stats.get("resubmitted", 0) == -(-count // reader._max_sge), stats


def test_a_queue_pair_forced_into_error_is_replaced_and_nothing_is_lost(pair) -> None:
    reader, owner = pair
    block, count = 1 << 20, 64  # 2 x 64 MiB: seconds of work for soft-RoCE, so the break lands mid-flight
    want = pattern(count * block, SEED)
    remote = RemoteRegion(owner.address, owner.register(want).descriptor)
    local_buffer = np.zeros(count * block, dtype=np.uint8)
    local = reader.register(local_buffer)
    reader.connect(owner.address)
    futures = [reader.read(gather(local, remote, count, block), timeout_s=120) for _ in range(2)]
    deadline = time.monotonic() + 10
    while not reader.stats().get("posted") and time.monotonic() < deadline:
        time.sleep(0.001)
    broken = reader.break_connections(owner.address)  # every QP to the owner goes to ERR, mid-transfer
    # (under emulation the stall watchdog may have replaced a slow queue pair already)
    assert 1 <= broken <= len(reader.nics) * reader.options.qps_per_nic
    for future in futures:
        future.result(timeout=180)  # the flushed requests were posted again on fresh queue pairs
    check_gathered(local_buffer, want, count, block)
    stats = reader.stats()
    assert stats["lanes_replaced"] >= broken, stats
    # A request on a broken queue pair either completes (soft-RoCE finishes those already on the
    # wire) or is flushed and posted again elsewhere; either way every byte above arrived.
    assert stats["posted"] >= 2 * count // reader._max_sge, stats
    local_buffer[:] = 0
    reader.read(gather(local, remote, count, block)).result(timeout=120)  # and the new queue pairs carry on
    check_gathered(local_buffer, want, count, block)
    print(f"recovery: {broken} queue pairs broken, {stats['lanes_replaced']} replaced, "
          f"{stats.get('resubmitted', 0)} requests flushed and resubmitted, {stats['posted']} posted in all")


def test_an_access_error_fails_its_batch_and_the_connection_recovers(pair) -> None:
    reader, owner = pair
    keep = pattern(1 << 20, SEED)
    gone_buffer = pattern(1 << 20, SEED + 3)
    kept = RemoteRegion(owner.address, owner.register(keep).descriptor)
    gone_region = owner.register(gone_buffer)
    gone = RemoteRegion(owner.address, gone_region.descriptor)
    local_buffer = np.zeros(1 << 20, dtype=np.uint8)
    local = reader.register(local_buffer)
    reader.read([TransferOp(local, 0, gone, 0, 4096)]).result(timeout=30)
    owner.deregister(gone_region)
    local_buffer[:] = 7
    with pytest.raises(TransportError, match=r"ops\[0\]: region \d+ at rdma://.* refused access \(REM_ACCESS_ERR\)"):
        reader.read([TransferOp(local, 0, gone, 0, 4096)]).result(timeout=30)
    assert (local_buffer == 7).all(), "a refused read must not write"
    reader.read([TransferOp(local, 0, kept, 0, 1 << 20)]).result(timeout=30)  # same peer, fresh queue pair
    assert np.array_equal(local_buffer, keep)
    assert reader.stats()["qp_errors"] >= 1


def test_a_timed_out_batch_fails_and_later_batches_work(pair) -> None:
    reader, owner = pair
    want = pattern(COUNT * BLOCK, SEED)
    remote = RemoteRegion(owner.address, owner.register(want).descriptor)
    local_buffer = np.zeros(COUNT * BLOCK, dtype=np.uint8)
    local = reader.register(local_buffer)
    reader.connect(owner.address)
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"read of 128 ops .* timed out after 0\.005 s"):
        reader.read(gather(local, remote), timeout_s=0.005).result(timeout=30)
    assert time.monotonic() - started < 5
    assert reader.stats()["timeouts"] == 1
    local_buffer[:] = 0
    reader.read(gather(local, remote)).result(timeout=60)
    check_gathered(local_buffer, want)


@pytest.fixture
def owner_process() -> Iterator[tuple[subprocess.Popen[str], RemoteRegion]]:
    proc = subprocess.Popen([sys.executable, str(OWNER), str(COUNT * BLOCK), str(SEED)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"owner exited with {proc.wait(30)} before serving: {proc.stderr.read()}")
        info = json.loads(line)
        yield proc, RemoteRegion(info["address"], bytes.fromhex(info["descriptor"]))
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_across_processes_and_an_owner_killed_mid_transfer(owner_process, rdma_options) -> None:
    proc, remote = owner_process
    assert os.environ.get("PEGAFLOW_RDMA_PEER_HOST", "") in remote.address
    with RdmaTransport(rdma_options()) as reader:
        local_buffer = np.zeros(COUNT * BLOCK, dtype=np.uint8)
        local = reader.register(local_buffer)
        reader.read(gather(local, remote)).result(timeout=60)
        check_gathered(local_buffer, pattern(COUNT * BLOCK, SEED))

        in_flight = [reader.read(gather(local, remote), timeout_s=30) for _ in range(4)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed = time.monotonic()
        outcomes = []
        for future in in_flight:
            try:
                future.result(timeout=60)
                outcomes.append("done")
            except TransportError as exc:
                outcomes.append(str(exc))
        assert any(o != "done" for o in outcomes), "4 batches were in flight when the owner died; the last must fail"
        assert time.monotonic() - killed < 15, f"the reader took too long to notice: {outcomes}"
        started = time.monotonic()
        with pytest.raises(TransportError, match="cannot connect"):
            reader.read(gather(local, remote, 1), timeout_s=5).result(timeout=15)
        assert time.monotonic() - started < 5
