"""``TransportContract``: batched one-sided reads and writes between two endpoints.

Subclass it in a class named ``Test*`` and override ``transport_factory`` to return
``factory() -> Transport``; each call builds an independent endpoint (the tests build two, A and B).
Timeouts are short so a broken transport fails instead of hanging.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np
import pytest

from pegaflow_core.errors import InvalidArgument, TransportError
from pegaflow_core.transport import Region, RemoteRegion, Transport, TransferOp

TransportFactory = Callable[[], Transport]
WAIT_S = 10.0
REGION = 64 * 1024


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TransportContract:
    """Contract tests for ``pegaflow_core.transport.Transport``."""

    pytestmark = pytest.mark.pegaflow_conformance

    #: Address on which nothing listens; override for non-TCP transports.
    def unreachable_address(self, like: str | None = None) -> str:
        """An address where nobody listens, in the scheme of ``like`` (an endpoint's address)."""
        scheme = (like or "tcp://").partition("://")[0]
        return f"{scheme}://127.0.0.1:{_closed_port()}"

    @pytest.fixture
    def transport_factory(self) -> TransportFactory:
        """Override: return ``factory() -> Transport``, a new endpoint per call."""
        raise NotImplementedError(
            f"{type(self).__name__} must override the 'transport_factory' fixture: return a callable "
            "factory() -> Transport building a new endpoint each call"
        )

    @pytest.fixture
    def pair(self, transport_factory) -> Iterator[tuple[Transport, Transport]]:
        a, b = transport_factory(), transport_factory()
        assert isinstance(a, Transport) and isinstance(b, Transport)
        assert a.address != b.address, "two endpoints must have different addresses"
        yield a, b
        a.close()
        b.close()

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _wait(future: Future) -> None:
        assert isinstance(future, Future), f"transfers must return a concurrent.futures.Future, got {type(future).__name__}"
        future.result(timeout=WAIT_S)

    @staticmethod
    def _remote(transport: Transport, region: Region) -> RemoteRegion:
        return RemoteRegion(transport.address, region.descriptor)

    @staticmethod
    def _fails_with(call: Callable[[], Future], error: type[Exception], match: str | None = None) -> None:
        """The error may be raised by the call or delivered through its future."""
        with pytest.raises(error, match=match):
            call().result(timeout=WAIT_S)

    # -- register --------------------------------------------------------------------------
    def test_register_bytearray_and_numpy(self, pair) -> None:
        a, _ = pair
        for buffer in (bytearray(REGION), np.zeros(REGION, dtype=np.uint8)):
            region = a.register(buffer)
            assert isinstance(region, Region)
            assert region.nbytes == REGION
            assert isinstance(region.descriptor, bytes) and region.descriptor
            a.deregister(region)

    def test_regions_have_distinct_descriptors(self, pair) -> None:
        a, _ = pair
        first, second = a.register(bytearray(64)), a.register(bytearray(64))
        assert first.descriptor != second.descriptor and first.region_id != second.region_id

    # -- read / write ----------------------------------------------------------------------
    SPANS = [(0, 0, 1), (1, 100, 7), (4096, 0, 4096), (10_000, 30_000, 12_345), (REGION - 5, REGION - 5, 5)]

    def _check_transfer(self, pair, direction: str) -> None:
        a, b = pair
        local_buf = np.full(REGION, 0xEE, dtype=np.uint8)
        remote_buf = bytearray(os.urandom(REGION))
        local, remote = a.register(local_buf), b.register(remote_buf)
        if direction == "write":
            local_buf[:] = np.frombuffer(os.urandom(REGION), dtype=np.uint8)
            remote_buf[:] = b"\xee" * REGION
        src_local, src_remote = local_buf.tobytes(), bytes(remote_buf)
        ops = [TransferOp(local, lo, self._remote(b, remote), ro, n) for lo, ro, n in self.SPANS]
        self._wait((a.read if direction == "read" else a.write)(ops))
        if direction == "read":
            want = bytearray(b"\xee" * REGION)
            for lo, ro, n in self.SPANS:
                want[lo : lo + n] = src_remote[ro : ro + n]
            assert local_buf.tobytes() == bytes(want)
            assert bytes(remote_buf) == src_remote, "a read must not change the remote region"
        else:
            want = bytearray(b"\xee" * REGION)
            for lo, ro, n in self.SPANS:
                want[ro : ro + n] = src_local[lo : lo + n]
            assert bytes(remote_buf) == bytes(want)
            assert local_buf.tobytes() == src_local, "a write must not change the local region"

    def test_read_batch(self, pair) -> None:
        self._check_transfer(pair, "read")

    def test_write_batch(self, pair) -> None:
        self._check_transfer(pair, "write")

    def test_empty_batch(self, pair) -> None:
        a, _ = pair
        self._wait(a.read([]))
        self._wait(a.write([]))

    def _reversed_gather(self, a, b, block: int, count: int) -> tuple[bytearray, bytearray, list[TransferOp]]:
        """Random remote bytes, a zeroed local buffer, and the ops of a gather in which remote
        block i lands in local slot count-1-i."""
        remote_buf = bytearray(os.urandom(block * count))
        local_buf = bytearray(block * count)
        local, remote = a.register(local_buf), b.register(remote_buf)
        ops = [TransferOp(local, (count - 1 - i) * block, self._remote(b, remote), i * block, block) for i in range(count)]
        return remote_buf, local_buf, ops

    def test_many_ops_in_one_batch(self, pair) -> None:
        a, b = pair
        block, count = 128, 400
        remote_buf, local_buf, ops = self._reversed_gather(a, b, block, count)
        self._wait(a.read(ops))
        for i in range(count):
            assert local_buf[(count - 1 - i) * block : (count - i) * block] == remote_buf[i * block : (i + 1) * block]

    def test_concurrent_batches(self, pair) -> None:
        a, b = pair
        threads_n, block = 4, 4096
        remote_buf = bytearray(os.urandom(threads_n * block))
        remote = b.register(remote_buf)
        locals_ = [bytearray(block) for _ in range(threads_n)]
        regions = [a.register(buf) for buf in locals_]
        errors: list[BaseException] = []

        def worker(n: int) -> None:
            try:
                for _ in range(10):
                    ops = [TransferOp(regions[n], off, self._remote(b, remote), n * block + off, 512) for off in range(0, block, 512)]
                    self._wait(a.read(ops))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "transport hung under concurrent batches"
        if errors:
            raise errors[0]
        for n, buf in enumerate(locals_):
            assert bytes(buf) == bytes(remote_buf[n * block : (n + 1) * block])

    # -- read_reporting --------------------------------------------------------------------
    def test_read_reporting_reports_each_op_once_with_its_bytes_in_place(self, pair) -> None:
        a, b = pair
        block, count = 4096, 64
        remote_buf, local_buf, ops = self._reversed_gather(a, b, block, count)
        reported: list[int] = []
        early: list[int] = []  # reported before its bytes were there

        def arrived(i: int) -> None:
            at = (count - 1 - i) * block
            if local_buf[at : at + block] != remote_buf[i * block : (i + 1) * block]:
                early.append(i)
            reported.append(i)

        future = a.read_reporting(ops, arrived, timeout_s=WAIT_S)
        self._wait(future)
        assert sorted(reported) == list(range(count)), "every op must be reported exactly once before the future completes"
        assert not early, f"ops {early[:5]} were reported before their bytes were in place"

    def test_read_reporting_of_a_failed_read_fails_its_future(self, pair) -> None:
        a, b = pair
        local, remote = a.register(bytearray(256)), b.register(bytearray(256))
        b.deregister(remote)
        self._fails_with(lambda: a.read_reporting([TransferOp(local, 0, self._remote(b, remote), 0, 16)], lambda i: None,
                                                  timeout_s=WAIT_S), TransportError)

    def test_an_error_in_arrived_fails_the_read(self, pair) -> None:
        a, b = pair
        local, remote = a.register(bytearray(256)), b.register(bytearray(256))

        def arrived(i: int) -> None:
            raise RuntimeError("the caller's callback failed")

        self._fails_with(lambda: a.read_reporting([TransferOp(local, 0, self._remote(b, remote), 0, 16)], arrived,
                                                  timeout_s=WAIT_S), RuntimeError, "callback failed")
        self._wait(a.read([TransferOp(local, 0, self._remote(b, remote), 0, 16)]))  # the endpoint still works

    # -- errors ----------------------------------------------------------------------------
    @pytest.mark.parametrize("side", ["local", "remote"])
    @pytest.mark.parametrize("direction", ["read", "write"])
    def test_out_of_bounds_op_writes_nothing(self, pair, side, direction) -> None:
        a, b = pair
        local_buf, remote_buf = bytearray(b"\x01" * 4096), bytearray(b"\x02" * 4096)
        local, remote = a.register(local_buf), b.register(remote_buf)
        good = TransferOp(local, 0, self._remote(b, remote), 0, 64)
        if side == "local":
            bad = TransferOp(local, 4000, self._remote(b, remote), 0, 200)
        else:
            bad = TransferOp(local, 0, self._remote(b, remote), 4090, 7)
        call = a.read if direction == "read" else a.write
        self._fails_with(lambda: call([good, bad], timeout_s=WAIT_S), InvalidArgument, r"(?i)bound|range|region|offset|length")
        assert local_buf == b"\x01" * 4096 and remote_buf == b"\x02" * 4096, "a failed batch must write nothing"

    def test_negative_offset_is_invalid(self, pair) -> None:
        a, b = pair
        local, remote = a.register(bytearray(64)), b.register(bytearray(64))
        self._fails_with(lambda: a.read([TransferOp(local, -1, self._remote(b, remote), 0, 8)], timeout_s=WAIT_S), InvalidArgument)

    def test_deregistered_remote_region(self, pair) -> None:
        a, b = pair
        local_buf = bytearray(b"\x01" * 256)
        local, remote = a.register(local_buf), b.register(bytearray(256))
        self._wait(a.read([TransferOp(local, 0, self._remote(b, remote), 0, 16)]))
        local_buf[:] = b"\x01" * 256
        b.deregister(remote)
        self._fails_with(lambda: a.read([TransferOp(local, 0, self._remote(b, remote), 0, 16)], timeout_s=WAIT_S), TransportError)
        assert local_buf == b"\x01" * 256

    def test_connect_unreachable(self, pair) -> None:
        a, _ = pair
        with pytest.raises(TransportError):
            a.connect(self.unreachable_address(a.address), timeout_s=2.0)

    def test_connect_reachable_peer(self, pair) -> None:
        a, b = pair
        a.connect(b.address, timeout_s=WAIT_S)

    def test_transfer_to_unreachable_address(self, pair) -> None:
        a, b = pair
        local = a.register(bytearray(64))
        # A well-formed descriptor (from B) at an address where nothing listens.
        ghost = RemoteRegion(self.unreachable_address(b.address), b.register(bytearray(64)).descriptor)
        self._fails_with(lambda: a.read([TransferOp(local, 0, ghost, 0, 8)], timeout_s=2.0), TransportError)

    def test_closed_peer(self, pair) -> None:
        a, b = pair
        local, remote = a.register(bytearray(256)), b.register(bytearray(256))
        self._wait(a.write([TransferOp(local, 0, self._remote(b, remote), 0, 16)]))
        b.close()
        for call in (a.read, a.write):
            self._fails_with(lambda: call([TransferOp(local, 0, self._remote(b, remote), 0, 16)], timeout_s=2.0), TransportError)

    def test_close_is_idempotent(self, transport_factory) -> None:
        t = transport_factory()
        t.register(bytearray(64))
        t.close()
        t.close()

    # -- stateful --------------------------------------------------------------------------
    @pytest.mark.pegaflow_stateful
    def test_stateful(self, transport_factory) -> None:
        from .stateful import run_transport_state_machine

        run_transport_state_machine(transport_factory)
