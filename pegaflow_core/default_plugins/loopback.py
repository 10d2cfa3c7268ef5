"""Built-in plugin: ``LoopbackTransport``, the reference Transport over TCP (``transport: loopback``).

It proves the one-sided model before UCX or RDMA are there: every endpoint runs a small server
that serves its registered regions, and a peer reads or writes ``(region, offset, length)`` lists
of them without any code of the region's owner running per transfer (the server thread plays the
NIC). Everything else in pegaflow can be built and tested against it on any machine.

Wire protocol (little endian). One TCP connection carries one batch at a time; requests are
pipelined and answered in order.

* request ``_REQUEST``: op (1 = READ, 2 = WRITE), request id, endpoint nonce, region id, offset,
  length; a WRITE is followed by its ``length`` payload bytes.
* response ``_RESPONSE``: status, request id, length; an accepted READ is followed by its
  ``length`` data bytes, anything else by nothing.

Errors need no text on the wire: the client knows the op and words the message itself. The client
reads each answer's header before its data, so a refused READ never touches the destination.

A region descriptor is ``_DESCRIPTOR``: magic, endpoint nonce, region id, nbytes. The nonce is
random per endpoint, so a descriptor kept from an endpoint that closed (even one whose port was
reused) is refused with a clear error instead of touching another region's bytes.
"""

from __future__ import annotations

import errno
import itertools
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pegaflow_core.buffers import Buffer, byte_view
from pegaflow_core.errors import ClosedError, InvalidArgument, NotFound, TransportError
from pegaflow_core.hookspecs import Register, hookimpl
from pegaflow_core.transport import Region, RemoteRegion, TransferOp, Transport, check_timeout, plan_ops

_REQUEST = struct.Struct("<BxxxIQQQQ")  # op, request id, nonce, region id, offset, length
_RESPONSE = struct.Struct("<BxxxIQ")  # status, request id, length
_DESCRIPTOR = struct.Struct("<4sQQQ")  # magic, nonce, region id, nbytes
_MAGIC = b"PFLB"

_READ, _WRITE = 1, 2
_OK, _NO_REGION, _STALE, _OUT_OF_BOUNDS, _BAD_REQUEST = 0, 1, 2, 3, 4

