"""``pegaflow serve``: the daemon. A grpc.aio control plane over the tier stack.

The servicer validates requests, turns them into stack and copier calls, and maps pegaflow errors
to gRPC status codes. Copies run on a thread pool, never on the event loop. A client holds a
Session stream open; when it drops (exit or kill -9) the daemon releases that session's leases and
unregisters its contexts, so a dead engine pins nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message

from . import __version__
from ._proto import pegaflow_pb2 as pb
from ._proto import pegaflow_pb2_grpc as pb_grpc
from .checksum import algorithm_name, checksum
from .config import MAX_UNIX_PATH, DaemonConfig
from .contexts import ContextTable, EngineContext, EngineRegion
from .copier import engine_segments
from .errors import CapacityError, ConfigError, InvalidArgument, NotFound, PegaflowError, PluginError
from .index import Lease
from .keys import BlockKey
from .layout import KVLayout, Plane
from .local_rpc import LocalServer, reap_stale
from .memory import EngineMemory, Landed, RegionRequest
from .metrics import Metrics
from .packed import block_ids_of, keys_of
from .plugins import get_registry
from .shm import reap_orphans
from .stack import TierStack
from .tier import StackContext

log = logging.getLogger("pegaflow.daemon")

MAX_MESSAGE_BYTES = 64 << 20
MAX_QUERY_WAIT_S = 60.0  # the longest a Query may wait for hits still being promoted
_STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    CapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _status_of(exc: BaseException) -> grpc.StatusCode:
    if not isinstance(exc, PegaflowError):
        return grpc.StatusCode.INTERNAL
    return next((c for t, c in _STATUS.items() if isinstance(exc, t)), grpc.StatusCode.FAILED_PRECONDITION)


def _failure(servicer: Servicer, method: str, exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message that answer ``exc``; unexpected errors are logged with a
    traceback."""
    code = _status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method, exc_info=exc)
    servicer.metrics.rpc_errors.labels(method, code.name).inc()
    return code, str(exc) if isinstance(exc, PegaflowError) else f"internal error: {exc!r}"


