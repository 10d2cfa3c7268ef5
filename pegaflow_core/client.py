"""The engine-side client that connectors use: register a KV cache once, then one Save / Query /
Load per engine step per rank.

Connectors must keep serving when the daemon is down: every call raises ``DaemonUnavailable``
(a ``TransportError``) quickly instead of hanging, and connectors treat that as a miss. A
background session stream tells the daemon this client is alive (its leases and contexts are freed
when it dies) and notices a daemon restart, after which every context is registered again under
the same ``ContextHandle``, so callers never see the new ids.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import grpc

from ._proto import pegaflow_pb2 as pb
from ._proto import pegaflow_pb2_grpc as pb_grpc
from .errors import CapacityError, DaemonUnavailable, InvalidArgument, NotFound, PegaflowError
from .layout import Plane
from .local_rpc import LOCAL_METHODS, ErrorReply, LocalChannel, NotSent
from .packed import pack_block_ids, pack_hashes

if TYPE_CHECKING:
    from .engine_copy import EngineLoad, EngineLoader

log = logging.getLogger("pegaflow.client")
T = TypeVar("T")

DEFAULT_ENDPOINT = "127.0.0.1:50055"
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    # gRPC's default reconnect backoff grows to two minutes; a restarted daemon must be found again
    # within a second so engines go back from misses to hits quickly.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class RegionSpec:
    """KV memory the daemon reaches: a shared-memory file (``kind="shm"``, ``path``), memory of
    the engine process itself (``kind="cma"``, ``pid`` + ``address``: any CPU tensor) or GPU
    memory (``kind="cuda_ipc"``, ``handle`` of the allocation, ``device`` and ``device_uuid``).
    ``address`` is where the region starts in the engine process; besides cma, the engine's own
    side of a load (engine_copy.py) copies there."""

    nbytes: int
    path: str = ""
    kind: str = "shm"
    handle: bytes = b""
    device: int = -1
    pid: int = 0
    address: int = 0
    device_uuid: str = ""


@dataclass(frozen=True)
class ContextSpec:
    """Everything RegisterContext needs; kept by the client to register again after a restart."""

    namespace: str
    num_blocks: int
    regions: tuple[RegionSpec, ...]
    planes: tuple[Plane, ...]
    instance_id: str = ""
    shard: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    device: int = -1
    block_bytes: int = 0  # query-only contexts (no regions): the size of the namespace's blocks

    @classmethod
    def query_only(cls, namespace: str, block_bytes: int, instance_id: str = "", shard: int = 0) -> ContextSpec:
        """A context that can Query but owns no KV memory (a scheduler, a router)."""
        return cls(namespace=namespace, num_blocks=0, regions=(), planes=(), instance_id=instance_id,
                   shard=shard, block_bytes=block_bytes)

    @property
    def num_layers(self) -> int:
        return len({p.layer for p in self.planes})


@dataclass
class ContextHandle:
    """A registered context. ``context_id`` may change under it when the daemon restarts."""

    spec: ContextSpec
    context_id: str = ""
    block_bytes: int = 0
    daemon_id: str = ""
    packed_keys: bool = False  # the daemon reads the packed form of ids and hashes (packed.py)
    loader: EngineLoader | None = None  # copies this context's loads in this process (engine_copy.py)
    pool: tuple[str, str] = ("", "")  # (daemon id, pool path) the loader maps
    settled: threading.Event = field(default_factory=threading.Event)  # the loader was opened, or none will be

    def engine_copy_ready(self, timeout_s: float = 120.0) -> bool:
        """Wait until this context's loads are copied in this process (its loader opened and, on
        a GPU, the pool registered with CUDA); False when they will not be, or not in time."""
        deadline = time.monotonic() + timeout_s
        if not self.settled.wait(timeout_s):
            return False
        loader = self.loader
        return loader is not None and loader.settled.wait(max(0.0, deadline - time.monotonic())) and loader.ready


@dataclass(frozen=True)
class SaveResult:
    stored: int
    already_present: int
    dropped: int


@dataclass(frozen=True)
class QueryResult:
    hit_blocks: int
    lease_id: str
    loading: bool = False


@dataclass(frozen=True)
class LoadResult:
    failed_block_ids: tuple[int, ...]
    bytes: int


def _error(exc: grpc.RpcError, what: str) -> PegaflowError:
    return _error_of(exc.code(), exc.details() or "", what)


def _error_of(code: grpc.StatusCode, detail: str, what: str) -> PegaflowError:
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return DaemonUnavailable(f"{what}: pegaflow daemon unavailable ({code.name}: {detail})")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"{what}: {detail}")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what}: {detail}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return CapacityError(f"{what}: {detail}")
    return PegaflowError(f"{what}: {code.name}: {detail}")


def register_request(spec: ContextSpec, session_id: str) -> pb.RegisterContextRequest:
    return pb.RegisterContextRequest(
        session_id=session_id, instance_id=spec.instance_id, namespace=spec.namespace, shard=spec.shard,
        tp_rank=spec.tp_rank, tp_size=spec.tp_size, pp_rank=spec.pp_rank, pp_size=spec.pp_size,
        device=spec.device, num_blocks=spec.num_blocks, num_layers=spec.num_layers,
        regions=[pb.MemoryRegion(kind=r.kind, path=r.path, handle=r.handle, nbytes=r.nbytes, device=r.device,
                                 pid=r.pid, address=r.address, device_uuid=r.device_uuid) for r in spec.regions],
        planes=[pb.Plane(layer=p.layer, region=p.region, offset=p.offset, block_stride=p.block_stride, block_bytes=p.block_bytes) for p in spec.planes],
        block_bytes=spec.block_bytes,
    )


class _Located:
    """Pool offsets a Query answered with (and the loader of that pool), by lease, until the load
    (or release) takes them.
    Bounded: a lease queried and never loaded nor released must not grow it forever."""

    LIMIT = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_lease: dict[str, tuple[EngineLoader, bytes]] = {}

    def put(self, lease_id: str, packed: tuple[EngineLoader, bytes]) -> None:
        with self._lock:
            if len(self._by_lease) >= self.LIMIT:
                del self._by_lease[next(iter(self._by_lease))]  # the oldest
            self._by_lease[lease_id] = packed

    def take(self, lease_id: str) -> tuple[EngineLoader, bytes] | None:
        with self._lock:
            return self._by_lease.pop(lease_id, None)


class LoadHandle:
    """An asynchronous load. ``wait_layer(i)`` returns once layer ``i`` is in place, so the engine
    can compute layer i while later layers are still being copied."""

    def __init__(self, stream: Iterator[pb.LoadProgress], num_layers: int) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.layers_done = 0
        self.num_layers = num_layers
        self.result: LoadResult | None = None

    def wait_layer(self, layer: int) -> None:
        while self.result is None and self.layers_done <= layer:
            self._next()

    def wait(self) -> LoadResult:
        while self.result is None:
            self._next()
        return self.result

    def _next(self) -> None:
        with self._lock:
            if self.result is not None:
                return
            try:
                progress = next(self._stream)
            except StopIteration:
                raise DaemonUnavailable("load: the daemon ended the stream before the load finished") from None
            except grpc.RpcError as exc:
                raise _error(exc, "load") from None
            except ErrorReply as exc:  # the local socket's form of the same errors
                raise _error_of(exc.code, exc.detail, "load") from None
            self.layers_done = progress.layers_done
            if progress.done:
                self.result = LoadResult(tuple(progress.failed_block_ids), progress.bytes)


class PegaflowClient:
    """Synchronous client. Thread-safe; one per engine process is enough.

    With ``local=True`` (the default) Save, Query, Release, Health, Load and Locate go over the
    daemon's Unix socket once a context is registered, if the daemon has one and it leads to the
    same daemon from here (local_rpc.py); everything else, and every call when it does not, uses
    gRPC. With ``engine_copy=True`` (the default; ``PEGAFLOW_ENGINE_COPY=0`` turns it off) a
    context whose memory kind can copy in this process loads from the daemon's pool itself
    (engine_copy.py)."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout_s: float = 5.0, description: str = "",
                 local: bool = True, engine_copy: bool | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.local = local
        self.engine_copy = os.environ.get("PEGAFLOW_ENGINE_COPY", "1") != "0" if engine_copy is None else engine_copy
        self._local: LocalChannel | None = None
        self.session_id = uuid.uuid4().hex
        self.description = description
        self._channel = grpc.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.PegaflowStub(self._channel)
        self._lock = threading.Lock()
        self._register_lock = threading.Lock()  # one registration at a time: see _register_again
        self._contexts: list[ContextHandle] = []
        self._located = _Located()  # offsets of leased blocks from Query answers, until their load
        self._closed = threading.Event()
        self.daemon_id = ""
        self._session_thread = threading.Thread(target=self._session_loop, name="pegaflow-session", daemon=True)
        self._session_thread.start()

    # -- session and reconnects ----------------------------------------------------------------
    def _session_loop(self) -> None:
        backoff = 0.05
        while not self._closed.is_set():
            try:
                stream = self._stub.Session(pb.SessionRequest(session_id=self.session_id, description=self.description))
                self._session_call = stream
                for event in stream:
                    backoff = 0.05
                    if event.daemon_id != self.daemon_id:
                        self._on_daemon(event.daemon_id)
            except grpc.RpcError as exc:
                if self._closed.is_set():
                    return
                log.debug("session stream ended: %s", exc.code())
            self._closed.wait(backoff)
            backoff = min(1.0, backoff * 2)

    def _on_daemon(self, daemon_id: str) -> None:
        restarted = bool(self.daemon_id)
        self.daemon_id = daemon_id
        if restarted:
            log.warning("pegaflow daemon at %s restarted; registering %d contexts again", self.endpoint, len(self._contexts))
        for handle in list(self._contexts):
            try:
                with self._register_lock:
                    if handle.daemon_id != daemon_id:  # an engine thread may have done it already
                        self._register(handle)
            except PegaflowError as exc:
                log.warning("re-registering %s failed: %s", handle.spec.instance_id, exc)

    def _call(self, method: str, request: object, what: str, timeout: float | None = None) -> object:
        if method in LOCAL_METHODS:
            try:
                reply = self._over_local(lambda channel: channel.call(method, request, timeout or self.timeout_s))
            except ErrorReply as exc:
                raise _error_of(exc.code, exc.detail, what) from None
            if reply is not None:
                return reply
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc, what) from None

    def _over_local(self, send: Callable[[LocalChannel], T]) -> T | None:
        """``send(channel)`` over the local socket; None when there is none, or when the request
        could not be sent (the daemon exited or restarted: the caller goes over gRPC, which finds
        out which)."""
        local = self._local
        if local is None:
            return None
        try:
            return send(local)
        except NotSent as exc:
            log.debug("local socket unusable (%s); back to gRPC", exc)
            self._drop_local(local)
            return None

    @property
    def local_socket(self) -> str | None:
        """The Unix socket this client sends Save/Query/Release/Health/Load/Locate to, or None while it uses gRPC."""
        local = self._local
        return local.path if local is not None else None

    def _use_local(self, path: str, daemon_id: str) -> None:
        """Use the daemon's local socket if this client reaches it and it leads to the daemon that
        gave its path: a remote daemon's path may name another daemon on this machine, or none."""
        current = self._local
        if not self.local or not path:
            self._drop_local(current)
            return
        if current is not None and current.path == path and current.daemon_id == daemon_id:
            return
        channel = LocalChannel(path)
        try:
            found = channel.call("Health", pb.HealthRequest(), self.timeout_s).daemon_id
        except (NotSent, ErrorReply, PegaflowError) as exc:
            found = f"none ({exc})"
        if found != daemon_id:
            log.debug("not using local socket %s: it leads to daemon %s, not %s", path, found, daemon_id)
            channel.close()
            self._drop_local(current)
            return
        channel.daemon_id = daemon_id
        self._local = channel
        if current is not None:
            current.close()

    def _drop_local(self, channel: LocalChannel | None) -> None:
        if channel is not None:
            if self._local is channel:
                self._local = None
            channel.close()

    def _with_context(self, handle: ContextHandle, method: str, make: object, what: str,
                      timeout: float | None = None) -> object:
        """Call with the handle's current id; on 'unknown context' (daemon restarted) register
        again and retry once."""
        seen = handle.context_id
        if not seen:
            self._register_again(handle, seen)
        try:
            return self._call(method, make(handle.context_id), what, timeout)
        except NotFound as exc:
            if "unknown context" not in str(exc):
                raise
            self._register_again(handle, seen)
            return self._call(method, make(handle.context_id), what, timeout)

    def _register_again(self, handle: ContextHandle, seen: str) -> None:
        """Register ``handle`` unless another thread did since its id was ``seen``: after a daemon
        restart the session thread and an engine thread whose call failed both try, and a second
        registration of one instance and rank in a session is refused by the daemon."""
        with self._register_lock:
            if handle.context_id == seen:
                self._register(handle)

    # -- API ----------------------------------------------------------------------------------
    def health(self, timeout_s: float | None = None) -> pb.HealthResponse:
        return self._call("Health", pb.HealthRequest(), "health", timeout_s)

    def wait_ready(self, timeout_s: float = 10.0) -> pb.HealthResponse:
        """Poll Health until the daemon answers (e.g. right after starting it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.health(timeout_s=0.5)
            except DaemonUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def wait_warm(self, timeout_s: float = 600.0) -> float:
        """Wait until no tier is still faulting its memory in; return the seconds waited.
        Serving starts before that; benchmarks wait so they time the steady state."""
        started = time.monotonic()
        while self.health().warming:
            if time.monotonic() - started > timeout_s:
                raise DaemonUnavailable(f"the daemon was still warming up after {timeout_s:.0f}s")
            time.sleep(0.1)
        return time.monotonic() - started

    def register_context(self, spec: ContextSpec) -> ContextHandle:
        if any(r.kind == "cma" for r in spec.regions):
            from .cma import allow_daemon_access

            allow_daemon_access()
        handle = ContextHandle(spec)
        with self._register_lock:
            self._register(handle)
        with self._lock:
            self._contexts.append(handle)
        return handle

    def _register(self, handle: ContextHandle) -> None:
        reply = self._call("RegisterContext", register_request(handle.spec, self.session_id), "register_context")
        handle.context_id, handle.block_bytes, handle.daemon_id = reply.context_id, reply.block_bytes, reply.daemon_id
        handle.packed_keys = reply.packed_keys
        self._use_local(reply.local_socket, reply.daemon_id)
        self._map_pool(handle, reply)

    def _map_pool(self, handle: ContextHandle, reply: pb.RegisterContextResponse) -> None:
        """Keep, replace or drop the context's loader for the pool this registration named."""
        from .engine_copy import open_engine_loader
        from .tier import SharedPool

        offered = reply.HasField("pool") and reply.pool.path and self.engine_copy and self._local is not None
        wanted = (reply.daemon_id, reply.pool.path) if offered else ("", "")
        if handle.pool == wanted:
            return
        old, handle.loader, handle.pool = handle.loader, None, wanted
        if old is not None:
            old.close()
        if not offered:
            handle.settled.set()
            return
        handle.settled.clear()
        p = reply.pool
        pool = SharedPool(p.path, p.data_offset, p.data_bytes, p.chunk_bytes)

        def open_loader() -> None:  # off the registration: loading the plugins, mapping the pool
            loader = open_engine_loader(handle.spec, pool)
            with self._register_lock:
                if handle.pool == wanted and handle.loader is None and not self._closed.is_set():
                    handle.loader, loader = loader, None
                handle.settled.set()
            if loader is not None:
                loader.close()

        threading.Thread(target=open_loader, name="pegaflow-engine-loader", daemon=True).start()

    def unregister_context(self, handle: ContextHandle) -> None:
        with self._lock:
            if handle in self._contexts:
                self._contexts.remove(handle)
        loader, handle.loader, handle.pool = handle.loader, None, ("", "")
        if loader is not None:
            loader.close()
        if handle.context_id:
            try:
                self._call("UnregisterContext", pb.UnregisterContextRequest(context_id=handle.context_id), "unregister_context")
            except NotFound:
                pass

    def save(self, handle: ContextHandle, block_ids: Sequence[int], block_hashes: Sequence[bytes]) -> SaveResult:
        packed = pack_hashes(block_hashes)

        def request(cid: str) -> pb.SaveRequest:
            if packed is None or not handle.packed_keys:  # odd hashes (the daemon names them), an older daemon
                return pb.SaveRequest(context_id=cid, block_ids=list(block_ids), block_hashes=list(block_hashes))
            return pb.SaveRequest(context_id=cid, packed_block_ids=pack_block_ids(block_ids),
                                  packed_block_hashes=packed[0], hash_bytes=packed[1])

        reply = self._with_context(handle, "Save", request, "save")
        return SaveResult(reply.stored, reply.already_present, reply.dropped)

    def query(self, handle: ContextHandle, block_hashes: Sequence[bytes], lease_ttl_s: float = 0.0,
              wait_s: float = 0.0) -> QueryResult:
        """Lease the longest cached prefix. ``loading`` in the answer: some of it is still being
        promoted from a lower tier or another node; ask again. With ``wait_s`` > 0 the daemon
        waits up to that long for those blocks first, so a caller that can block gets them
        without polling."""
        packed = pack_hashes(block_hashes)
        # A context that loads in this process asks where the hits are too, saving its load a Locate.
        locate = handle.loader is not None and handle.loader.ready

        def request(cid: str) -> pb.QueryRequest:
            if packed is None or not handle.packed_keys:
                return pb.QueryRequest(context_id=cid, block_hashes=list(block_hashes), lease_ttl_s=lease_ttl_s,
                                       wait_s=wait_s, locate=locate)
            return pb.QueryRequest(context_id=cid, packed_block_hashes=packed[0], hash_bytes=packed[1],
                                   lease_ttl_s=lease_ttl_s, wait_s=wait_s, locate=locate)

        waits = wait_s if isinstance(wait_s, (int, float)) and 0 < wait_s < math.inf else 0.0  # the daemon judges the value
        reply = self._with_context(handle, "Query", request, "query", self.timeout_s + waits)
        if reply.packed_offsets and handle.loader is not None:
            # Kept with the loader whose pool they index: after a daemon restart the handle maps
            # another pool, where these offsets mean nothing.
            self._located.put(reply.lease_id, (handle.loader, reply.packed_offsets))
        return QueryResult(reply.hit_blocks, reply.lease_id, reply.loading)

    def load(self, handle: ContextHandle, lease_id: str, block_ids: Sequence[int], release_after: bool = True,
             engine_copy: bool = True) -> LoadHandle | EngineLoad:
        """Copy the lease's first ``len(block_ids)`` blocks into those engine blocks, layer by
        layer: in this process when the context's loader is ready and the daemon has them all
        ready in its pool (engine_copy.py; ``engine_copy=False``: never, for comparisons), else
        by the daemon."""
        if not handle.context_id:
            self._register_again(handle, "")
        request = pb.LoadRequest(context_id=handle.context_id, lease_id=lease_id, block_ids=list(block_ids), release_after=release_after)
        loader = handle.loader
        if engine_copy and loader is not None and loader.ready and block_ids:
            started = self._load_here(handle, loader, request)
            if started is not None:
                return started
        timeout = max(self.timeout_s, 60.0)
        stream = self._over_local(lambda channel: channel.stream("Load", request, timeout))
        if stream is None:
            stream = self._stub.Load(request, timeout=timeout)
        return LoadHandle(stream, handle.spec.num_layers)

    def _load_here(self, handle: ContextHandle, loader: EngineLoader, request: pb.LoadRequest) -> EngineLoad | None:
        """Ask where the blocks are and copy them in this process; None: the daemon loads them (a
        block not ready in its pool, or an error, which the daemon's Load then reports)."""
        import numpy as np

        count = len(request.block_ids)
        found = self._located.take(request.lease_id)
        packed = found[1] if found is not None and found[0] is loader else None
        if packed is None or len(packed) < 8 * count:
            try:
                packed = self._call("Locate", request, "locate").packed_offsets
            except PegaflowError as exc:
                log.debug("locate failed (%s); the daemon loads", exc)
                return None
        offsets = np.frombuffer(packed, dtype="<i8", count=min(count, len(packed) // 8))
        if offsets.size != count or offsets.min() < 0:
            return None
        lease_id = request.lease_id
        after = (lambda: self._release_quietly(lease_id)) if request.release_after else None
        return loader.start(request.block_ids, offsets, handle.spec.num_layers, handle.block_bytes, after)

    def _release_quietly(self, lease_id: str) -> None:
        """After an engine-side load: a daemon that cannot be reached frees the lease itself
        (its TTL, or the end of this session)."""
        try:
            self.release([lease_id])
        except PegaflowError as exc:
            log.debug("release of %s after an engine-side load failed: %s", lease_id, exc)

    def probe_remote(self, handle: ContextHandle, node: str, block_hashes: Sequence[bytes]) -> tuple[int, float]:
        """(bytes, seconds) of the bare transport moving these blocks from ``node``, which holds
        them, into scratch space here; for benchmarks (see ``pegaflow bench remote``)."""
        reply = self._with_context(handle, "ProbeRemote", lambda cid: pb.ProbeRemoteRequest(
            context_id=cid, node=node, block_hashes=list(block_hashes)), "probe")
        return reply.bytes, reply.seconds

    def release(self, lease_ids: Sequence[str]) -> int:
        for lease_id in lease_ids:
            self._located.take(lease_id)
        return self._call("Release", pb.ReleaseRequest(lease_ids=[l for l in lease_ids if l]), "release").released

    def stats(self) -> pb.StatsResponse:
        return self._call("Stats", pb.StatsRequest(), "stats")

    def close(self) -> None:
        """Unregister nothing explicitly: closing the session frees this client's leases and
        contexts on the daemon side."""
        self._closed.set()
        for handle in list(self._contexts):
            loader, handle.loader = handle.loader, None
            if loader is not None:
                loader.close()
        self._drop_local(self._local)
        call = getattr(self, "_session_call", None)
        if call is not None:
            call.cancel()
        self._channel.close()
        self._session_thread.join(timeout=2)

    def __enter__(self) -> PegaflowClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