_SOCKET_BUFFER = 4 << 20  # asked of the kernel, which caps it at net.core.{r,w}mem_max
_CHUNK = 256  # ops per send/receive step of a pipelined batch
_IOV_MAX = 1024
_SYSCALL_BYTES = 2 * _SOCKET_BUFFER  # bytes offered to one sendmsg/recvmsg_into call
_SERVER_BUFFER = 64 << 10  # server's request read-ahead; see _Reader
_FLUSH_BYTES = 1 << 20  # a server sends queued READ answers once this many bytes are queued
_IDLE_PER_PEER = 8  # idle client connections kept per peer address
_STOP_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class LoopbackOptions:
    """``host``: interface the endpoint's server listens on (and peers dial); ``port``: 0 picks a
    free ephemeral port."""

    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise InvalidArgument(f"loopback.host: expected a host name or IP such as '127.0.0.1', got {self.host!r}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise InvalidArgument(f"loopback.port: expected a port 0..65535 (0 = pick a free one), got {self.port!r}")


class _Op:
    """One checked transfer: the local bytes it fills or sends, and where they live on the peer."""

    __slots__ = ("index", "local", "nonce", "region_id", "remote_offset", "length")

    def __init__(
        self, index: int, local: memoryview, nonce: int, region_id: int, remote_offset: int, length: int
    ) -> None:
        self.index = index  # position in the caller's batch, for error messages and request ids
        self.local = local
        self.nonce = nonce
        self.region_id = region_id
        self.remote_offset = remote_offset
        self.length = length


class LoopbackTransport(Transport):
    """TCP transport between endpoints (on one host in practice; any host that can reach ``host``).

    Each endpoint listens on ``host:port`` and serves its registered regions from one thread per
    peer connection. Transfers run on a small pool of worker threads, each batch pipelined over
    one pooled connection per peer, and complete the returned future.
    """

    kind = "loopback"
    Options = LoopbackOptions

    def __init__(self, options: LoopbackOptions | None = None) -> None:
        self.options = options if options is not None else LoopbackOptions()
        self._nonce = secrets.randbits(64)
        self._lock = threading.Lock()
        self._regions: dict[int, memoryview] = {}
        self._region_ids = itertools.count(1)
        self._closed = False
        self._idle: dict[str, list[socket.socket]] = {}  # client connections, by peer address
        self._busy: set[socket.socket] = set()  # client connections carrying a batch now
        self._served: set[socket.socket] = set()  # server-side connections
        self._handlers: set[threading.Thread] = set()
        try:
            self._listener = socket.create_server((self.options.host, self.options.port), backlog=64)
        except OSError as exc:
            raise TransportError(
                f"loopback: cannot listen on {self.options.host}:{self.options.port}: {_why(exc)}"
            ) from None
        self._listener.settimeout(0.5)  # bounds how long the accept loop can miss a close()
        host, port = self._listener.getsockname()[:2]
        self._address = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"pegaflow-loopback-{port}")
        self._server = threading.Thread(target=self._accept_loop, name=f"pegaflow-loopback-{port}", daemon=True)
        self._server.start()

    @classmethod
    def conformance_options(cls, tmp_path: Path, capacity_bytes: int | None = None) -> Any:
        return LoopbackOptions()

    @property
    def address(self) -> str:
        return self._address

    def __repr__(self) -> str:
        return f"LoopbackTransport({self._address}{', closed' if self._closed else ''})"

    # -- regions ------------------------------------------------------------------------------
    def register(self, buffer: Buffer) -> Region:
        view = byte_view(buffer, writable=True, what="register(buffer)")
        with self._lock:
            self._check_open()
            region_id = next(self._region_ids)
            self._regions[region_id] = view
        return Region(region_id, len(view), _DESCRIPTOR.pack(_MAGIC, self._nonce, region_id, len(view)))

    def deregister(self, region: Region) -> None:
        """Stop serving ``region``; peers get TransportError for it from now on. A transfer the
        server is executing on it at this moment still finishes."""
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

    # -- client side --------------------------------------------------------------------------
    def connect(self, address: str, timeout_s: float = 5.0) -> None:
        host, port = _parse_address(address, "connect(address)")
        timeout_s = check_timeout(timeout_s, "connect")
        with self._lock:
            self._check_open()
            if self._idle.get(address):
                return
        sock = self._dial(address, host, port, time.monotonic() + timeout_s)
        with self._lock:
            self._busy.add(sock)
        self._check_in(address, sock)

    def read(self, ops: Sequence[TransferOp], timeout_s: float = 30.0) -> Future[None]:
        return self._submit(_READ, ops, timeout_s)

    def read_reporting(self, ops: Sequence[TransferOp], arrived: Callable[[int], None],
                       timeout_s: float = 30.0) -> Future[None]:
        """``read``, reporting each op as soon as its bytes are in place (answers come in order),
        on the worker thread that received them."""
        return self._submit(_READ, ops, timeout_s, arrived)

    def write(self, ops: Sequence[TransferOp], timeout_s: float = 30.0) -> Future[None]:
        return self._submit(_WRITE, ops, timeout_s)

    def _submit(self, op: int, ops: Sequence[TransferOp], timeout_s: float,
                arrived: Callable[[int], None] | None = None) -> Future[None]:
        """Check all that can be checked here, synchronously (InvalidArgument: local and remote
        bounds, addresses, descriptors), then hand the batch to a worker thread; the future
        carries only what the peer alone can tell."""
        name = "read" if op == _READ else "write"
        timeout_s = check_timeout(timeout_s, name)
        by_peer: dict[str, list[_Op]] = {}
        with self._lock:
            self._check_open()
            planned, dial = plan_ops(ops, name, self._local_view, _parse_descriptor, _parse_address)
            for p in planned:
                nonce, region_id, _ = p.remote
                by_peer.setdefault(p.address, []).append(_Op(p.index, p.local, nonce, region_id, p.remote_offset, p.length))
            if not by_peer:
                done: Future[None] = Future()
                done.set_result(None)
                return done
            deadline = time.monotonic() + timeout_s
            return self._workers.submit(self._run, op, by_peer, dial, deadline, timeout_s, arrived)

    def _local_view(self, region: Any, where: str) -> memoryview:
        if not isinstance(region, Region) or not self._owns(region):
            raise InvalidArgument(
                f"{where}.local: region {getattr(region, 'region_id', region)!r} is not registered with "
                f"this endpoint ({self._address}); register() the buffer first"
            )
        return self._regions[region.region_id]

    def _run(self, op: int, by_peer: dict[str, list[_Op]], dial: dict[str, tuple[str, int]],
             deadline: float, timeout_s: float, arrived: Callable[[int], None] | None) -> None:
        """Worker thread: one pipelined exchange per peer. A pooled connection found dead before
        its first answer (the peer restarted, the kernel dropped it) is retried once on a fresh
        connection; READ and WRITE are idempotent, so the retry is safe (it is not made once an
        op was reported ``arrived``, so none is reported twice)."""
        name = "read" if op == _READ else "write"
        for address, items in by_peer.items():
            what = f"{name} of {len(items)} ops {'from' if op == _READ else 'to'} {address}"
            for attempt in (1, 2):
                sock, reused = self._check_out(address, *dial[address], deadline)
                pipeline = _Pipeline(sock, op, items, deadline, address, arrived)
                try:
                    pipeline.run()
                except _PeerRefused as refused:
                    self._check_in(address, sock)  # a refusal leaves the stream in step
                    raise refused.error from None
                except TimeoutError:
                    self._discard(sock)
                    raise TransportError(f"{what}: timed out after {timeout_s:g} s") from None
                except (OSError, _ProtocolError) as exc:
                    self._discard(sock)
                    if self._closed:
                        raise ClosedError(f"{name}: transport {self._address} was closed during the transfer") from None
                    if reused and attempt == 1 and pipeline.answered == 0 and pipeline.reported == 0:
                        continue
                    raise TransportError(f"{what}: connection failed: {_why(exc)}") from None
                except BaseException:  # ``arrived`` raised: the stream is mid-answer, drop it
                    self._discard(sock)
                    raise
                self._check_in(address, sock)
                break

    def _check_out(self, address: str, host: str, port: int, deadline: float) -> tuple[socket.socket, bool]:
        with self._lock:
            self._check_open()
            idle = self._idle.get(address)
            if idle:
                sock = idle.pop()
                self._busy.add(sock)
                return sock, True
        sock = self._dial(address, host, port, deadline)
        with self._lock:
            if self._closed:
                sock.close()
                raise ClosedError(f"transport {self._address} is closed")
            self._busy.add(sock)
        return sock, False

    def _check_in(self, address: str, sock: socket.socket) -> None:
        with self._lock:
            self._busy.discard(sock)
            idle = self._idle.setdefault(address, [])
            if not self._closed and len(idle) < _IDLE_PER_PEER:
                idle.append(sock)
                return
        sock.close()

    def _discard(self, sock: socket.socket) -> None:
        with self._lock:
            self._busy.discard(sock)
        sock.close()

    def _dial(self, address: str, host: str, port: int, deadline: float) -> socket.socket:
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise TransportError(f"cannot connect to {address}: timed out")
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except ConnectionRefusedError:
            raise TransportError(f"cannot connect to {address}: connection refused") from None
        except TimeoutError:
            raise TransportError(f"cannot connect to {address}: timed out after {timeout:.3g} s") from None
        except OSError as exc:
            raise TransportError(f"cannot connect to {address}: {_why(exc)}") from None
        _tune(sock)
        return sock

    # -- server side --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break  # close() shut the listener down
            _tune(sock)
            sock.settimeout(None)  # an idle peer connection may stay open indefinitely
            handler = threading.Thread(target=self._serve, args=(sock,), name="pegaflow-loopback-serve", daemon=True)
            with self._lock:
                if self._closed:
                    sock.close()
                    break
                self._served.add(sock)
                self._handlers.add(handler)
            handler.start()

    def _serve(self, sock: socket.socket) -> None:
        """Answer one peer's requests in order until it hangs up.

        READ answers are queued (header + a view of the region, no copy) and sent with one
        ``sendmsg`` when no further complete request is already buffered, so a run of small
        READs costs a few syscalls, not two per block.
        """
        reader = _Reader(sock)
        queued: list[memoryview | bytes] = []
        queued_bytes = 0
        try:
            while True:
                # Send what is queued before anything that may block on the peer, and in bounded runs.
                would_wait = reader.buffered < _REQUEST.size
                if queued and (would_wait or queued_bytes >= _FLUSH_BYTES or len(queued) >= _IOV_MAX - 2):
                    _sendv(sock, queued)
                    queued, queued_bytes = [], 0
                header = reader.take(_REQUEST.size)
                if header is None:
                    return
                op, request_id, nonce, region_id, offset, length = _REQUEST.unpack(header)
                if op == _READ:
                    status, view = self._resolve(nonce, region_id, offset, length)
                    if view is not None:
                        queued.append(_RESPONSE.pack(_OK, request_id, length))
                        queued.append(view)
                        queued_bytes += length
                    else:
                        queued.append(_RESPONSE.pack(status, request_id, 0))
                elif op == _WRITE:
                    status, view = self._resolve(nonce, region_id, offset, length)
                    if view is not None:
                        reader.read_into(view)
                    else:
                        reader.skip(length)
                    queued.append(_RESPONSE.pack(status, request_id, 0))
                else:  # not our protocol: say so, and drop the connection (framing is unknown)
                    queued.append(_RESPONSE.pack(_BAD_REQUEST, request_id, 0))
                    _sendv(sock, queued)
                    return
        except OSError:
            return  # the peer went away, or close() shut the socket down
        finally:
            with self._lock:
                self._served.discard(sock)
                self._handlers.discard(threading.current_thread())
            sock.close()

    def _resolve(self, nonce: int, region_id: int, offset: int, length: int) -> tuple[int, memoryview | None]:
        if nonce != self._nonce:
            return _STALE, None
        with self._lock:
            region = self._regions.get(region_id)
        if region is None:
            return _NO_REGION, None
        if offset + length > len(region):
            return _OUT_OF_BOUNDS, None
        return _OK, region[offset : offset + length]

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop serving, drop every connection and fail the transfers still running (with
        ClosedError). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sockets = [s for idle in self._idle.values() for s in idle] + list(self._busy) + list(self._served)
            self._idle.clear()
            handlers = list(self._handlers)
            self._regions.clear()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop at once (Linux)
        except OSError:
            pass
        self._listener.close()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv/send on it
            except OSError:
                pass
        if threading.current_thread() is not self._server:
            self._server.join(_STOP_TIMEOUT_S)
        for handler in handlers:
            if handler is not threading.current_thread():
                handler.join(_STOP_TIMEOUT_S)
        for sock in sockets:
            sock.close()
        self._workers.shutdown(wait=False)  # queued batches still run, and fail with ClosedError

    # -- internals ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"transport {self._address} is closed; build a new one")

    def _owns(self, region: Region) -> bool:
        """Whether ``region`` came from this endpoint's register() and is still registered."""
        if region.region_id not in self._regions:
            return False
        try:
            nonce, region_id, _ = _parse_descriptor(region.descriptor, "region")
        except InvalidArgument:
            return False
        return nonce == self._nonce and region_id == region.region_id


