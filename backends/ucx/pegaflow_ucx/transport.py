"""``UcxTransport`` (``transport: {kind: ucx}``): pegaflow's Transport on UCX through ucxx.

UCX picks the fastest path it has between two endpoints (shared memory or CMA on one host, TCP,
RDMA verbs, CUDA IPC) behind one API, so the same code serves a laptop, a TCP cluster and an
InfiniBand one; ``tls`` and ``net_devices`` narrow its choice. The one-sided model of the
Transport interface is provided with tagged messages served by the owner's progress thread
(protocol.py says why and how); callers only ever touch futures.

Nothing here imports ucxx at module import time: ``pegaflow backends`` and config loading stay
light, and UCX reads its settings when the first transport is built.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from pegaflow_core.backend import Availability
from pegaflow_core.buffers import Buffer, byte_view
from pegaflow_core.errors import ClosedError, InvalidArgument, NotFound, TransportError
from pegaflow_core.transport import Region, RemoteRegion, TransferOp, Transport, check_timeout, plan_ops

from . import protocol as P
from .options import UcxOptions

RDMA_MODULES = ("ib", "rdmacm", "mlx5", "rc", "ud", "dc")  # uct modules that bring RDMA transports


class UcxTransport(Transport):
    """One UCX endpoint: a context, a worker and a listener driven by one progress thread.

    Thread-safe. ``read``/``write`` check the whole batch in the caller's thread (bounds,
    addresses, descriptors: InvalidArgument before anything moves), then return a future that the
    progress thread completes. Connections are made on demand, cached per peer address, and
    dropped when the peer fails or a transfer on them times out.
    """

    kind = "ucx"
    Options = UcxOptions

    def __init__(self, options: UcxOptions | None = None) -> None:
        self.options = options if options is not None else UcxOptions()
        _import_ucxx()
        from .engine import Engine

        self._lock = threading.Lock()
        self._regions: dict[int, memoryview] = {}
        self._region_ids = itertools.count(1)
        self._closed = False
        self._engine = Engine(self.options.ucx_config(), self.options.port, self.options.host, self._resolve,
                              error_handling=self.options.error_handling)
        self._nonce = self._engine.nonce
        self._address = self._engine.address

    @classmethod
    def availability(cls) -> Availability:
        return _availability()

    @classmethod
    def conformance_options(cls, tmp_path: Path, capacity_bytes: int | None = None) -> Any:
        return UcxOptions()

    @property
    def address(self) -> str:
        return self._address

    def __repr__(self) -> str:
        return f"UcxTransport({self._address}{', closed' if self._closed else ''})"

    # -- regions ------------------------------------------------------------------------------
    def register(self, buffer: Buffer) -> Region:
        """Serve ``buffer`` to peers. Its descriptor carries this endpoint's nonce and the region
        id (the tagged scheme; see protocol.py), so it is only valid for this endpoint."""
        view = byte_view(buffer, writable=True, what="register(buffer)")
        with self._lock:
            self._check_open()
            region_id = next(self._region_ids)
            self._regions[region_id] = view
        descriptor = P.DESCRIPTOR.pack(P.MAGIC, P.SCHEME_TAGGED, self._nonce, region_id, len(view))
        return Region(region_id, len(view), descriptor)

    def deregister(self, region: Region) -> None:
        """Stop serving ``region``: peers get TransportError for it from now on. A chunk the
        progress thread has already started on it still completes."""
        if not isinstance(region, Region):
            raise InvalidArgument(f"deregister: expected a Region from register(), got {type(region).__name__}")
        with self._lock:
            self._check_open()
            if not self._owns(region):
                raise NotFound(
                    f"deregister: region {region.region_id} is not registered with {self._address} "
                    "(already deregistered, or registered with another transport)"
                )
            del self._regions[region.region_id]

    # -- transfers ----------------------------------------------------------------------------
    def connect(self, address: str, timeout_s: float | None = None) -> None:
        """Open (or find cached) the connection to ``address``, handshake included. ``timeout_s``
        None means the ``timeout`` option."""
        address, ip, port = P.parse_address(address, "connect(address)")
        timeout_s = check_timeout(self.options.timeout if timeout_s is None else timeout_s, "connect")
        with self._lock:
            self._check_open()
            future = self._engine.connect(address, ip, port, timeout_s)
        try:
            future.result(timeout=timeout_s + 1.0)  # the engine enforces the deadline itself
        except TimeoutError:
            raise TransportError(f"cannot connect to {address}: timed out after {timeout_s:g} s") from None

    def read(self, ops: Sequence[TransferOp], timeout_s: float | None = None) -> Future[None]:
        """Copy remote → local for every op. ``timeout_s`` None means the ``timeout`` option."""
        return self._submit(P.READ, ops, timeout_s)

    def write(self, ops: Sequence[TransferOp], timeout_s: float | None = None) -> Future[None]:
        """Copy local → remote for every op. ``timeout_s`` None means the ``timeout`` option."""
        return self._submit(P.WRITE, ops, timeout_s)

    def _submit(self, op: int, ops: Sequence[TransferOp], timeout_s: float | None) -> Future[None]:
        """Check everything that can be checked here (InvalidArgument), then queue the batch; the
        future carries only what the peer alone can tell (TransportError, ClosedError)."""
        from .engine import Batch, Item

        name = "read" if op == P.READ else "write"
        timeout_s = check_timeout(self.options.timeout if timeout_s is None else timeout_s, name)
        by_peer: dict[str, tuple[str, int, list[Item]]] = {}
        with self._lock:
            self._check_open()
            planned, peers = plan_ops(ops, name, self._local_view, P.parse_descriptor, P.parse_address)
            for p in planned:
                nonce, region_id, _ = p.remote
                _, ip, port = peers[p.address]
                item = Item(p.index, p.local, nonce, region_id, p.remote_offset, p.length)
                by_peer.setdefault(p.address, (ip, port, []))[2].append(item)
            future: Future[None] = Future()
            if not by_peer:
                future.set_result(None)
                return future
            batch = Batch(op, future, time.monotonic() + timeout_s, timeout_s)
            self._engine.submit(batch, by_peer)
        return future

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Fail transfers in flight with ClosedError, close every endpoint, stop the progress
        thread and release UCX. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._regions.clear()
        self._engine.stop()

    # -- internals ----------------------------------------------------------------------------
    def _resolve(self, nonce: int, region_id: int, offset: int, length: int) -> tuple[int, memoryview | None]:
        """Server side: the view a peer's op addresses, or why it is refused (progress thread)."""
        if nonce != self._nonce:
            return P.STALE, None
        with self._lock:
            region = self._regions.get(region_id)
        if region is None:
            return P.NO_REGION, None
        if offset + length > len(region):
            return P.OUT_OF_BOUNDS, None
        return P.OK, region[offset : offset + length]

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"transport {self._address} is closed; build a new one")

    def _owns(self, region: Region) -> bool:
        if region.region_id not in self._regions:
            return False
        try:
            nonce, region_id, _ = P.parse_descriptor(region.descriptor, "region")
        except InvalidArgument:
            return False
        return nonce == self._nonce and region_id == region.region_id

    def _local_view(self, region: Any, where: str) -> memoryview:
        if not isinstance(region, Region) or not self._owns(region):
            raise InvalidArgument(
                f"{where}.local: region {getattr(region, 'region_id', region)!r} is not registered with "
                f"this endpoint ({self._address}); register() the buffer first"
            )
        return self._regions[region.region_id]


