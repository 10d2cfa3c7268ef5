"""The Transport interface: move bytes between registered memory regions, here or on a peer.

The model is one-sided RDMA's, which every fast fabric offers and which a TCP loopback can emulate:
each side registers memory once (huge regions, never per block) and publishes the region's
``descriptor``; a peer then reads or writes ``(region, offset, length)`` lists of it without the
owner's code running per transfer. Transfers are batched and asynchronous: ``read``/``write``
return a ``concurrent.futures.Future`` (usable from threads, and from asyncio through
``asyncio.wrap_future``) that fails with ``TransportError`` on an unreachable or dead peer.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .backend import Backend
from .buffers import Buffer
from .errors import InvalidArgument


@dataclass(frozen=True)
class Region:
    """A registered local memory region. ``descriptor`` is opaque bytes a peer needs to address it
    (for RDMA: address + rkey); send it through the index or the control plane."""

    region_id: int
    nbytes: int
    descriptor: bytes


@dataclass(frozen=True)
class RemoteRegion:
    """A peer's region: the peer's transport ``address`` and the region's ``descriptor``."""

    address: str
    descriptor: bytes


@dataclass(frozen=True)
class TransferOp:
    """Move ``length`` bytes between ``local`` at ``local_offset`` and ``remote`` at
    ``remote_offset``. Direction is given by the call (read: remote → local; write: local → remote)."""

    local: Region
    local_offset: int
    remote: RemoteRegion
    remote_offset: int
    length: int


class Transport(Backend, ABC):
    """Base class of every transport. Thread-safe."""

    @property
    @abstractmethod
    def address(self) -> str:
        """Where peers reach this endpoint, e.g. ``tcp://127.0.0.1:41234``."""

    @abstractmethod
    def register(self, buffer: Buffer) -> Region:
        """Make a writable buffer addressable by peers. The caller keeps it alive until
        ``deregister``."""

    @abstractmethod
    def deregister(self, region: Region) -> None:
        """Stop serving a region; later remote access to it fails with TransportError."""

    @abstractmethod
    def connect(self, address: str, timeout_s: float = 5.0) -> None:
        """Open (and cache) a connection to a peer; raise TransportError if unreachable.
        Transfers connect on demand, so calling this is optional: it surfaces errors early."""

    @abstractmethod
    def read(self, ops: Sequence[TransferOp], timeout_s: float = 30.0) -> Future[None]:
        """Copy remote → local for every op; one future for the whole batch."""

    @abstractmethod
    def write(self, ops: Sequence[TransferOp], timeout_s: float = 30.0) -> Future[None]:
        """Copy local → remote for every op; one future for the whole batch."""

    def read_reporting(self, ops: Sequence[TransferOp], arrived: Callable[[int], None],
                       timeout_s: float = 30.0) -> Future[None]:
        """``read``, calling ``arrived(i)`` once the bytes of ``ops[i]`` are in place, before the
        future completes: a caller checks or uses the first blocks of one large read while the
        rest still move, instead of splitting it into many reads. ``arrived`` runs on a thread
        that is not the caller's (it may do real work, e.g. a checksum); ops of a read that fails
        may be reported or not, and the future says it failed either way. An exception raised by
        ``arrived`` fails the read.

        This default reports every op when the whole batch has arrived, on a helper thread, so
        the caller's work never runs on a transport's progress thread; a transport that
        completes ops one by one (in order or not) overrides it."""
        inner = self.read(ops, timeout_s)
        outer: Future[None] = Future()
        outer.set_running_or_notify_cancel()
        count = len(ops)

        def report() -> None:
            try:
                inner.result()
                for i in range(count):
                    arrived(i)
            except BaseException as exc:  # the read's error, or the callback's
                outer.set_exception(exc)
            else:
                outer.set_result(None)

        inner.add_done_callback(lambda _: _reporter().submit(report))
        return outer

    @abstractmethod
    def close(self) -> None:
        """Close connections and stop serving regions."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- helpers for transport authors ------------------------------------------------------------


@dataclass(frozen=True)
class PlannedOp:
    """A TransferOp checked against both regions: ``local`` is exactly the bytes it moves, and
    ``remote`` is what the transport's descriptor parser returned ``(nonce, region_id, nbytes)``."""

    index: int
    local: memoryview
    address: str
    remote: tuple[int, int, int]
    remote_offset: int
    length: int