class _PeerRefused(Exception):
    """The peer refused an op (e.g. unknown region); the connection is still usable."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _ProtocolError(Exception):
    """The peer answered something that is not the protocol; the connection is dropped."""


class _Pipeline:
    """One batch on one connection, ``_CHUNK`` ops per step, at most two steps outstanding.

    The bound matters: if the client sent a long batch of small WRITEs without reading acks, its
    receive buffer could fill with acks while it is still blocked sending payload the server
    cannot take (the server being blocked sending those acks): a deadlock. Two chunks of
    outstanding answers are 8 KiB of acks or 20 KiB of READ requests, which always fit in
    socket buffers, while the next chunk is already queued when the current one completes.
    """

    def __init__(self, sock: socket.socket, op: int, items: list[_Op], deadline: float, address: str,
                 arrived: Callable[[int], None] | None = None) -> None:
        self.sock = sock
        self.op = op
        self.items = items
        self.deadline = deadline
        self.address = address
        self.arrived = arrived
        self.answered = 0
        self.reported = 0
        self.error: Exception | None = None

    def run(self) -> None:
        chunks = [self.items[i : i + _CHUNK] for i in range(0, len(self.items), _CHUNK)]
        for chunk in chunks[:2]:
            self._send(chunk)
        for k, chunk in enumerate(chunks):
            self._receive(chunk)
            self.answered += len(chunk)
            if k + 2 < len(chunks):
                self._send(chunks[k + 2])
        if self.error is not None:
            raise _PeerRefused(self.error)

    def _send(self, chunk: list[_Op]) -> None:
        size = _REQUEST.size
        headers = bytearray(size * len(chunk))
        for j, o in enumerate(chunk):
            request_id = o.index & 0xFFFFFFFF
            _REQUEST.pack_into(headers, j * size, self.op, request_id, o.nonce, o.region_id, o.remote_offset, o.length)
        view = memoryview(headers)
        if self.op == _READ:
            _sendv(self.sock, [view], self.deadline)
            return
        parts: list[memoryview | bytes] = []
        for j, o in enumerate(chunk):
            parts.append(view[j * size : (j + 1) * size])
            parts.append(o.local)
        _sendv(self.sock, parts, self.deadline)

    def _receive(self, chunk: list[_Op]) -> None:
        if self.op == _WRITE:  # acks only: the whole chunk's answers in one receive
            size = _RESPONSE.size
            headers = bytearray(size * len(chunk))
            _recvv(self.sock, [memoryview(headers)], self.deadline)
            for j, o in enumerate(chunk):
                self._check(o, *_RESPONSE.unpack_from(headers, j * size))
            return
        header = bytearray(_RESPONSE.size)
        header_view = memoryview(header)
        arrived = self.arrived
        for o in chunk:
            _recvv(self.sock, [header_view], self.deadline)
            if self._check(o, *_RESPONSE.unpack(header)):
                if o.length:
                    _recvv(self.sock, [o.local], self.deadline)  # straight into the destination region
                if arrived is not None:
                    self.reported += 1
                    arrived(o.index)

    def _check(self, o: _Op, status: int, request_id: int, length: int) -> bool:
        """Whether the answer accepted the op; a refusal is recorded (the first one is raised
        once the whole batch has run), a malformed answer drops the connection."""
        if request_id != o.index & 0xFFFFFFFF:
            raise _ProtocolError(f"answer to request {request_id} arrived where {o.index} was expected")
        if status == _OK:
            expected = o.length if self.op == _READ else 0
            if length != expected:
                raise _ProtocolError(f"answer to request {request_id} has length {length}, expected {expected}")
            return True
        if length:
            raise _ProtocolError(f"refusal of request {request_id} carries {length} bytes")
        if self.error is None:
            self.error = self._refusal(status, o)
        return False

    def _refusal(self, status: int, o: _Op) -> Exception:
        where = f"ops[{o.index}]"
        if status == _NO_REGION:
            return TransportError(
                f"{where}: region {o.region_id} is not registered at {self.address} (it was deregistered)"
            )
        if status == _STALE:
            return TransportError(
                f"{where}: the descriptor of region {o.region_id} is from an endpoint that no longer "
                f"exists; {self.address} is now another endpoint (ask the peer for a fresh descriptor)"
            )
        if status == _OUT_OF_BOUNDS:
            return InvalidArgument(
                f"{where}: remote_offset {o.remote_offset} + length {o.length} exceeds region "
                f"{o.region_id} at {self.address}"
            )
        return TransportError(f"{where}: {self.address} refused the request (status {status})")


class _Reader:
    """Server-side buffered reads of a request stream.

    Requests are read ahead ``_SERVER_BUFFER`` bytes at a time, so a burst of READ requests costs
    one syscall. A WRITE payload is taken from the read-ahead for the part already there (at most
    64 KiB, copied once) and received straight into the region for the rest.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray(_SERVER_BUFFER)
        self.view = memoryview(self.buffer)
        self.start = 0
        self.end = 0

    @property
    def buffered(self) -> int:
        return self.end - self.start

    def take(self, n: int) -> memoryview | None:
        """The next ``n`` bytes (valid until the next call), or None on a clean end of stream."""
        if self.end - self.start < n:
            if self.start:
                kept = self.end - self.start
                self.buffer[:kept] = self.view[self.start : self.end]
                self.start, self.end = 0, kept
            while self.end < n:
                got = self.sock.recv_into(self.view[self.end :])
                if got == 0:
                    if self.end == 0:
                        return None
                    raise ConnectionError(
                        errno.ECONNRESET, f"peer closed the connection inside a request ({self.end} of {n} bytes)"
                    )
                self.end += got
        out = self.view[self.start : self.start + n]
        self.start += n
        return out

    def read_into(self, dest: memoryview) -> None:
        ahead = min(self.end - self.start, len(dest))
        if ahead:
            dest[:ahead] = self.view[self.start : self.start + ahead]
            self.start += ahead
        if ahead < len(dest):
            _recvv(self.sock, [dest[ahead:]])

    def skip(self, n: int) -> None:
        """Consume the payload of a refused WRITE, so the stream stays in step."""
        ahead = min(self.end - self.start, n)
        self.start += ahead
        n -= ahead
        if n:  # the read-ahead is used up: drain the rest through it as scratch space
            self.start = self.end = 0
            while n:
                step = min(n, len(self.view))
                _recvv(self.sock, [self.view[:step]])
                n -= step


