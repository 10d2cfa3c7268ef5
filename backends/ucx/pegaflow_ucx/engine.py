"""The progress thread of one UCX endpoint: it owns the UCX worker and makes every UCX call after
construction, so ucxx objects are never used from two threads and callers never block on UCX.

Callers hand it work through a queue (``call_soon``) and wake it through a pipe; it progresses
the worker until idle, arms it, and sleeps in ``select`` on the worker's epoll descriptor and the
pipe. Completion is tracked as ``_Step``s: a group of UCX requests and what to do when all of them
have completed (or one failed). The client half turns batches of ops into chunks on pooled
connections; the server half serves this endpoint's regions to its peers (see protocol.py).
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import secrets
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from pegaflow_core.errors import ClosedError, InvalidArgument, TransportError

from . import protocol as P

log = logging.getLogger("pegaflow.ucx")

_IDLE_WAKE_S = 0.1  # the longest the thread sleeps without looking at deadlines and commands
_CLOSE_GRACE_S = 0.05  # how long close() lets UCX flush endpoint closes before the worker goes
# UCX refuses an endpoint whose peer uses the other error-handling mode before any byte of ours
# is exchanged; all either side sees is a reset or "Unsupported operation". Say what to check.
_HINT = (" (if the peer is a pegaflow UCX endpoint, check that both use the same 'error_handling' "
         "setting: UCX refuses endpoints whose error-handling modes differ)")
Resolver = Callable[[int, int, int, int], tuple[int, memoryview | None]]


class Item:
    """One checked op of a batch: the local bytes it fills or sends and where they are remotely."""

    __slots__ = ("index", "local", "nonce", "region_id", "remote_offset", "length")

    def __init__(
        self, index: int, local: memoryview, nonce: int, region_id: int, remote_offset: int, length: int
    ) -> None:
        self.index = index  # position in the caller's batch, for error messages
        self.local = local
        self.nonce = nonce
        self.region_id = region_id
        self.remote_offset = remote_offset
        self.length = length


class Batch:
    """One read() or write() call: its future, its deadline and how many chunks are outstanding."""

    def __init__(self, op: int, future: Future[None], deadline: float, timeout_s: float) -> None:
        self.op = op
        self.future = future
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.remaining = 0
        self.connections: set[_Connection] = set()

    @property
    def name(self) -> str:
        return "read" if self.op == P.READ else "write"

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def chunk_done(self) -> None:
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(None)


class _Chunk:
    __slots__ = ("batch", "items", "seq")

    def __init__(self, batch: Batch, items: list[Item]) -> None:
        self.batch = batch
        self.items = items
        self.seq = 0


class _Connection:
    """A client connection to one peer address; carries any number of chunks concurrently."""

    def __init__(self, address: str, ip: str, port: int, cid: int, deadline: float) -> None:
        self.address = address
        self.ip = ip
        self.port = port
        self.cid = cid
        self.ep: Any = None
        self.state = "connecting"
        self.deadline = deadline  # of the handshake
        self.waiting: list[_Chunk] = []  # submitted before the handshake finished
        self.chunks: set[_Chunk] = set()
        self.connect_waiters: list[Future[None]] = []
        self.next_seq = 1
        self.error: BaseException | None = None  # why it died

    def take_seqs(self, n: int) -> int:
        if self.next_seq + n >= P.SEQ_SPAN:
            self.next_seq = 1  # 0 is the request-header tag; older chunks are long done by now
        seq = self.next_seq
        self.next_seq += n
        return seq


class _Served:
    """The server side of one peer's connection."""

    def __init__(self, ep: Any) -> None:
        self.ep = ep
        self.cid = -1
        self.alive = True
        self.hello = bytearray(P.HELLO.size)
        self.header = bytearray(P.MAX_REQUEST)


class _Step:
    __slots__ = ("requests", "done", "failed", "owner", "keep", "next")

    def __init__(self, requests: list[Any], done: Callable[[], None], failed: Callable[[BaseException], None],
                 owner: object, keep: Any) -> None:
        self.requests = requests
        self.done = done
        self.failed = failed
        self.owner = owner  # the connection whose death makes this step moot
        self.keep = keep  # buffers UCX reads or writes until the requests complete
        self.next = 0  # requests before this index are known to be complete