async def _abort(servicer: Servicer, method: str, context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """Answer with the status code of ``exc``."""
    await context.abort(*_failure(servicer, method, exc))


def _rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Time a unary RPC and turn errors into precise status codes with their message."""
    name = method.__name__

    @functools.wraps(method)
    async def unary(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        try:
            return await method(self, request, context)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(self, name, context, exc)
        finally:
            self.metrics.rpc_seconds.labels(name).observe(time.perf_counter() - start)

    return unary


class _LocalAbort(Exception):
    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


class _LocalContext:
    """What a streaming handler uses of its gRPC context when it serves the local socket."""

    async def abort(self, code: grpc.StatusCode, detail: str) -> None:
        raise _LocalAbort(code, detail)


class Servicer(pb_grpc.PegaflowServicer):
    def __init__(self, config: DaemonConfig, stack: TierStack, metrics: Metrics, executor: ThreadPoolExecutor) -> None:
        self.config = config
        self.stack = stack
        self.metrics = metrics
        self.executor = executor
        self._memories: dict[str, EngineMemory] = {}
        self._memory_lock = threading.Lock()
        self.contexts = ContextTable()
        self.leases: dict[str, Lease] = {}
        self.sessions: dict[str, int] = {}
        self.daemon_id = secrets.token_hex(8)
        self.started = time.monotonic()
        self.degraded: list[str] = []
        self.local_socket = ""  # the local fast path's socket (local_rpc.py), once it listens
        metrics.bind_gauge(metrics.contexts, lambda: len(self.contexts))
        metrics.bind_gauge(metrics.sessions, lambda: len(self.sessions))
        metrics.bind_gauge(metrics.leases, lambda: self.stack.index.stats().leases)
        metrics.bind_gauge(metrics.pinned, lambda: self.stack.index.stats().pinned)

    async def _offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def answer_local(self, method: str, request: Message) -> tuple[grpc.StatusCode, Message | str]:
        """One request from the local socket (local_rpc.py): the same handler, metrics and error
        mapping as over gRPC, without a gRPC context (the handlers it serves never use one)."""
        handler = getattr(type(self), method)
        start = time.perf_counter()
        try:
            return grpc.StatusCode.OK, await getattr(handler, "__wrapped__", handler)(self, request, None)
        except Exception as exc:
            return _failure(self, method, exc)
        finally:
            self.metrics.rpc_seconds.labels(method).observe(time.perf_counter() - start)

    async def answer_local_stream(self, method: str, request: Message) -> AsyncIterator[tuple[grpc.StatusCode, Message | str]]:
        """A streaming request from the local socket (Load): its messages, then an error status if
        it fails, as the gRPC handler would abort with."""
        context = _LocalContext()
        try:
            async for reply in getattr(self, method)(request, context):
                yield grpc.StatusCode.OK, reply
        except _LocalAbort as exc:
            yield exc.code, exc.detail

    # -- liveness -----------------------------------------------------------------------------
    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse(
            status="serving", daemon_id=self.daemon_id, version=__version__,
            node=self.config.server.node, uptime_s=time.monotonic() - self.started,
            warming=any(tier.warming for _, tier in self.stack.tiers), degraded=self.degraded,
            local_socket=self.local_socket,
        )

    async def Session(self, request: pb.SessionRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SessionEvent]:
        session_id = request.session_id
        if not session_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id must not be empty")
        self.sessions[session_id] = self.sessions.get(session_id, 0) + 1
        log.info("session %s opened (%s)", session_id, request.description)
        try:
            yield pb.SessionEvent(daemon_id=self.daemon_id)
            await asyncio.Event().wait()  # until the client goes away and gRPC cancels us
        finally:
            self.sessions[session_id] -= 1
            if self.sessions[session_id] == 0:
                del self.sessions[session_id]
                self._end_session(session_id)

    def _end_session(self, session_id: str) -> None:
        released = self.stack.index.release_owner(session_id)
        for lease_id in [k for k, lease in self.leases.items() if lease.owner == session_id]:
            del self.leases[lease_id]
        gone = self.contexts.pop_session(session_id)
        for ctx in gone:
            ctx.close()
        log.info("session %s ended: released %d leases, unregistered %d contexts", session_id, released, len(gone))

    # -- contexts -----------------------------------------------------------------------------
    @_rpc
    async def RegisterContext(self, request: pb.RegisterContextRequest, context: grpc.aio.ServicerContext) -> pb.RegisterContextResponse:
        if not request.namespace:
            raise InvalidArgument("namespace must not be empty")
        if not request.regions:
            return self._register_query_only(request)
        if request.tp_size and request.tp_rank >= request.tp_size:
            raise InvalidArgument(f"tp_rank {request.tp_rank} is not below tp_size {request.tp_size}")
        layout = KVLayout(
            num_blocks=request.num_blocks,
            num_layers=request.num_layers or len({p.layer for p in request.planes}),
            planes=tuple(Plane(p.layer, p.region, p.offset, p.block_stride, p.block_bytes) for p in request.planes),
        )
        layout.validate([r.nbytes for r in request.regions])
        regions = await self._offload(self._map_regions, list(request.regions))
        memory = self.memory(request.regions[0].kind)  # built by _map_regions already
        try:
            self.stack.claim_block_size(request.namespace, layout.block_bytes)
        except PegaflowError:
            for region in regions:
                region.close()
            raise
        ctx = EngineContext(
            context_id=self.contexts.new_id(), session_id=request.session_id, instance_id=request.instance_id,
            namespace=request.namespace, shard=request.shard, layout=layout, regions=regions,
            device=request.device, tp_rank=request.tp_rank, tp_size=request.tp_size or 1, memory=memory,
        )
        try:
            self.contexts.add(ctx)
        except PegaflowError:
            ctx.close()
            raise
        log.info("registered %s: instance %s ns %s shard %d, %d blocks of %d bytes",
                 ctx.context_id, ctx.instance_id, ctx.namespace, ctx.shard, layout.num_blocks, layout.block_bytes)
        pool = self.stack.top[1].shared_pool()
        return pb.RegisterContextResponse(
            context_id=ctx.context_id, block_bytes=layout.block_bytes, daemon_id=self.daemon_id, packed_keys=True,
            local_socket=self.local_socket,
            pool=None if pool is None else pb.SharedPool(path=pool.path, data_offset=pool.data_offset,
                                                         data_bytes=pool.data_bytes, chunk_bytes=pool.chunk_bytes),
        )

    def _register_query_only(self, request: pb.RegisterContextRequest) -> pb.RegisterContextResponse:
        """A context without KV memory (a scheduler): it names its namespace's block size so a
        mismatched one is refused like any other, and can then Query."""
        if request.block_bytes <= 0:
            raise InvalidArgument(
                "regions: at least one KV memory region is needed, or block_bytes > 0 for a query-only context"
            )
        if request.planes:
            raise InvalidArgument("planes given without regions: planes describe registered KV memory")
        self.stack.claim_block_size(request.namespace, request.block_bytes)
        ctx = EngineContext(
            context_id=self.contexts.new_id(), session_id=request.session_id, instance_id=request.instance_id,
            namespace=request.namespace, shard=request.shard, layout=None, regions=[],
            tp_rank=request.tp_rank, tp_size=request.tp_size or 1, query_block_bytes=request.block_bytes,
        )
        self.contexts.add(ctx)
        log.info("registered %s: query-only, instance %s ns %s shard %d", ctx.context_id, ctx.instance_id,
                 ctx.namespace, ctx.shard)
        return pb.RegisterContextResponse(context_id=ctx.context_id, block_bytes=request.block_bytes,
                                          daemon_id=self.daemon_id, packed_keys=True, local_socket=self.local_socket)

    def _map_regions(self, regions: list[pb.MemoryRegion]) -> list[EngineRegion]:
        kinds = {r.kind for r in regions}
        if len(kinds) > 1:
            raise InvalidArgument(f"regions: every region of a context must be of one kind, got {sorted(kinds)}")
        mapped: list[EngineRegion] = []
        try:
            for i, region in enumerate(regions):
                request = RegionRequest(
                    index=i, kind=region.kind, nbytes=region.nbytes, path=region.path, handle=region.handle,
                    device=region.device, device_uuid=region.device_uuid, pid=region.pid, address=region.address,
                )
                mapped.append(self.memory(region.kind, f"regions[{i}].kind").open(request))
        except BaseException:
            for engine_region in mapped:
                engine_region.close()
            raise
        return mapped

    def memory(self, kind: str, where: str = "memory kind") -> EngineMemory:
        """The daemon's one instance of memory kind ``kind``, built on first use."""
        with self._memory_lock:
            found = self._memories.get(kind)
            if found is None:
                try:
                    cls = get_registry().get("memory", kind)
                except PluginError as exc:
                    raise InvalidArgument(f"{where} {kind!r} is not served by this daemon: {exc}") from None
                available = cls.availability()
                if not available.ok:
                    raise InvalidArgument(f"{where} {kind!r} cannot be served on this machine: {available.detail}")
                found = self._memories[kind] = cls()
            return found

    @_rpc
    async def UnregisterContext(self, request: pb.UnregisterContextRequest, context: grpc.aio.ServicerContext) -> pb.UnregisterContextResponse:
        self.contexts.pop(request.context_id).close()
        return pb.UnregisterContextResponse()

    # -- data ---------------------------------------------------------------------------------
    @_rpc
    async def Save(self, request: pb.SaveRequest, context: grpc.aio.ServicerContext) -> pb.SaveResponse:
        ctx = self.contexts.get(request.context_id)
        ids = block_ids_of(request)
        keys = keys_of(request, ctx.key_cache)
        if len(ids) != len(keys):
            raise InvalidArgument(f"block_ids has {len(ids)} entries but block_hashes has {len(keys)}")
        layout = ctx.kv_layout()
        layout.check_block_ids(ids)

        present = self.stack.stored_here(keys)
        if all(present):  # every block is stored on this node already: no copy, no thread hop
            self.metrics.deduplicated.inc(len(keys))
            return pb.SaveResponse(already_present=len(keys))

        block_ids = ids.tolist()
        memory = ctx.memory

        def fill(batches: Iterator[tuple[list[int], list[memoryview]]], landed: Landed) -> None:
            memory.gather_batches(layout, ctx.regions, (([block_ids[p] for p in positions], views)
                                                        for positions, views in batches), landed)

        start = time.perf_counter()
        outcome = await self._offload(self.stack.save, keys, ctx.block_bytes, fill, present)
        self.metrics.transfer_seconds.labels("save").observe(time.perf_counter() - start)
        return pb.SaveResponse(stored=outcome.stored, already_present=outcome.already_present, dropped=outcome.dropped)

    @_rpc
    async def Query(self, request: pb.QueryRequest, context: grpc.aio.ServicerContext) -> pb.QueryResponse:
        ctx = self.contexts.get(request.context_id)
        keys = keys_of(request, ctx.key_cache)
        ttl = request.lease_ttl_s or self.config.server.lease_ttl
        if ttl < 0:
            raise InvalidArgument(f"lease_ttl_s must be >= 0, got {ttl}")
        if not 0 <= request.wait_s <= MAX_QUERY_WAIT_S:
            raise InvalidArgument(f"wait_s must be between 0 and {MAX_QUERY_WAIT_S:g} seconds, got {request.wait_s}")
        owner = ctx.session_id or ctx.context_id
        lease, loading = self._query(keys, ttl, owner, ctx)
        if loading and request.wait_s > 0:
            # Wait for the promotions themselves (no polling), then answer afresh: the blocks
            # that arrived are this node's own hits now, leased here.
            first = lease
            try:
                promotions = self.stack.promotions(first.keys)
                if promotions:
                    await asyncio.wait([asyncio.wrap_future(f) for f in promotions], timeout=request.wait_s)
                lease, loading = self._query(keys, ttl, owner, ctx)
            finally:  # also when the caller went away meanwhile: the first lease is nobody's
                self.leases.pop(first.lease_id, None)
                self.executor.submit(self.stack.release, first.lease_id)  # off the answer's path (Redis)
        if lease.hits == 0:
            return pb.QueryResponse(hit_blocks=0)
        located = self._offsets(lease.keys[: lease.hits], ctx) if request.locate and not loading else b""
        return pb.QueryResponse(hit_blocks=lease.hits, lease_id=lease.lease_id, loading=loading, packed_offsets=located)

    def _query(self, keys: list[BlockKey], ttl: float, owner: str, ctx: EngineContext) -> tuple[Lease, bool]:
        """Lease the cached prefix of ``keys`` and start promoting its blocks held only lower
        down; returns the lease (released already when it holds nothing) and whether any of them
        is still on its way up."""
        lease = self.stack.acquire(keys, ttl, owner=owner)
        if lease.hits == 0:
            self.stack.release(lease.lease_id)
            return lease, False
        self.leases[lease.lease_id] = lease
        return lease, self._start_promotion(lease, ctx) if len(self.stack.tiers) > 1 else False

    def _start_promotion(self, lease: Lease, ctx: EngineContext) -> bool:
        """If some hit blocks are only in lower tiers (SSD), promote them in the background and
        answer "loading", so the engine asks again instead of blocking a step on the disk. The
        lease keeps them pinned meanwhile; a Load before it finishes waits for that promotion.
        Hits a device-I/O tier reads straight into this engine's GPU memory stay where they are."""
        device_memory = ctx.memory is not None and ctx.memory.device_memory
        return self.stack.start_promotion(lease.keys, ctx.block_bytes, self.executor.submit, device_memory,
                                          lease.locations)

    async def Load(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.LoadProgress]:
        start = time.perf_counter()
        try:
            ctx, lease, block_ids = self._check_load(request)
        except PegaflowError as exc:
            await _abort(self, "Load", context, exc)
        loop = asyncio.get_running_loop()
        progress: asyncio.Queue[int] = asyncio.Queue()
        num_layers = len(ctx.kv_layout().layer_groups())
        keys = list(lease.keys[: len(block_ids)])

        memory = ctx.memory

        def run() -> list[int]:
            # Route per hit (device_io.py): straight from a device-I/O tier into GPU memory, else
            # through the top tier (promoting what is only lower down) and the memory kind's copy.
            direct = self.stack.load_direct(
                keys, ctx.block_bytes, memory.device_memory,
                lambda positions: engine_segments(ctx.layout, ctx.regions, [block_ids[i] for i in positions]))
            staged = [i for i in range(len(keys)) if i not in direct]
            views = self.stack.read_views([keys[i] for i in staged], ctx.block_bytes) if staged else []
            failed = [block_ids[i] for i, v in zip(staged, views) if v is None]
            memory.scatter(ctx.layout, ctx.regions, [block_ids[i] for i in staged], views,
                           on_layer=lambda done: loop.call_soon_threadsafe(progress.put_nowait, done))
            loaded = len(staged) - len(failed)
            self.metrics.bytes.labels(self.stack.top[0], "load").inc(loaded * ctx.block_bytes)
            self.metrics.blocks.labels(self.stack.top[0], "load").inc(loaded + len(direct))
            return failed

        job = loop.run_in_executor(self.executor, run)
        try:
            layers_done = 0
            while layers_done < num_layers:
                getter = asyncio.ensure_future(progress.get())
                await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break  # the copy ended before reporting every layer: its error surfaces below
                layers_done = getter.result()
                while not progress.empty():  # layers that came in meanwhile: one message for all
                    layers_done = progress.get_nowait()
                if layers_done < num_layers:
                    yield pb.LoadProgress(layers_done=layers_done, num_layers=num_layers)
            try:
                failed = await job
            except Exception as exc:
                await _abort(self, "Load", context, exc)
            yield pb.LoadProgress(
                layers_done=num_layers, num_layers=num_layers, done=True, failed_block_ids=failed,
                bytes=(len(block_ids) - len(failed)) * ctx.block_bytes,
            )
        finally:
            if not job.done():
                try:
                    await asyncio.shield(job)  # never free a lease while its blocks are being copied
                except Exception:
                    pass  # already reported to the client, or the client is gone
            if request.release_after:
                self._release(request.lease_id)
            self.metrics.transfer_seconds.labels("load").observe(time.perf_counter() - start)
            self.metrics.rpc_seconds.labels("Load").observe(time.perf_counter() - start)

    def _check_load(self, request: pb.LoadRequest) -> tuple[EngineContext, Lease, list[int]]:
        ctx = self.contexts.get(request.context_id)
        lease = self.leases.get(request.lease_id)
        if lease is None or lease.expires_at < time.monotonic():
            raise NotFound(f"unknown or expired lease {request.lease_id!r}: query again")
        block_ids = list(request.block_ids)
        if len(block_ids) > lease.hits:
            raise InvalidArgument(f"block_ids has {len(block_ids)} entries but the lease holds {lease.hits} blocks")
        ctx.kv_layout().check_block_ids(block_ids)
        for key in lease.keys[: len(block_ids)]:
            if key.namespace != ctx.namespace or key.shard != ctx.shard:
                raise InvalidArgument(
                    f"lease {request.lease_id} holds blocks of namespace {key.namespace!r} shard {key.shard}, "
                    f"not of this context ({ctx.namespace!r} shard {ctx.shard})"
                )
        return ctx, lease, block_ids

    @_rpc
    async def Locate(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> pb.LocateResponse:
        """The engine-side load's first half: where the lease's first blocks lie in the shared pool.
        The client copies them and releases the lease; what is not ready in the top tier is -1, and
        the client then sends a Load for the whole request instead."""
        ctx, lease, block_ids = self._check_load(request)
        return pb.LocateResponse(packed_offsets=self._offsets(lease.keys[: len(block_ids)], ctx),
                                 block_bytes=ctx.block_bytes)

    def _offsets(self, keys: Sequence[BlockKey], ctx: EngineContext) -> bytes:
        """Packed pool offsets of leased blocks, -1 where the top tier has them not ready to read.
        Blocks handed out whole are counted as ``located`` (an engine copies them itself); else
        the client sends Load, which counts what the daemon copies as ``load``."""
        name, top = self.stack.top
        offsets = np.asarray(top.ready_offsets(keys), dtype="<i8")
        if offsets.size and offsets.min() >= 0:
            self.metrics.bytes.labels(name, "located").inc(offsets.size * ctx.block_bytes)
            self.metrics.blocks.labels(name, "located").inc(offsets.size)
        return offsets.tobytes()

    @_rpc
    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseResponse:
        return pb.ReleaseResponse(released=sum(self._release(lease_id) for lease_id in request.lease_ids))

    def _release(self, lease_id: str) -> bool:
        self.leases.pop(lease_id, None)
        return self.stack.release(lease_id)

    @_rpc
    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        tiers = []
        for name, tier in self.stack.tiers:
            usage = tier.usage()
            tiers.append(pb.TierStats(name=name, kind=tier.kind, capacity_bytes=usage.capacity_bytes,
                                      used_bytes=usage.used_bytes, blocks=usage.blocks))
        index = self.stack.index.stats()
        return pb.StatsResponse(
            daemon_id=self.daemon_id, uptime_s=time.monotonic() - self.started, tiers=tiers,
            index_blocks=index.blocks, pinned_blocks=index.pinned, leases=index.leases,
            contexts=len(self.contexts), sessions=len(self.sessions), counters=self.metrics.counters(),
        )

    # -- peers --------------------------------------------------------------------------------
    @_rpc
    async def Pin(self, request: pb.PinRequest, context: grpc.aio.ServicerContext) -> pb.PinResponse:
        keys = [BlockKey(b.namespace, b.block_hash, b.shard) for b in request.blocks]
        ttl = request.lease_ttl_s or self.config.server.lease_ttl
        return await self._offload(self._pin, keys, ttl, f"peer:{request.requester}")

    def _pin(self, keys: list[BlockKey], ttl: float, owner: str) -> pb.PinResponse:
        """Pin what this node holds of ``keys`` and say where it is, with each block's checksum:
        the one sealed with it, or taken from the bytes now for a block not sealed yet. The peer
        detects anything that differs when the bytes arrive."""
        lease = self.stack.index.acquire(keys, ttl, owner)
        _, top = self.stack.top
        located = top.locate(keys) if hasattr(top, "locate") else [None] * len(keys)
        sealed = top.checksums(keys) if hasattr(top, "checksums") else [None] * len(keys)
        views = top.view(keys)
        offsets, sizes, sums = [], [], []
        for where, view, known in zip(located, views, sealed):
            held = where is not None and view is not None
            offsets.append(where[0] if held else -1)
            sizes.append(where[1] if held else 0)
            sums.append((known if known is not None else checksum(view)) if held else 0)
        return pb.PinResponse(lease_id=lease.lease_id, offsets=offsets, nbytes=sizes, checksums=sums,
                              checksum_algorithm=algorithm_name())

    @_rpc
    async def ProbeRemote(self, request: pb.ProbeRemoteRequest, context: grpc.aio.ServicerContext) -> pb.ProbeRemoteResponse:
        ctx = self.contexts.get(request.context_id)
        moved, seconds = await self._offload(self.stack.probe_remote, request.node,
                                             ctx.keys(request.block_hashes), ctx.block_bytes)
        return pb.ProbeRemoteResponse(bytes=moved, seconds=seconds)

    # -- housekeeping -------------------------------------------------------------------------
    def expire(self) -> None:
        now = time.monotonic()
        self.stack.index.expire(now)
        for lease_id in [k for k, lease in self.leases.items() if lease.expires_at < now]:
            del self.leases[lease_id]

    def close(self) -> None:
        for ctx in self.contexts.all():
            ctx.close()
        for memory in self._memories.values():
            memory.close()


class Daemon:
    """One daemon: tier stack, gRPC server, metrics endpoint and housekeeping."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.degraded: list[str] = []  # lower tiers that could not be opened: served without them
        tiers = []
        try:
            for position, component in enumerate(config.tiers):
                try:
                    tiers.append((component.name, component.build()))
                except PegaflowError as exc:
                    if position == 0:
                        raise  # nothing to serve from without the top tier
                    message = f"{config.source}: {component.path} ({component.kind} {component.name!r}) is unavailable: {exc}"
                    log.error("%s; serving without it", message)
                    self.degraded.append(message)
            index = config.index.build()
            if type(index).shared:  # a cluster index: this node's own blocks stay served without it
                from .default_plugins.local_index import LocalIndex
                from .node_index import NodeIndex

                index = NodeIndex(LocalIndex(), index)
        except BaseException:
            for _, tier in tiers:
                tier.close()
            raise
        self.stack = TierStack(tiers, index, self.metrics, node="", publish_offsets=config.transport is not None)
        self.transport, self.pool_region = self._connect_cluster(config, index, tiers)
        self.executor = ThreadPoolExecutor(8, thread_name_prefix="pegaflow-rpc")
        self.servicer = Servicer(config, self.stack, self.metrics, self.executor)
        self.servicer.degraded = self.degraded
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_address: tuple[str, int] | None = None
        self.local: LocalServer | None = None
        self._housekeeping: asyncio.Task[None] | None = None

    @staticmethod
    def _connect_cluster(config: DaemonConfig, index: Any, tiers: list[tuple[str, Any]]) -> tuple[Any, Any]:
        """Build the transport (if configured), register the top tier's pool with it once, and
        hand every tier what it may need (a remote tier needs all of it)."""
        node = config.server.node
        index_node = getattr(index, "node", None)
        if index_node not in (None, node):
            raise ConfigError(
                f"the index's node id {index_node!r} differs from server.node {node!r}: set both to this "
                "machine's id, or this daemon's blocks are published under another node",
                file=config.source, path="index.node",
            )
        top = tiers[0][1]
        transport = pool_region = None
        if config.transport is not None:
            if not hasattr(top, "buffer"):
                raise ConfigError(f"tiers[0] ({top.kind}) has no pool buffer a transport could serve to peers",
                                  file=config.source, path="transport")
            transport = config.transport.build()
            pool_region = transport.register(top.buffer())
        context = StackContext(node=node, index=index, top=top, transport=transport, pool_region=pool_region)
        for _, tier in tiers:
            tier.attach(context)
        return transport, pool_region

    def _publish_node(self) -> None:
        """Tell the cluster index where this daemon and its pool are (no-op for a local index)."""
        if self.transport is None:
            return
        host = self.config.server.listen.rpartition(":")[0]
        kind = self.config.transport.kind
        self.stack.index.register_node(self.config.server.node, f"{host}:{self.port}", {
            f"{kind}.address": self.transport.address.encode(),
            f"{kind}.pool": self.pool_region.descriptor,
        })

    async def start(self) -> None:
        reap_orphans()
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ])
        pb_grpc.add_PegaflowServicer_to_server(self.servicer, self.server)
        listen = self.config.server.listen
        self.port = self.server.add_insecure_port(listen)
        if self.port == 0:
            raise PegaflowError(f"server.listen: cannot bind {listen} (address in use or not local)")
        await self.server.start()
        await self._start_local()
        if self.config.server.metrics:
            self.metrics_address = self.metrics.serve(self.config.server.metrics)
        self._publish_node()
        self._housekeeping = asyncio.create_task(self._housekeep())
        host = listen.rpartition(":")[0]
        log.info("pegaflow %s serving on %s:%d (tiers: %s; metrics: %s; local socket: %s)", __version__, host,
                 self.port, ", ".join(f"{n}={t.kind}" for n, t in self.stack.tiers),
                 "http://%s:%d/metrics" % self.metrics_address if self.metrics_address else "off",
                 self.servicer.local_socket or "off")

    def local_socket_path(self) -> str | None:
        """Where the local socket goes: ``server.local_socket``, or for ``auto`` a name in
        ``state_dir`` made from the bound listen address, so daemons on other ports never clash."""
        setting = self.config.server.local_socket
        if setting != "auto":
            return setting
        listen = self.config.server.listen
        bound = listen if listen.startswith("unix:") else f"{listen.rpartition(':')[0]}:{self.port}"
        name = "rpc-" + re.sub(r"[^A-Za-z0-9.]+", "-", bound).strip("-") + ".sock"
        return os.path.join(self.config.server.state_dir, name)

    async def _start_local(self) -> None:
        """Serve the local fast path. With ``auto`` a socket that cannot be made (state_dir not
        writable, the path in use) is logged and skipped: clients then use gRPC, as remote ones do.
        A path set explicitly must work."""
        path = self.local_socket_path()
        if path is None:
            return
        explicit = self.config.server.local_socket != "auto"
        try:
            if len(os.fsencode(path)) > MAX_UNIX_PATH:
                raise PegaflowError(f"{path!r} is longer than the {MAX_UNIX_PATH} bytes a Unix socket path holds")
            if not explicit:
                reap_stale(os.path.dirname(path))
            local = LocalServer(path, self.servicer.answer_local, self.servicer.answer_local_stream)
            await local.start()
        except (OSError, PegaflowError) as exc:
            if explicit:
                raise ConfigError(f"cannot serve the local socket: {exc}", file=self.config.source,
                                  path="server.local_socket") from None
            log.warning("no local socket (server.local_socket: auto): %s; local clients use gRPC", exc)
            return
        self.local = local
        self.servicer.local_socket = path

    async def _housekeep(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            self.servicer.expire()
            if ticks % 60 == 0:
                await asyncio.get_running_loop().run_in_executor(self.executor, reap_orphans)

    async def stop(self, grace: float = 2.0) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self.local is not None:
            self.local.close()
        if self.server is not None:
            await self.server.stop(grace)
        self.servicer.close()
        self.executor.shutdown(wait=True)
        if self.transport is not None:
            self.transport.close()
        self.stack.close()
        self.metrics.close()


async def _serve(config: DaemonConfig, ready: Callable[[Daemon], None] | None = None) -> None:
    daemon = Daemon(config)
    await daemon.start()
    if ready is not None:
        ready(daemon)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await daemon.stop()


def serve_forever(config: DaemonConfig, ready: Callable[[Daemon], None] | None = None) -> None:
    """Run the daemon until SIGINT/SIGTERM."""
    asyncio.run(_serve(config, ready))