# -- socket helpers ---------------------------------------------------------------------------
def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        except OSError:
            pass  # the kernel default still works, just slower


def _sendv(sock: socket.socket, parts: list[memoryview | bytes], deadline: float | None = None) -> None:
    """Send every part, in order, with as few ``sendmsg`` calls as the kernel allows; parts are
    sliced (never copied) when a call sends only some of them."""
    pending = [p if isinstance(p, memoryview) else memoryview(p) for p in parts if len(p)]
    i = 0
    while i < len(pending):
        if deadline is not None:
            _arm(sock, deadline)
        sent = sock.sendmsg(_window(pending, i))
        while sent:
            n = len(pending[i])
            if sent >= n:
                sent -= n
                i += 1
            else:
                pending[i] = pending[i][sent:]
                sent = 0


def _recvv(sock: socket.socket, parts: list[memoryview], deadline: float | None = None) -> None:
    """Fill every part, in order, scattering with ``recvmsg_into``; EOF is a ConnectionError."""
    pending = [p for p in parts if len(p)]
    total = sum(len(p) for p in pending)
    got = 0
    i = 0
    while i < len(pending):
        if deadline is not None:
            _arm(sock, deadline)
        n = sock.recvmsg_into(_window(pending, i))[0]
        if n == 0:
            raise ConnectionError(errno.ECONNRESET, f"peer closed the connection after {got} of {total} bytes")
        got += n
        while n:
            size = len(pending[i])
            if n >= size:
                n -= size
                i += 1
            else:
                pending[i] = pending[i][n:]
                n = 0