_UNSEEN = object()  # plan_ops: no region seen yet


def plan_ops(
    ops: Sequence[TransferOp],
    what: str,
    local_view: Callable[[Region, str], memoryview],
    parse_descriptor: Callable[[bytes, str], tuple[int, int, int]],
    parse_address: Callable[[str, str], Any],
) -> tuple[list[PlannedOp], dict[str, Any]]:
    """Validate a batch before anything moves (InvalidArgument naming ``ops[i]``) and return the
    planned ops plus each peer address parsed once. ``local_view(region, where)`` gives the bytes
    of a region registered here; ``parse_descriptor`` decodes a peer's region descriptor."""
    if isinstance(ops, (str, bytes)) or not isinstance(ops, Sequence):
        raise InvalidArgument(f"{what}: ops must be a sequence of TransferOp, got {type(ops).__name__}")
    planned: list[PlannedOp] = []
    peers: dict[str, Any] = {}
    locals_seen: dict[Region, memoryview] = {}  # one check per region, not per op
    remotes_seen: dict[RemoteRegion, tuple[int, int, int]] = {}
    # A batch's ops nearly always share one local and one remote region object: compared by
    # identity first, they skip the dataclass hashing that a lookup per op costs (~1 us each).
    last_local: Any = _UNSEEN  # not None: an op whose region is None must still be checked
    last_remote: Any = _UNSEEN
    for i, op in enumerate(ops):
        if not isinstance(op, TransferOp):
            raise InvalidArgument(f"ops[{i}]: expected a TransferOp, got {type(op).__name__}")
        if op.local is not last_local:
            where = f"ops[{i}]"
            local = locals_seen.get(op.local) if isinstance(op.local, Region) else None
            if local is None:
                local = locals_seen[op.local] = local_view(op.local, where)
            last_local = op.local
        remote = op.remote
        if remote is not last_remote:
            where = f"ops[{i}]"
            described = remotes_seen.get(remote) if isinstance(remote, RemoteRegion) else None
            if described is None:
                if not isinstance(remote, RemoteRegion):
                    raise InvalidArgument(f"{where}.remote: expected a RemoteRegion, got {type(remote).__name__}")
                if remote.address not in peers:
                    peers[remote.address] = parse_address(remote.address, f"{where}.remote.address")
                described = remotes_seen[remote] = parse_descriptor(remote.descriptor, f"{where}.remote.descriptor")
            last_remote = remote
        region_id, remote_nbytes = described[1], described[2]
        length, local_offset, remote_offset = op.length, op.local_offset, op.remote_offset
        if not (type(length) is int and type(local_offset) is int and type(remote_offset) is int
                and length >= 0 and local_offset >= 0 and remote_offset >= 0):
            length = _non_negative(length, f"ops[{i}].length")
            local_offset = _non_negative(local_offset, f"ops[{i}].local_offset")
            remote_offset = _non_negative(remote_offset, f"ops[{i}].remote_offset")
        if local_offset + length > len(local):
            raise InvalidArgument(
                f"ops[{i}]: local_offset {local_offset} + length {length} exceeds local region "
                f"{op.local.region_id} of {len(local)} bytes"
            )
        if remote_offset + length > remote_nbytes:
            raise InvalidArgument(
                f"ops[{i}]: remote_offset {remote_offset} + length {length} exceeds remote region "
                f"{region_id} of {remote_nbytes} bytes at {remote.address}"
            )
        planned.append(PlannedOp(i, local[local_offset : local_offset + length], remote.address, described, remote_offset, length))
    return planned, peers


_REPORTER: ThreadPoolExecutor | None = None
_REPORTER_LOCK = threading.Lock()


def _reporter() -> ThreadPoolExecutor:
    """The threads that run ``arrived`` for transports without per-op completion (made on first
    use: most processes never need them)."""
    global _REPORTER
    with _REPORTER_LOCK:
        if _REPORTER is None:
            _REPORTER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pegaflow-read-report")
        return _REPORTER


def check_timeout(timeout_s: Any, what: str) -> float:
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
        raise InvalidArgument(f"{what}: timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    return float(timeout_s)


def _non_negative(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(f"{what}: expected an integer >= 0, got {value!r}")
    return value
