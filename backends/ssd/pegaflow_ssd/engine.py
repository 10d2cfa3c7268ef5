"""I/O engines: aligned O_DIRECT reads and writes between files and page-aligned staging memory,
with up to ``queue_depth`` requests in flight.

O_DIRECT needs the buffer, the file offset and the length aligned to the device's logical block
(we always use 4096). Callers' buffers are not aligned, so every byte goes through the **arena**, one
anonymous ``mmap`` (page-aligned) allocated once: with io_uring it is registered as a fixed buffer,
so the kernel does not pin and unpin pages per request. The arena is handed out first-in first-out
(a ring), which matches how a batch streams through it; a request larger than the whole arena gets
a private aligned buffer for its lifetime.

Two engines share that logic (:class:`Engine.run`): :class:`UringEngine` (liburing, imported lazily
so the package loads without it) and :class:`ThreadEngine` (``os.preadv``/``os.pwritev`` in a thread
pool; they release the GIL). One batch runs at a time per engine: the ring and the arena are not
shared between concurrent batches, and a disk tier is bound by the device, not by submitters.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from .format import PAGE

Fill = Callable[[memoryview], None]
Done = Callable[[memoryview, "OSError | None"], None]


@dataclass(eq=False)
class IORequest:
    """One aligned I/O. For a write, ``fill(buf)`` writes the bytes into staging just before the
    request is submitted; ``done(buf, error)`` runs once it completed (for a read, ``buf`` holds
    the bytes; it is valid only during the call). A short transfer is reported as an error."""

    fd: int
    offset: int
    length: int
    write: bool
    done: Done
    fill: Fill | None = None
    # filled in by the engine
    buf: memoryview | None = field(default=None, repr=False)
    span: int = -1  # arena span id, or -1 for a private buffer
    private: mmap.mmap | None = field(default=None, repr=False)


class _Ring:
    """First-in first-out allocator over the arena. Spans are freed in any order; space comes
    back when every older span is free too (a batch streams through, so that is soon)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.head = 0
        self.spans: deque[list[int]] = deque()  # [id, start, end, freed]
        self.next_id = 0
        self.by_id: dict[int, list[int]] = {}

    def alloc(self, n: int) -> tuple[int, int] | None:
        if not self.spans:
            self.head = 0
            start = 0
        else:
            tail = self.spans[0][1]
            if self.head == tail:  # spans in use and head caught up with the oldest: full
                return None
            if self.head > tail:  # free space is [head, size) and [0, tail)
                if self.size - self.head >= n:
                    start = self.head
                elif tail >= n:
                    start = 0
                else:
                    return None
            else:  # free space is [head, tail)
                if tail - self.head >= n:
                    start = self.head
                else:
                    return None
        if start + n > self.size:
            return None
        span = [self.next_id, start, start + n, 0]
        self.next_id += 1
        self.spans.append(span)
        self.by_id[span[0]] = span
        self.head = start + n
        return span[0], start

    def free(self, span_id: int) -> None:
        self.by_id.pop(span_id)[3] = 1
        while self.spans and self.spans[0][3]:
            self.spans.popleft()


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous page-aligned memory (what O_DIRECT needs), rounded up to whole pages."""
    return mmap.mmap(-1, max(PAGE, (nbytes + PAGE - 1) // PAGE * PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class Engine(ABC):
    """Runs streams of :class:`IORequest` with up to ``queue_depth`` in flight."""

    name: str

    def __init__(self, queue_depth: int, arena_bytes: int) -> None:
        self.queue_depth = queue_depth
        self.arena = aligned_buffer(arena_bytes)
        self.arena_view = memoryview(self.arena)
        self._fifo = _Ring(len(self.arena))
        self._lock = threading.Lock()
        self.detail = ""

    def run(self, requests: Iterable[IORequest]) -> None:
        """Submit every request (pulled lazily from ``requests``) and return when all completed.

        If a ``fill`` or ``done`` callback raises, nothing more is submitted, the requests in flight
        are drained (the kernel may still be writing into staging memory) and the error propagates.
        """
        with self._lock:
            source = iter(requests)
            nxt: IORequest | None = next(source, None)
            inflight = 0
            failure: BaseException | None = None
            try:
                while nxt is not None or inflight:
                    submitted = []
                    while nxt is not None and failure is None and inflight + len(submitted) < self.queue_depth:
                        if not self._stage(nxt):
                            break
                        if nxt.write and nxt.fill is not None:
                            try:
                                nxt.fill(nxt.buf)
                            except BaseException as exc:
                                self._release(nxt)
                                failure = exc
                                break
                        submitted.append(nxt)
                        nxt = next(source, None) if failure is None else None
                    if submitted:
                        self._submit(submitted)
                        inflight += len(submitted)
                    if failure is not None:
                        nxt = None
                    if not inflight:
                        if nxt is not None and not submitted:  # cannot happen: oversized requests get a private buffer
                            raise RuntimeError(f"engine: {nxt.length} bytes could not be staged with nothing in flight")
                        continue
                    for req, error in self._reap():
                        inflight -= 1
                        try:
                            if failure is None:
                                req.done(req.buf, error)
                        except BaseException as exc:
                            failure = exc
                            nxt = None
                        finally:
                            self._release(req)
            except BaseException as exc:
                failure = failure or exc
                while inflight:
                    for req, _ in self._reap():
                        inflight -= 1
                        self._release(req)
            if failure is not None:
                raise failure

    def _stage(self, req: IORequest) -> bool:
        if req.length % PAGE or req.offset % PAGE or req.length <= 0:
            raise ValueError(f"engine: unaligned request offset={req.offset} length={req.length} (need multiples of {PAGE})")
        if req.length > len(self.arena):
            req.private = aligned_buffer(req.length)
            req.buf = memoryview(req.private)[: req.length]
            req.span = -1
            return True
        got = self._fifo.alloc(req.length)
        if got is None:
            return False
        req.span, start = got
        req.buf = self.arena_view[start : start + req.length]
        return True

    def _release(self, req: IORequest) -> None:
        if req.buf is not None:
            req.buf.release()
            req.buf = None
        if req.span >= 0:
            self._fifo.free(req.span)
            req.span = -1
        if req.private is not None:
            req.private.close()
            req.private = None

    @abstractmethod
    def _submit(self, requests: list[IORequest]) -> None: ...

    @abstractmethod
    def _reap(self) -> list[tuple[IORequest, OSError | None]]:
        """Block until at least one request completed; return every completed one."""

    def close(self) -> None:
        with self._lock:
            self._close()
            self.arena_view.release()
            self.arena.close()

    def _close(self) -> None:
        pass


def _short(req: IORequest, got: int) -> OSError:
    what = "write" if req.write else "read"
    return OSError(errno.EIO, f"short {what}: {got} of {req.length} bytes at offset {req.offset}")


class ThreadEngine(Engine):
    """``os.preadv``/``os.pwritev`` on the O_DIRECT fd, one request per pool thread."""

    name = "threads"

    def __init__(self, queue_depth: int, arena_bytes: int) -> None:
        super().__init__(queue_depth, arena_bytes)
        self._pool = ThreadPoolExecutor(max_workers=min(queue_depth, 32), thread_name_prefix="pegaflow-ssd-io")
        self._futures: dict[Future[int], IORequest] = {}
        self.detail = f"thread pool of {min(queue_depth, 32)} (preadv/pwritev)"

    @staticmethod
    def _do(req: IORequest) -> int:
        buf = req.buf
        assert buf is not None
        done = 0
        while done < req.length:
            chunk = buf[done:]
            n = os.pwritev(req.fd, [chunk], req.offset + done) if req.write else os.preadv(req.fd, [chunk], req.offset + done)
            if n <= 0:
                break
            done += n
        return done

    def _submit(self, requests: list[IORequest]) -> None:
        for req in requests:
            self._futures[self._pool.submit(self._do, req)] = req

    def _reap(self) -> list[tuple[IORequest, OSError | None]]:
        finished, _ = wait(list(self._futures), return_when=FIRST_COMPLETED)
        out = []
        for fut in finished:
            req = self._futures.pop(fut)
            try:
                got = fut.result()
                out.append((req, None if got == req.length else _short(req, got)))
            except OSError as exc:
                out.append((req, exc))
        return out

    def _close(self) -> None:
        self._pool.shutdown(wait=True)


class UringEngine(Engine):
    """io_uring through PyPI ``liburing`` (imported here, lazily). Raises OSError or ImportError
    when a ring cannot be set up; :func:`open_engine` then falls back to threads.

    The arena is registered with the ring (``io_uring_register_buffers``), so the kernel pins it
    once instead of per request. liburing 2024.5.3's Python ``io_uring_prep_read_fixed`` takes
    ``char *``, which Cython accepts only from ``bytes``/``bytearray``, so it cannot address a slice
    of mmap memory. We therefore prepare a plain READ/WRITE on the arena address and turn it into
    READ_FIXED/WRITE_FIXED (buffer index 0) in the submission queue entry itself: the SQE array is
    the ring's ``IORING_OFF_SQES`` mapping, found in /proc/self/maps by the ring fd's inode, and
    liburing hands out entries in order, so entry ``n`` is at ``n & mask``. Every patch first
    checks that the entry holds our user_data; on any doubt fixed mode is switched off and plain
    requests continue (the kernel also rejects a fixed address outside the registered buffer).
    """

    name = "io_uring"

    def __init__(self, queue_depth: int, arena_bytes: int) -> None:
        import liburing  # noqa: PLC0415 - optional native dependency, loaded only when used

        super().__init__(queue_depth, arena_bytes)
        self._lib = liburing
        self._ring = liburing.io_uring()
        self._cqes = liburing.io_uring_cqe()
        entries = 1 << max(1, (queue_depth - 1).bit_length())
        rc = liburing.io_uring_queue_init(entries, self._ring, 0)
        if rc < 0:
            raise OSError(-rc, f"io_uring_queue_init({entries}): {os.strerror(-rc)}")
        self._open = True
        self._iov = liburing.iovec(self.arena_view)
        try:
            rc = liburing.io_uring_register_buffers(self._ring, self._iov, 1)
        except Exception as exc:  # liburing raises on negative returns in some versions
            rc = -(getattr(exc, "errno", None) or errno.EINVAL)
        self.registered = rc >= 0
        self._inflight: dict[int, IORequest] = {}
        self._next = 0
        self._entries = entries
        self._sqe_count = 0
        self._sqes = _sqe_array(self._ring.ring_fd) if self.registered else None
        self.fixed = self._sqes is not None
        if self.fixed:
            note = ", fixed buffers"
        elif self.registered:
            note = " (arena registered, SQE array not found: plain reads/writes)"
        else:
            note = f" (arena not registered: {os.strerror(-rc)}; plain reads/writes)"
        self.detail = f"io_uring, {entries} entries{note}"

    def _submit(self, requests: list[IORequest]) -> None:
        lib = self._lib
        for req in requests:
            sqe = lib.io_uring_get_sqe(self._ring)
            assert req.buf is not None
            if req.write:
                lib.io_uring_prep_write(sqe, req.fd, req.buf, req.length, req.offset)
            else:
                lib.io_uring_prep_read(sqe, req.fd, req.buf, req.length, req.offset)
            self._next += 1
            lib.io_uring_sqe_set_data64(sqe, self._next)
            slot = self._sqe_count & (self._entries - 1)
            self._sqe_count += 1
            if self.fixed and req.span >= 0:
                self._make_fixed(slot, req.write)
            self._inflight[self._next] = req
        rc = lib.io_uring_submit(self._ring)
        if rc < 0:
            raise OSError(-rc, f"io_uring_submit: {os.strerror(-rc)}")

    def _make_fixed(self, slot: int, write: bool) -> None:
        """Turn the READ/WRITE just prepared in SQE ``slot`` into READ_FIXED/WRITE_FIXED."""
        assert self._sqes is not None
        addr = self._sqes + slot * _SQE_BYTES
        if ctypes.c_uint64.from_address(addr + _SQE_USER_DATA).value != self._next:
            self.fixed = False  # liburing handed out entries in another order: stay correct, go plain
            self.detail = f"io_uring, {self._entries} entries (SQE order unexpected: plain reads/writes)"
            return
        ctypes.c_uint16.from_address(addr + _SQE_BUF_INDEX).value = 0
        ctypes.c_uint8.from_address(addr).value = _OP_WRITE_FIXED if write else _OP_READ_FIXED

    def _reap(self) -> list[tuple[IORequest, OSError | None]]:
        lib = self._lib
        out: list[tuple[IORequest, OSError | None]] = []
        rc = lib.io_uring_wait_cqe(self._ring, self._cqes)
        while True:
            if rc < 0:
                if -rc in (errno.EAGAIN, errno.EINTR) and out:
                    return out
                if -rc == errno.EINTR:
                    rc = lib.io_uring_wait_cqe(self._ring, self._cqes)
                    continue
                if -rc == errno.EAGAIN:
                    return out
                raise OSError(-rc, f"io_uring_wait_cqe: {os.strerror(-rc)}")
            cqe = self._cqes[0]
            res, token = cqe.res, cqe.user_data
            lib.io_uring_cqe_seen(self._ring, cqe)
            req = self._inflight.pop(token)
            if res < 0:
                out.append((req, OSError(-res, f"{'write' if req.write else 'read'} of {req.length} bytes at offset {req.offset}: {os.strerror(-res)}")))
            elif res != req.length:
                out.append((req, _short(req, res)))
            else:
                out.append((req, None))
            try:
                rc = lib.io_uring_peek_cqe(self._ring, self._cqes)
            except Exception:
                return out
            if rc < 0:
                return out

    def _close(self) -> None:
        if self._open:
            if self.registered:
                self._lib.io_uring_unregister_buffers(self._ring)
            self._lib.io_uring_queue_exit(self._ring)
            self._open = False


_SQE_BYTES = 64
_SQE_USER_DATA = 32
_SQE_BUF_INDEX = 40
_OP_READ_FIXED = 4
_OP_WRITE_FIXED = 5
_IORING_OFF_SQES = 0x10000000


def _sqe_array(ring_fd: int) -> int | None:
    """Address of the ring's SQE array: its mapping at offset IORING_OFF_SQES of the ring fd."""
    try:
        inode = os.fstat(ring_fd).st_ino
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 5 and int(fields[2], 16) == _IORING_OFF_SQES and int(fields[4]) == inode:
                    return int(fields[0].split("-")[0], 16)
    except (OSError, ValueError):
        return None
    return None


def open_engine(mode: str, queue_depth: int, arena_bytes: int) -> tuple[Engine, str]:
    """The engine ``mode`` asks for; ``auto`` tries io_uring and falls back to threads, saying why."""
    if mode == "threads":
        return ThreadEngine(queue_depth, arena_bytes), "threads (io: threads)"
    from .segments import probe_uring  # noqa: PLC0415 - avoids an import cycle

    usable, why = probe_uring()
    if not usable:
        if mode == "io_uring":
            raise OSError(errno.ENOTSUP, f"io: 'io_uring' but {why}")
        return ThreadEngine(queue_depth, arena_bytes), f"threads, because {why}"
    try:
        engine: Engine = UringEngine(queue_depth, arena_bytes)
        return engine, engine.detail
    except ImportError as exc:
        why = f"liburing does not import ({exc}); pip install 'liburing==2024.5.3'"
    except OSError as exc:
        why = f"io_uring ring setup failed ({exc})"
    if mode == "io_uring":
        raise OSError(errno.ENOTSUP, f"io: 'io_uring' but {why}")
    return ThreadEngine(queue_depth, arena_bytes), f"threads, because {why}"