class Engine:
    """UCX context, worker, listener and the thread that drives them."""

    def __init__(self, ucx_config: dict[str, str], port: int, host: str, resolve: Resolver,
                 error_handling: bool = True) -> None:
        from ucxx._lib import libucxx as ucx
        from ucxx._lib.arr import Array

        self._ucx = ucx
        self._Array = Array
        self._resolve = resolve
        self._error_handling = error_handling
        try:
            self._context = ucx.UCXContext(
                config_dict=ucx_config, feature_flags=(ucx.Feature.TAG, ucx.Feature.STREAM, ucx.Feature.WAKEUP)
            )
            self._worker = ucx.UCXWorker(self._context)
            self._worker.init_blocking_progress_mode()
        except Exception as exc:
            settings = ", ".join(f"UCX_{k}={v}" for k, v in ucx_config.items()) or "UCX defaults"
            raise TransportError(
                f"ucx: cannot create a UCX context with {settings}: {exc} (is every transport in 'tls' "
                "available here? `ucx_info -d` lists them)"
            ) from None
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._steps: list[_Step] = []
        self._connections: dict[str, _Connection] = {}
        self._cids: set[int] = set()  # connection ids in use, ours and our peers'
        self._batches: set[Batch] = set()
        self._served: set[_Served] = set()
        self._stopping = False
        try:
            self._listener = ucx.UCXListener.create(worker=self._worker, port=port, cb_func=self._on_conn_request)
        except Exception as exc:
            self._close_fds()
            raise TransportError(f"ucx: cannot listen on port {port}: {exc}") from None
        self.port = int(self._listener.port)
        self.nonce = secrets.randbits(64)
        self.address = f"ucx://[{host}]:{self.port}" if ":" in host else f"ucx://{host}:{self.port}"
        self._thread = threading.Thread(target=self._run, name=f"pegaflow-ucx-{self.port}", daemon=True)
        self._thread.start()

    # -- called from any thread ---------------------------------------------------------------
    def call_soon(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        wake = self._wake_w
        if wake < 0:
            return
        try:
            os.write(wake, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (the thread is awake anyway) or already closed

    def submit(self, batch: Batch, by_peer: dict[str, tuple[str, int, list[Item]]]) -> None:
        """Queue a checked batch: items grouped by peer address, with the IP and port to dial."""
        step = P.MAX_CHUNK_OPS
        chunks = {
            address: (ip, port, [_Chunk(batch, items[i : i + step]) for i in range(0, len(items), step)])
            for address, (ip, port, items) in by_peer.items()
        }
        batch.remaining = sum(len(c) for _, _, c in chunks.values())
        self.call_soon(lambda: self._start_batch(batch, chunks))

    def connect(self, address: str, ip: str, port: int, timeout_s: float) -> Future[None]:
        future: Future[None] = Future()
        deadline = time.monotonic() + timeout_s
        self.call_soon(lambda: self._connect(address, ip, port, deadline, future))
        return future

    def stop(self) -> None:
        """Fail what is in flight with ClosedError, close every endpoint and stop the thread, which
        releases UCX on its way out. Waits for it unless called from it (a future's callback)."""
        self.call_soon(self._shutdown)
        if threading.current_thread() is not self._thread:
            self._thread.join(_CLOSE_GRACE_S + 5.0)
            if self._thread.is_alive():
                log.warning("ucx progress thread %s did not stop within 5 s", self.address)

    # -- the progress thread ------------------------------------------------------------------
    def _run(self) -> None:
        worker = self._worker
        epoll_fd = worker.epoll_file_descriptor
        try:
            while not self._stopping:
                self._drain_commands()
                while worker.progress_once():
                    pass
                self._poll_steps()
                self._check_deadlines()
                if self._stopping or not self._commands.empty():
                    continue
                if worker.arm():
                    select.select([epoll_fd, self._wake_r], [], [], self._sleep_s())
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
        except Exception:  # a bug here must not leave callers waiting forever
            log.exception("ucx progress thread %s crashed", self.address)
            self._fail_everything(TransportError(f"ucx endpoint {self.address}: progress thread crashed (see log)"))
            self._stopping = True
        finally:
            self._stopping = True
            self._drain_commands()  # whatever was queued meanwhile fails with ClosedError
            # Release UCX here, on the thread that used it, listener first, context last.
            self._steps.clear()
            self._served.clear()
            self._connections.clear()
            self._listener = None
            self._worker = worker = None
            self._context = None
            self._close_fds()

    def _sleep_s(self) -> float:
        if not self._batches and not any(c.state == "connecting" for c in self._connections.values()):
            return _IDLE_WAKE_S
        nearest = min([b.deadline for b in self._batches] + [c.deadline for c in self._connections.values()
                                                             if c.state == "connecting"])
        return min(_IDLE_WAKE_S, max(0.0, nearest - time.monotonic()) + 0.001)

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _watch(self, requests: list[Any], done: Callable[[], None], failed: Callable[[BaseException], None],
               owner: object, keep: Any = None) -> None:
        self._steps.append(_Step(requests, done, failed, owner, keep))

    def _poll_steps(self) -> None:
        steps, self._steps = self._steps, []
        still: list[_Step] = []
        for step in steps:
            if getattr(step.owner, "state", None) == "dead" or getattr(step.owner, "alive", True) is False:
                continue  # its connection is gone; its requests may never complete
            requests, i = step.requests, step.next
            while i < len(requests) and requests[i].completed:
                i += 1
            step.next = i
            if i < len(requests):
                still.append(step)
                continue
            error: BaseException | None = None
            for request in requests:
                try:
                    request.check_error()
                except Exception as exc:
                    error = exc
                    break
            if error is None:
                step.done()
            else:
                step.failed(error)
        self._steps = still + self._steps  # steps the callbacks added stay behind the older ones

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for conn in list(self._connections.values()):
            if conn.state == "connecting" and now > conn.deadline:
                self._kill(conn, TransportError(f"cannot connect to {conn.address}: timed out"))
        for batch in list(self._batches):
            if now > batch.deadline:
                self._batches.discard(batch)
                batch.fail(TransportError(f"{batch.name}: timed out after {batch.timeout_s:g} s"))
                # Data of the abandoned chunks must never land in the caller's memory later, and
                # UCX cannot cancel one posted receive: dropping the connection guarantees it.
                for conn in batch.connections:
                    self._kill(conn, TransportError(
                        f"connection to {conn.address} was dropped after a {batch.name} on it timed out"))

    def _shutdown(self) -> None:
        self._stopping = True
        self._fail_everything(ClosedError(f"transport {self.address} was closed during the transfer"))
        # Let UCX tell peers the endpoints are gone (they fail fast instead of timing out): a
        # short fixed window, as ucxx does not say when an endpoint's close has gone out.
        end = time.monotonic() + _CLOSE_GRACE_S
        while time.monotonic() < end:
            if not self._worker.progress_once():
                time.sleep(0.001)

    def _fail_everything(self, error: BaseException) -> None:
        for batch in list(self._batches):
            batch.fail(error)
        self._batches.clear()
        for conn in list(self._connections.values()):
            self._kill(conn, error)
        for served in list(self._served):
            self._drop_served(served)
        self._steps.clear()

    # -- client -------------------------------------------------------------------------------
    def _connect(self, address: str, ip: str, port: int, deadline: float, future: Future[None]) -> None:
        if self._stopping:
            future.set_exception(ClosedError(f"transport {self.address} is closed"))
            return
        conn = self._connection(address, ip, port, deadline)
        if conn.state == "ready":
            future.set_result(None)
        elif conn.state == "connecting":
            conn.connect_waiters.append(future)
        else:
            future.set_exception(conn.error or TransportError(f"cannot connect to {address}"))

    def _start_batch(self, batch: Batch, chunks: dict[str, tuple[str, int, list[_Chunk]]]) -> None:
        if self._stopping:
            batch.fail(ClosedError(f"transport {self.address} is closed"))
            return
        self._batches.add(batch)
        for address, (ip, port, address_chunks) in chunks.items():
            conn = self._connection(address, ip, port, batch.deadline)
            if conn.state == "dead":  # refused at once (e.g. the endpoint could not be created)
                batch.fail(conn.error or TransportError(f"cannot connect to {address}"))
                self._batches.discard(batch)
                return
            batch.connections.add(conn)
            for chunk in address_chunks:
                if conn.state == "ready":
                    self._start_chunk(conn, chunk)
                elif conn.state == "connecting":
                    conn.waiting.append(chunk)
                if batch.future.done():
                    break
            if batch.future.done():
                self._batches.discard(batch)
                return

    def _connection(self, address: str, ip: str, port: int, deadline: float) -> _Connection:
        """The live connection to ``address``, or a new one whose handshake has started."""
        conn = self._connections.get(address)
        if conn is not None:
            conn.deadline = max(conn.deadline, deadline)
            return conn
        cid = secrets.randbelow(P.CID_LIMIT - 1) + 1
        while cid in self._cids:
            cid = secrets.randbelow(P.CID_LIMIT - 1) + 1
        conn = _Connection(address, ip, port, cid, deadline)
        self._connections[address] = conn
        self._cids.add(cid)
        try:
            conn.ep = self._ucx.UCXEndpoint.create(self._worker, ip, port, self._error_handling)
            conn.ep.set_close_callback(self._on_endpoint_closed, cb_args=(conn,))
            hello = bytearray(P.HELLO.pack(P.MAGIC, cid, 0))
            welcome = bytearray(P.WELCOME.size)
            requests = [conn.ep.stream_send(self._Array(hello)), conn.ep.stream_recv(self._Array(welcome))]
        except Exception as exc:
            self._kill(conn, TransportError(f"cannot connect to {address}: {exc}"))
            return conn
        self._watch(requests, lambda: self._welcomed(conn, welcome),
                    lambda exc: self._kill(conn, TransportError(f"cannot connect to {address}: {_handshake_why(exc)}")),
                    conn, keep=(hello, welcome))
        return conn

    def _welcomed(self, conn: _Connection, welcome: bytearray) -> None:
        magic, status, nonce = P.WELCOME.unpack(welcome)
        if magic != P.MAGIC:
            self._kill(conn, TransportError(f"{conn.address} is not a pegaflow UCX endpoint (bad handshake)"))
            return
        if status == P.DUPLICATE:  # another client of that peer drew the same id: try again
            address, ip, port, waiting, waiters = conn.address, conn.ip, conn.port, conn.waiting, conn.connect_waiters
            conn.waiting, conn.connect_waiters = [], []
            self._kill(conn, TransportError("duplicate connection id"))
            fresh = self._connection(address, ip, port, conn.deadline)
            for chunk in waiting:
                chunk.batch.connections.add(fresh)
            if fresh.state == "dead":
                error = fresh.error or TransportError(f"cannot connect to {address}")
                for chunk in waiting:
                    self._batches.discard(chunk.batch)
                    chunk.batch.fail(error)
                for future in waiters:
                    if not future.done():
                        future.set_exception(error)
                return
            fresh.waiting += waiting
            fresh.connect_waiters += waiters
            return
        conn.state = "ready"
        for future in conn.connect_waiters:
            if not future.done():
                future.set_result(None)
        conn.connect_waiters.clear()
        waiting, conn.waiting = conn.waiting, []
        for chunk in waiting:
            if not chunk.batch.future.done():
                self._start_chunk(conn, chunk)

    def _start_chunk(self, conn: _Connection, chunk: _Chunk) -> None:
        if conn.state != "ready":  # killed while earlier chunks of the same wave were started
            self._batches.discard(chunk.batch)
            chunk.batch.fail(conn.error or TransportError(f"lost the connection to {conn.address}"))
            return
        Array, Tag, ep, cid = self._Array, self._ucx.UCXXTag, conn.ep, conn.cid
        items = chunk.items
        chunk.seq = seq = conn.take_seqs(len(items) + 1)
        conn.chunks.add(chunk)
        header = bytearray(P.REQUEST.size + len(items) * P.OP_ENTRY.size)
        P.REQUEST.pack_into(header, 0, chunk.batch.op, len(items), seq)
        offset = P.REQUEST.size  # one entry per op: the tagged scheme moves one UCX message per op anyway
        for item in items:
            P.OP_ENTRY.pack_into(header, offset, item.nonce, item.region_id, item.remote_offset, item.length)
            offset += P.OP_ENTRY.size
        status = bytearray(P.STATUS.size)
        try:
            if chunk.batch.op == P.READ:
                requests = [ep.tag_recv(Array(item.local), Tag(P.tag(False, cid, seq + 1 + k)))
                            for k, item in enumerate(items)]
                requests.append(ep.tag_recv(Array(status), Tag(P.tag(False, cid, seq))))
                requests.append(ep.tag_send(Array(header), Tag(P.tag(True, cid, 0))))
                done = functools.partial(self._chunk_answered, conn, chunk, status, P.OK)
            else:
                requests = [ep.tag_recv(Array(status), Tag(P.tag(False, cid, seq))),
                            ep.tag_send(Array(header), Tag(P.tag(True, cid, 0)))]
                done = functools.partial(self._write_ready, conn, chunk, status)
        except Exception as exc:
            self._kill(conn, TransportError(f"{chunk.batch.name} to {conn.address}: {_why(exc)}"))
            return
        self._watch(requests, done, lambda exc: self._broken(conn, chunk, exc), conn, keep=(header, status))

    def _write_ready(self, conn: _Connection, chunk: _Chunk, status: bytearray) -> None:
        code, index, _ = P.STATUS.unpack(status)
        if code != P.READY:
            self._chunk_answered(conn, chunk, status, P.READY)
            return
        Array, Tag, ep, cid, seq = self._Array, self._ucx.UCXXTag, conn.ep, conn.cid, chunk.seq
        done_status = bytearray(P.STATUS.size)
        try:
            requests = [ep.tag_recv(Array(done_status), Tag(P.tag(False, cid, seq)))]
            requests += [ep.tag_send(Array(item.local), Tag(P.tag(True, cid, seq + 1 + k)))
                         for k, item in enumerate(chunk.items)]
        except Exception as exc:
            self._kill(conn, TransportError(f"write to {conn.address}: {_why(exc)}"))
            return
        self._watch(requests, lambda: self._chunk_answered(conn, chunk, done_status, P.OK),
                    lambda exc: self._broken(conn, chunk, exc), conn, keep=done_status)

    def _chunk_answered(self, conn: _Connection, chunk: _Chunk, status: bytearray, expected: int) -> None:
        conn.chunks.discard(chunk)
        batch = chunk.batch
        code, index, _ = P.STATUS.unpack(status)
        if code == expected:
            batch.chunk_done()
            if batch.future.done():
                self._batches.discard(batch)
            return
        self._batches.discard(batch)
        item = chunk.items[index] if index < len(chunk.items) else chunk.items[0]
        batch.fail(_refusal(code, item, conn.address))

    def _broken(self, conn: _Connection, chunk: _Chunk, exc: BaseException) -> None:
        self._kill(conn, TransportError(
            f"{chunk.batch.name} of {len(chunk.items)} ops {'from' if chunk.batch.op == P.READ else 'to'} "
            f"{conn.address}: connection failed: {_why(exc)}"))

    def _on_endpoint_closed(self, *args: Any) -> None:
        """ucxx calls this when an endpoint fails (peer gone, connection refused) or closes."""
        conn = args[-1] if args and isinstance(args[-1], _Connection) else None
        if conn is not None:
            self.call_soon(lambda: self._kill(conn, TransportError(
                f"{'cannot connect to' if conn.state == 'connecting' else 'lost the connection to'} {conn.address}: "
                "the peer is unreachable or closed the connection")))

    def _kill(self, conn: _Connection, error: BaseException) -> None:
        """Drop a connection and fail everything that used it. Idempotent."""
        if conn.state == "dead":
            return
        conn.state = "dead"
        conn.error = error
        if self._connections.get(conn.address) is conn:
            del self._connections[conn.address]
        self._cids.discard(conn.cid)
        for future in conn.connect_waiters:
            if not future.done():
                future.set_exception(error)
        for chunk in list(conn.chunks) + conn.waiting:
            self._batches.discard(chunk.batch)
            chunk.batch.fail(error)
        conn.chunks.clear()
        conn.waiting.clear()
        conn.connect_waiters.clear()
        self._steps = [s for s in self._steps if s.owner is not conn]
        _close_endpoint(conn)

    # -- server -------------------------------------------------------------------------------
    def _on_conn_request(self, conn_request: Any) -> None:
        """A peer dialled us: make its endpoint and wait for its HELLO (runs inside progress)."""
        if self._stopping:
            return
        try:
            ep = self._listener.create_endpoint_from_conn_request(conn_request, self._error_handling)
        except Exception as exc:
            log.warning("ucx %s: cannot accept a connection: %s%s", self.address, exc, _HINT)
            return
        served = _Served(ep)
        self._served.add(served)
        try:
            ep.set_close_callback(self._on_served_closed, cb_args=(served,))
            request = ep.stream_recv(self._Array(served.hello))
        except Exception:
            self._drop_served(served)
            return
        self._watch([request], lambda: self._hello(served), lambda exc: self._drop_served(served), served)

    def _hello(self, served: _Served) -> None:
        magic, cid, _ = P.HELLO.unpack(served.hello)
        if magic != P.MAGIC or not 0 < cid < P.CID_LIMIT:
            self._drop_served(served)
            return
        status = P.OK
        if cid in self._cids:
            status = P.DUPLICATE
        else:
            served.cid = cid
            self._cids.add(cid)
            self._post_header(served)
        welcome = bytearray(P.WELCOME.pack(P.MAGIC, status, self.nonce))
        try:
            request = served.ep.stream_send(self._Array(welcome))
        except Exception:
            self._drop_served(served)
            return
        self._watch([request], lambda: None, lambda exc: self._drop_served(served), served, keep=welcome)

    def _post_header(self, served: _Served) -> None:
        if not served.alive:
            return
        try:
            request = served.ep.tag_recv(self._Array(served.header), self._ucx.UCXXTag(P.tag(True, served.cid, 0)))
        except Exception:
            self._drop_served(served)
            return
        self._watch([request], lambda: self._request(served), lambda exc: self._drop_served(served), served)

    def _request(self, served: _Served) -> None:
        """Serve one request header, then wait for the next."""
        op, count, seq = P.REQUEST.unpack_from(served.header, 0)
        if op not in (P.READ, P.WRITE) or count > P.MAX_CHUNK_OPS:
            self._drop_served(served)  # not our protocol: the framing is unknown, hang up
            return
        header = bytes(served.header[: P.REQUEST.size + count * P.OP_ENTRY.size])
        self._post_header(served)
        if not served.alive:
            return
        views: list[memoryview] = []
        code, refused = P.OK, 0
        for k in range(count):
            nonce, region_id, offset, length = P.OP_ENTRY.unpack_from(header, P.REQUEST.size + k * P.OP_ENTRY.size)
            code, view = self._resolve(nonce, region_id, offset, length)
            if view is None:
                refused = k
                break
            views.append(view)
        Array, Tag, ep, cid = self._Array, self._ucx.UCXXTag, served.ep, served.cid
        try:
            if op == P.READ:
                if code == P.OK:
                    requests = [ep.tag_send(Array(v), Tag(P.tag(False, cid, seq + 1 + k))) for k, v in enumerate(views)]
                else:  # every receive the client posted must complete: send empty messages
                    empty = memoryview(b"")
                    requests = [ep.tag_send(Array(empty), Tag(P.tag(False, cid, seq + 1 + k))) for k in range(count)]
                status = bytearray(P.STATUS.pack(code, refused, 0))
                requests.append(ep.tag_send(Array(status), Tag(P.tag(False, cid, seq))))
                self._watch(requests, lambda: None, lambda exc: self._drop_served(served), served, keep=(views, status))
            elif code == P.OK:
                receives = [ep.tag_recv(Array(v), Tag(P.tag(True, cid, seq + 1 + k))) for k, v in enumerate(views)]
                ready = bytearray(P.STATUS.pack(P.READY, 0, 0))
                done = bytearray(P.STATUS.pack(P.OK, 0, 0))
                self._watch(receives, lambda: self._send_status(served, seq, done),
                            lambda exc: self._drop_served(served), served, keep=views)
                self._send_status(served, seq, ready)
            else:
                self._send_status(served, seq, bytearray(P.STATUS.pack(code, refused, 0)))
        except Exception as exc:
            log.debug("ucx %s: dropping a peer connection: %s", self.address, exc)
            self._drop_served(served)

    def _send_status(self, served: _Served, seq: int, status: bytearray) -> None:
        if not served.alive:
            return
        try:
            request = served.ep.tag_send(self._Array(status), self._ucx.UCXXTag(P.tag(False, served.cid, seq)))
        except Exception:
            self._drop_served(served)
            return
        self._watch([request], lambda: None, lambda exc: self._drop_served(served), served, keep=status)

    def _on_served_closed(self, *args: Any) -> None:
        served = args[-1] if args and isinstance(args[-1], _Served) else None
        if served is not None:
            self.call_soon(lambda: self._drop_served(served))

    def _drop_served(self, served: _Served) -> None:
        if not served.alive:
            return
        served.alive = False
        self._served.discard(served)
        if served.cid > 0:
            self._cids.discard(served.cid)
        self._steps = [s for s in self._steps if s.owner is not served]
        _close_endpoint(served)

    def _close_fds(self) -> None:
        fds = (self._wake_r, self._wake_w)
        self._wake_r = self._wake_w = -1  # call_soon stops writing before the numbers can be reused
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _refusal(code: int, item: Item, address: str) -> Exception:
    where = f"ops[{item.index}]"
    if code == P.NO_REGION:
        return TransportError(f"{where}: region {item.region_id} is not registered at {address} (it was deregistered)")
    if code == P.STALE:
        return TransportError(
            f"{where}: the descriptor of region {item.region_id} is from an endpoint that no longer exists; "
            f"{address} is now another endpoint (ask the peer for a fresh descriptor)"
        )
    if code == P.OUT_OF_BOUNDS:
        return InvalidArgument(
            f"{where}: remote_offset {item.remote_offset} + length {item.length} exceeds region "
            f"{item.region_id} at {address}"
        )
    return TransportError(f"{where}: {address} refused the request (status {code})")


def _close_endpoint(holder: _Connection | _Served) -> None:
    """Close the endpoint of a connection and let go of it.

    An endpoint that already failed (peer gone, connection refused) must not be closed: ucxx
    0.52's ``close()`` crashes the process on it, and dropping the reference frees it. The close
    callback is removed first because its arguments (the holder) and the endpoint refer to each
    other: that cycle would keep the endpoint, and through it the listener's socket, alive until
    the garbage collector runs, so a closed transport would still accept connections."""
    ep, holder.ep = holder.ep, None
    if ep is None:
        return
    try:
        ep.remove_close_callback()
        if ep.alive:
            ep.close()
    except Exception as exc:
        log.debug("ucx: closing an endpoint failed: %s", exc)


def _handshake_why(exc: BaseException) -> str:
    """Why a handshake failed, in words. ucxx reports a closed port as "not connected", and a
    peer whose UCX refused our endpoint (mismatched error handling) as that or as a reset: the
    two cannot be told apart here, so both carry the hint."""
    name = type(exc).__name__
    if "NotConnected" in name or "Unreachable" in name:
        return f"connection refused or host unreachable ({_why(exc)}){_HINT}"
    if "ConnectionReset" in name:
        return f"{_why(exc)}{_HINT}"
    return _why(exc)


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text