def _window(parts: list[memoryview], start: int) -> list[memoryview]:
    """The parts one syscall should be offered: up to IOV_MAX of them, and no more than about a
    socket buffer's worth of bytes (the kernel cannot move more per call, and offering 2 MiB parts
    by the hundred would make every call walk a long iovec list for nothing)."""
    end = start
    limit = min(len(parts), start + _IOV_MAX)
    size = 0
    while end < limit and size < _SYSCALL_BYTES:
        size += len(parts[end])
        end += 1
    return parts[start:end]


def _arm(sock: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)


def _why(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]  # "Connection reset by peer" -> "connection ..."
    return str(exc) or type(exc).__name__


# -- argument checks --------------------------------------------------------------------------
def _parse_address(address: Any, what: str) -> tuple[str, int]:
    if isinstance(address, str) and address.startswith("tcp://"):
        host, sep, port = address[len("tcp://") :].rpartition(":")
        if sep and host and port.isdigit() and 0 < int(port) <= 65535:
            return host.strip("[]"), int(port)
    raise InvalidArgument(f"{what}: expected a loopback address like 'tcp://127.0.0.1:41234', got {address!r}")


def _parse_descriptor(descriptor: Any, what: str) -> tuple[int, int, int]:
    """(nonce, region id, nbytes) of a descriptor made by ``LoopbackTransport.register``."""
    if not isinstance(descriptor, (bytes, bytearray)) or len(descriptor) != _DESCRIPTOR.size:
        got = f"{len(descriptor)} bytes" if isinstance(descriptor, (bytes, bytearray)) else type(descriptor).__name__
        raise InvalidArgument(
            f"{what}: expected a {_DESCRIPTOR.size}-byte loopback region descriptor "
            f"(Region.descriptor from LoopbackTransport.register), got {got}"
        )
    magic, nonce, region_id, nbytes = _DESCRIPTOR.unpack(descriptor)
    if magic != _MAGIC:
        raise InvalidArgument(f"{what}: not a loopback region descriptor (magic {magic!r}, expected {_MAGIC!r})")
    return nonce, region_id, nbytes


@hookimpl
def register_transports(register: Register) -> None:
    register(LoopbackTransport)