def _import_ucxx() -> None:
    """Import ucxx, or explain what to install. ucxx sets a few UCX_* defaults in os.environ when
    imported (UCX_MEMTYPE_CACHE, UCX_RNDV_THRESH); we also keep UCX from warning about variables
    its build does not use, which ucxx's own defaults trigger on CPU-only wheels."""
    import os

    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        import ucxx  # noqa: F401  (loads libucx/libucxx and sets ucxx's UCX_* defaults)
        from ucxx._lib import libucxx  # noqa: F401
    except ImportError as exc:
        raise TransportError(
            f"ucx: ucxx is not importable ({exc}); install it with `pip install ucxx-cu12` (or ucxx-cu13)"
        ) from None


@functools.lru_cache(maxsize=1)
def _availability() -> Availability:
    """Whether ucxx imports, and which transports its UCX build brings. Reads the list of UCX
    transport modules from disk instead of creating a UCX context (which would open devices)."""
    import importlib.metadata

    try:
        _import_ucxx()
        from ucxx._lib import libucxx
    except TransportError as exc:
        return Availability(False, str(exc))
    except Exception as exc:  # a broken native library: report, never raise
        return Availability(False, f"ucxx failed to import: {type(exc).__name__}: {exc}")
    version = ".".join(str(v) for v in libucxx.get_ucx_version())
    try:
        ucxx_version = importlib.metadata.version("ucxx-cu12")
    except importlib.metadata.PackageNotFoundError:
        ucxx_version = getattr(__import__("ucxx"), "__version__", "?")
    modules = _uct_modules()
    if modules is None:
        return Availability(True, f"ucxx {ucxx_version}, system UCX {version}; transports: run `ucx_info -d`")
    builtin = ("self", "tcp", "posix", "sysv")  # compiled into libuct, not separate modules
    offered = ["self", "tcp", "sm (posix, sysv)"] + [
        f"{m} (needs a GPU)" if m.startswith(("cuda", "gdr")) else m for m in modules if m not in builtin
    ]
    rdma = [m for m in modules if m.startswith(RDMA_MODULES)]
    note = (f"RDMA transports: {', '.join(rdma)}" if rdma
            else "no RDMA transports in this UCX build (tcp, sm, cma only)")
    return Availability(True, f"ucxx {ucxx_version}, UCX {version}; transports: {', '.join(offered)}; {note}")


def _uct_modules() -> list[str] | None:
    """UCX transport plugin modules (``libuct_<name>.so``) of the wheel's UCX, or None when UCX
    comes from the system (then ``ucx_info -d`` is the authority)."""
    try:
        import libucx
    except ImportError:
        return None
    directory = Path(libucx.__file__).parent / "lib" / "ucx"
    names = {p.name.split(".so")[0][len("libuct_"):] for p in directory.glob("libuct_*.so*")}
    return sorted(names)


