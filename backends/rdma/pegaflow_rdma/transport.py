"""``RdmaTransport`` (``transport: {kind: rdma}``): pegaflow's Transport on RDMA verbs via pyverbs.

One-sided for real: ``register`` turns a buffer into a few large memory regions on every NIC (the
daemon registers its whole pool once) and its descriptor carries their rkeys and virtual address;
a peer then READs or WRITEs any ``(offset, length)`` of it with RC queue pairs and no code of the
owner runs per transfer. Queue pairs are made on first use through the owner's connection-setup
listener (``rdma://host:port``), several per NIC, and work requests are striped over all of them.
See docs/rdma.md.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pegaflow_core.backend import Availability
from pegaflow_core.buffers import Buffer, byte_view
from pegaflow_core.errors import ClosedError, InvalidArgument, NotFound, TransportError
from pegaflow_core.transport import Region, TransferOp, Transport, check_timeout, plan_ops

from . import devices
from . import protocol as P
from .options import RdmaOptions
from .plan import OpSpan, WorkRequest, plan_work


@dataclass(eq=False)
class LocalRegion:
    """A registered buffer: ``mrs[nic][chunk]`` cover ``[addr, addr + nbytes)`` in ``chunk`` steps."""

    region_id: int
    view: memoryview  # keeps the buffer exported (it cannot be resized or freed under the NIC)
    addr: int
    nbytes: int
    chunk: int
    mrs: list[list[Any]]
    lkeys: list[list[int]]

    def lkey(self, nic: int, offset: int) -> int:
        return self.lkeys[nic][offset // self.chunk]


class RdmaTransport(Transport):
    """RDMA verbs endpoint over the NICs ``options.devices`` selects. Thread-safe: calls check
    their batch in the caller's thread (InvalidArgument before anything moves) and queue it for
    the engine thread, which posts and polls; futures carry the rest."""

    kind = "rdma"
    Options = RdmaOptions

    def __init__(self, options: RdmaOptions | None = None) -> None:
        self.options = options if options is not None else RdmaOptions()
        ports = devices.select(devices.scan(), self.options.devices, self.options.numa_node, self.options.gpu_pci)
        devices.import_pyverbs()
        from .control import ControlServer
        from .engine import Engine
        from .verbs import Nic

        self._nonce = secrets.randbits(63)
        self._lock = threading.Lock()
        self._verbs_lock = threading.Lock()
        self._regions: dict[int, LocalRegion] = {}
        self._next_region = 1
        self._closed = False
        self._nics: list[Any] = []
        try:
            for index, port in enumerate(ports):
                self._nics.append(Nic(port, index, self.options))
            self._server = ControlServer(self.options.host, self.options.port, self._nics, self._nonce, self._verbs_lock)
        except BaseException:
            for nic in self._nics:
                nic.close()
            raise
        self._address = P.format_address(self.options.host, self._server.port)
        self._max_sge = min(nic.max_sge for nic in self._nics)
        self._engine = Engine(self._nics, self.options, self._nonce, self._verbs_lock)

    @classmethod
    def availability(cls) -> Availability:
        return devices.availability()

    @classmethod
    def conformance_options(cls, tmp_path: Path, capacity_bytes: int | None = None) -> Any:
        return RdmaOptions(timeout=10.0)

    @property
    def address(self) -> str:
        return self._address

    @property
    def nics(self) -> list[str]:
        """The ports in use, e.g. ``["rxe0:1 gid[1]"]``."""
        return [f"{n.port.device}:{n.port.port} gid[{n.gid_index}]" for n in self._nics]

    def __repr__(self) -> str:
        return f"RdmaTransport({self._address}, {', '.join(self.nics)}{', closed' if self._closed else ''})"

    # -- regions ------------------------------------------------------------------------------
    def register(self, buffer: Buffer) -> Region:
        """Register ``buffer`` on every NIC as memory regions of ``mr_chunk`` bytes at most (one
        region unless the buffer is larger than that or than the device allows). Pinning happens
        here, once: keep the buffer alive and unchanged in size until ``deregister``."""
        view = byte_view(buffer, writable=True, what="register(buffer)")
        if not len(view):
            raise InvalidArgument("register(buffer): cannot register an empty buffer")
        addr = int(np.frombuffer(view, dtype=np.uint8).ctypes.data)
        chunk = min([self.options.mr_chunk or len(view)] + [n.max_mr_size for n in self._nics])
        count = P.chunk_count(len(view), chunk)
        with self._lock:
            self._check_open()
            region_id = self._next_region
            self._next_region += 1
        mrs: list[list[Any]] = []
        try:
            with self._verbs_lock:
                for nic in self._nics:
                    mrs.append([nic.register(addr + k * chunk, min(chunk, len(view) - k * chunk)) for k in range(count)])
        except BaseException:
            _close_all(mrs)
            raise
        region = LocalRegion(region_id, view, addr, len(view), chunk, mrs, [[mr.lkey for mr in row] for row in mrs])
        descriptor = P.pack_descriptor(self._nonce, region_id, len(view), addr, chunk, [[mr.rkey for mr in row] for row in mrs])
        with self._lock:
            if self._closed:
                _close_all(mrs)
                self._check_open()
            self._regions[region_id] = region
        return Region(region_id, len(view), descriptor)

    def deregister(self, region: Region) -> None:
        """Deregister the memory regions: peers' transfers on them fail with an access error from
        now on (TransportError)."""
        if not isinstance(region, Region):
            raise InvalidArgument(f"deregister: expected a Region from register(), got {type(region).__name__}")
        with self._lock:
            self._check_open()
            if not self._owns(region):
                raise NotFound(f"deregister: region {region.region_id} is not registered with {self._address} "
                               "(already deregistered, or registered with another transport)")
            local = self._regions.pop(region.region_id)
        with self._verbs_lock:
            _close_all(local.mrs)

    # -- transfers ----------------------------------------------------------------------------
    def connect(self, address: str, timeout_s: float | None = None) -> None:
        """Make (or find) the queue pairs to ``address``. ``timeout_s`` None: the ``timeout`` option."""
        host, port = P.parse_address(address, "connect(address)")
        timeout_s = check_timeout(self.options.timeout if timeout_s is None else timeout_s, "connect")
        with self._lock:
            self._check_open()
            future = self._engine.connect(address, host, port, timeout_s)
        try:
            future.result(timeout=timeout_s + 1.0)
        except TimeoutError:
            raise TransportError(f"cannot connect to {address}: timed out after {timeout_s:g} s") from None

    def read(self, ops: Sequence[TransferOp], timeout_s: float | None = None) -> Future[None]:
        """Copy remote → local for every op with RDMA READ. ``timeout_s`` None: the ``timeout`` option."""
        return self._submit("read", ops, timeout_s)

    def write(self, ops: Sequence[TransferOp], timeout_s: float | None = None) -> Future[None]:
        """Copy local → remote for every op with RDMA WRITE. ``timeout_s`` None: the ``timeout`` option."""
        return self._submit("write", ops, timeout_s)

    def _submit(self, op: str, ops: Sequence[TransferOp], timeout_s: float | None) -> Future[None]:
        from .engine import Batch

        timeout_s = check_timeout(self.options.timeout if timeout_s is None else timeout_s, op)
        with self._lock:
            self._check_open()
            planned, peers = plan_ops(ops, op, self._local_view, P.parse_descriptor, P.parse_address)
            spans: dict[str, list[OpSpan]] = {}
            for p in planned:
                given = ops[p.index]
                remote = P.decode_descriptor(bytes(given.remote.descriptor))
                spans.setdefault(p.address, []).append(OpSpan(
                    p.index, self._regions[given.local.region_id], given.local_offset, remote, p.remote_offset, p.length))
            work: dict[str, tuple[str, int, list[WorkRequest]]] = {}
            for address, items in spans.items():
                wrs = plan_work(items, self.options.wr_size, self._max_sge)
                if wrs:
                    work[address] = (*peers[address], wrs)
            future: Future[None] = Future()
            count = sum(len(entry[2]) for entry in work.values())
            if not count:
                future.set_result(None)
                return future
            where = ", ".join(work)
            what = f"{op} of {len(planned)} ops ({count} work requests) {'from' if op == 'read' else 'to'} {where}"
            self._engine.submit(Batch(op, future, time.monotonic() + timeout_s, timeout_s, count, what), work)
        return future

    # -- operations ---------------------------------------------------------------------------
    def break_connections(self, address: str, timeout_s: float = 5.0) -> int:
        """Force every queue pair to ``address`` into the error state, as a NIC or link fault
        would; transfers on them move to fresh queue pairs. For fault drills and tests. Returns the
        number of queue pairs broken."""
        P.parse_address(address, "break_connections(address)")
        with self._lock:
            self._check_open()
            future = self._engine.break_lanes(address)
        return future.result(timeout=timeout_s)

    def stats(self) -> dict[str, int]:
        """Engine counters: ``posted`` (work requests), ``qp_errors``, ``stalls``, ``timeouts``,
        ``resubmitted``, ``lanes_replaced``."""
        for _ in range(10):  # the engine thread may add a key while we copy
            try:
                return dict(self._engine.counters)
            except RuntimeError:
                continue
        return {}

    def close(self) -> None:
        """Fail transfers in flight with ClosedError, drop every queue pair and memory region, close
        the NICs. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            regions = list(self._regions.values())
            self._regions.clear()
        self._engine.stop()
        self._server.close()
        with self._verbs_lock:
            for region in regions:
                _close_all(region.mrs)
            for nic in self._nics:
                nic.close()

    # -- internals ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"transport {self._address} is closed; build a new one")
        if self._engine.dead is not None:
            raise TransportError(f"transport {self._address} cannot move data any more: {self._engine.dead}")

    def _owns(self, region: Region) -> bool:
        local = self._regions.get(region.region_id)
        if local is None:
            return False
        decoded = P.decode_descriptor(bytes(region.descriptor)) if isinstance(region.descriptor, bytes) else None
        return isinstance(decoded, P.RemoteDescriptor) and decoded.nonce == self._nonce and decoded.region_id == region.region_id

    def _local_view(self, region: Any, where: str) -> memoryview:
        if not isinstance(region, Region) or not self._owns(region):
            raise InvalidArgument(
                f"{where}.local: region {getattr(region, 'region_id', region)!r} is not registered with this "
                f"endpoint ({self._address}); register() the buffer first")
        return self._regions[region.region_id].view


def _close_all(mrs: list[list[Any]]) -> None:
    for row in mrs:
        for mr in row:
            try:
                mr.close()
            except Exception:
                pass
