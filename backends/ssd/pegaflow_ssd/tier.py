"""SsdTier: the capacity tier below DRAM, a crash-safe log of records in fixed-size segment files.

Layout and policy (docs/ssd-format.md has the byte-level format):

- **Append only.** ``put`` appends records (header page + payload, 4 KiB-aligned) to the open
  segment and streams them to disk through the I/O engine in large aligned pieces, several in
  flight; it returns once every write completed (and, with ``fsync``, ``fdatasync`` returned), so
  a ``True`` survives ``kill -9``.
- **Index in memory, rebuilt from disk.** At open every segment's record headers are scanned (never
  the payloads); the highest sequence number wins when a key appears twice. Segments found with
  data are sealed: new records always go to an empty segment, so a torn tail is never followed by
  newer records.
- **Never returns wrong bytes.** A read checks the header (checksum, key, sequence, length) and the
  payload's xxhash64; any mismatch is a miss, counted in ``integrity_failures`` and logged with the
  file and offset, and the record is dropped from the index.
- **No eviction policy.** When full, ``put`` answers False. ``evict`` marks records dead on disk
  (the header is rewritten with the dead flag). Space comes back by (1) reusing segments whose
  records are all dead and (2) compacting the sealed segment with the least live data: its live
  records are rewritten at the log head and the segment is zeroed for reuse. One segment of the
  capacity is kept free so compaction can always make progress.

For the daemon: ``integrity_failures`` (a counter to export), ``stored_keys()`` (to put this
tier's blocks back into the index after a restart, with their xxhash64), and with
``background_load`` the ``loading`` property / ``wait_loaded()`` (the constructor returns at once;
reads miss and writes wait until the scan is done).

Locks: ``_lock`` guards the in-memory maps (held briefly); ``_write_lock`` serialises writers (put,
evict, compaction) including their I/O; readers only pin the segments they read (``readers``) so a
segment is never zeroed under a read.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pegaflow_core import (
    Availability,
    BlockKey,
    CapacityError,
    ClosedError,
    InvalidArgument,
    MemoryKind,
    Tier,
    TierCapabilities,
    TierUsage,
    byte_view,
)
from pegaflow_core.buffers import Buffer
from pegaflow_core.sizes import Size, format_size

from . import segments as segfiles
from .engine import Engine, IORequest, open_engine
from .format import FLAG_DEAD, PAGE, HeaderState, encode_key, pack_header, parse_header, payload_hash, record_bytes
from .options import MIB, SsdOptions

log = logging.getLogger("pegaflow.ssd")

SUPERBLOCK = "pegaflow-ssd.json"
LOCKFILE = "lock"
WRITE_PIECE = 2 * MIB  # bytes per write request: large enough for full device speed, small enough to pipeline
COMPACT_BATCH = 32 * MIB  # live bytes read back per compaction round


class _Record:
    """Where one stored block lives. Subclasses reading records through another I/O path (see
    ``reading_records``) use ``path``, ``payload_offset``, ``payload_len`` and ``phash``."""

    __slots__ = ("seg", "offset", "length", "payload_len", "seq", "phash", "key_bytes")

    def __init__(self, seg: _Segment, offset: int, payload_len: int, seq: int, phash: int, key_bytes: bytes) -> None:
        self.seg = seg
        self.offset = offset
        self.length = record_bytes(payload_len)
        self.payload_len = payload_len
        self.seq = seq
        self.phash = phash
        self.key_bytes = key_bytes

    @property
    def path(self) -> Path:
        return self.seg.path

    @property
    def payload_offset(self) -> int:
        """File offset of the payload (after the header page): 4 KiB-aligned."""
        return self.offset + PAGE


StoredRecord = _Record  # the name subclasses and their docs use


class _Segment:
    FREE, OPEN, SEALED = "free", "open", "sealed"
    __slots__ = ("id", "path", "fd", "frontier", "live_bytes", "live", "readers", "pending", "state")

    def __init__(self, seg_id: int, path: Path, fd: int) -> None:
        self.id = seg_id
        self.path = path
        self.fd = fd
        self.frontier = 0  # next append offset (OPEN); end of the log (SEALED)
        self.live_bytes = 0
        self.live = 0
        self.readers = 0
        self.pending = 0  # records allocated here whose write has not finished: never reclaim under them
        self.state = _Segment.FREE


@dataclass(eq=False)
class _Plan:
    """A record about to be written: where, and with which bytes. ``phash`` is computed while
    earlier pieces are in flight (see ``_pieces``) unless the caller already knows it.
    ``payload`` is None when another I/O path writes the payload (``append_records``); ``source``
    is then the index of the block in the caller's batch."""

    key_bytes: bytes
    seq: int
    payload: memoryview | None
    seg: _Segment
    offset: int
    phash: int | None = None
    ok: bool = True
    payload_len: int = -1
    source: int = -1

    def __post_init__(self) -> None:
        if self.payload_len < 0:
            assert self.payload is not None
            self.payload_len = len(self.payload)

    @property
    def payload_offset(self) -> int:
        return self.offset + PAGE

    @property
    def path(self) -> Path:
        return self.seg.path

    @property
    def fd(self) -> int:
        """The segment's O_DIRECT descriptor (for header pages written through ``engine``)."""
        return self.seg.fd


PlannedRecord = _Plan  # the name subclasses and their docs use
WriteRecords = Callable[[list[_Plan]], None]


def _keys(keys: Sequence[BlockKey], what: str = "keys") -> list[BlockKey]:
    if isinstance(keys, (str, bytes, BlockKey)):
        raise InvalidArgument(f"{what}: expected a sequence of BlockKey, got a single {type(keys).__name__}")
    out = list(keys)
    for i, key in enumerate(out):
        if not isinstance(key, BlockKey):
            raise InvalidArgument(f"{what}[{i}]: expected a BlockKey, got {type(key).__name__}")
    return out


class SsdTier(Tier):
    """Persistent block store on an SSD directory; see the module docstring for the design."""

    kind: ClassVar[str] = "ssd"
    Options: ClassVar[type] = SsdOptions
    capabilities: ClassVar[TierCapabilities] = TierCapabilities(
        memory=frozenset({MemoryKind.FILE}), persistent=True, host_views=False
    )

    def __init__(self, options: SsdOptions) -> None:
        if not isinstance(options, SsdOptions):
            raise InvalidArgument(f"SsdTier: expected SsdTier.Options, got {type(options).__name__}")
        self.options = options
        self.path = Path(options.path)
        self.segment_size = options.segment_size
        self.max_segments = options.capacity // options.segment_size
        self.integrity_failures = 0
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._index: dict[BlockKey, _Record] = {}
        self._segments: dict[int, _Segment] = {}
        self._open: _Segment | None = None
        self._next_seq = 1
        self._closed = False
        self._disk_full = False
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._lock_fd = self._prepare_directory()
        try:
            arena = max(4 * MIB, min(options.queue_depth * WRITE_PIECE, 64 * MIB))
            try:
                self._engine, self.io_detail = open_engine(options.io, options.queue_depth, arena)
            except OSError as exc:
                raise InvalidArgument(f"io: {exc.strerror or exc}; use io: auto or io: threads") from None
            if options.background_load:
                self._write_lock.acquire()  # released by the loader thread: writers wait for the index
                threading.Thread(target=self._load_in_background, name="pegaflow-ssd-load", daemon=True).start()
                return
            try:
                self._load()
            except BaseException:
                self._engine.close()
                raise
        except BaseException:
            self._release_files()
            raise
        self._loaded.set()
        self._log_opened()

    def _log_opened(self) -> None:
        log.info(
            "ssd tier: %s in %s (%d of %d segments of %s in use, %d blocks, %s%s)",
            format_size(self.options.capacity), self.path, len(self._segments), self.max_segments,
            format_size(self.segment_size), len(self._index), self.io_detail,
            f", {self.integrity_failures} corrupt records skipped" if self.integrity_failures else "",
        )

    def _load_in_background(self) -> None:
        """Rebuild the index off the constructor's thread (``background_load``). Until it is done
        reads miss and writers wait; a failure is kept and raised by every later call."""
        try:
            self._load()
            self._log_opened()
        except BaseException as exc:
            self._load_error = exc
            log.error("ssd tier: rebuilding the index of %s failed: %s", self.path, exc)
        finally:
            self._loaded.set()
            self._write_lock.release()

    @property
    def loading(self) -> bool:
        """True while a background rebuild of the index runs: reads miss, writes wait. The daemon
        can report the tier as 'loading' meanwhile instead of delaying its start."""
        return not self._loaded.is_set()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until the index is rebuilt; False if ``timeout`` seconds passed first."""
        return self._loaded.wait(timeout)

    @property
    def warming(self) -> bool:
        """The daemon's name for ``loading``: serving starts, this tier's hits come later."""
        return self.loading

    def recovered(self) -> list[tuple[BlockKey, int]]:
        """What a restarted daemon indexes again (waits for a background rebuild)."""
        return [(key, nbytes) for key, nbytes, _ in self.stored_keys()]

    def stored_keys(self) -> list[tuple[BlockKey, int, int]]:
        """``(key, payload bytes, payload xxhash64)`` of every stored block, for a daemon that
        restarts to put this tier's blocks back into its index (the checksum is the same xxhash64
        that ``Location.checksum`` carries). Waits for a background rebuild."""
        self._loaded.wait()
        with self._lock:
            self._check_open()
            return [(key, rec.payload_len, rec.phash) for key, rec in self._index.items()]

    # -- opening --------------------------------------------------------------------------------
    def _prepare_directory(self) -> int:
        path = self.path
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise InvalidArgument(f"path: {path} exists and is not a directory; give a directory for the segment files") from None
        except OSError as exc:
            raise InvalidArgument(f"path: cannot create directory {path}: {exc.strerror}; create it or pick a writable path") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise InvalidArgument(f"path: directory {path} is not writable by uid {os.getuid()}; fix its permissions or pick another path")
        try:
            lock_fd = os.open(path / LOCKFILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise InvalidArgument(f"path: cannot create {path / LOCKFILE}: {exc.strerror}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise InvalidArgument(
                f"path: {path} is in use by another ssd tier (its lock file is held); give each tier its own directory"
            ) from None
        try:
            self._check_superblock()
            self._check_direct_io()
        except BaseException:
            os.close(lock_fd)
            raise
        return lock_fd

    def _check_superblock(self) -> None:
        sb = self.path / SUPERBLOCK
        if sb.exists():
            try:
                meta = json.loads(sb.read_text())
                found = int(meta["segment_size"])
            except (ValueError, KeyError, TypeError, OSError) as exc:
                raise InvalidArgument(f"path: {sb} is not a pegaflow-ssd superblock ({exc}); use an empty directory") from None
            if meta.get("format") != "pegaflow-ssd" or int(meta.get("version", 0)) != 1:
                raise InvalidArgument(f"path: {sb} has format {meta.get('format')!r} version {meta.get('version')!r}; this tier reads pegaflow-ssd version 1")
            if found != self.segment_size:
                raise InvalidArgument(
                    f"segment_size: {self.path} holds segments of {found} bytes ({format_size(found)}), "
                    f"the options say {self.segment_size}; set segment_size: {found} or use an empty directory"
                )
            return
        tmp = sb.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"format": "pegaflow-ssd", "version": 1, "segment_size": self.segment_size}) + "\n")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, sb)
            segfiles.fsync_dir(self.path)
        except OSError as exc:
            raise _disk_error(exc, f"cannot write {sb}") from None

    def _check_direct_io(self) -> None:
        probe = self.path / ".odirect-probe"
        try:
            fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise InvalidArgument(
                    f"path: the file system of {self.path} does not support O_DIRECT (tmpfs does not); "
                    "put the ssd tier on a disk file system such as ext4 or xfs"
                ) from None
            raise _disk_error(exc, f"cannot create files in {self.path}") from None
        os.close(fd)
        probe.unlink(missing_ok=True)

    def _load(self) -> None:
        found: dict[int, tuple[int, Path]] = {}
        for entry in sorted(os.listdir(self.path)):
            sid = segfiles.segment_id(entry)
            if sid is None:
                continue
            path = self.path / entry
            fd = segfiles.open_direct(path)
            size = os.fstat(fd).st_size
            if size < self.segment_size:  # cut short (crash while creating it, or damage): keep what is there
                log.warning("ssd tier: %s is %d bytes, expected %d; extending it (records cut off read as corrupt)",
                            path, size, self.segment_size)
                try:
                    segfiles.allocate(fd, self.segment_size)
                except OSError as exc:
                    os.close(fd)
                    raise _disk_error(exc, f"cannot extend {path} to {self.segment_size} bytes") from None
            elif size > self.segment_size:
                os.close(fd)
                raise InvalidArgument(f"path: {path} is {size} bytes, larger than segment_size {self.segment_size}; "
                                      "it is not a segment of this tier: move it away")
            found[sid] = (fd, path)
            self._segments[sid] = _Segment(sid, path, fd)
        scans = segfiles.scan_segments(self._engine, found, self.segment_size)
        for sid, scan in scans.items():
            seg = self._segments[sid]
            for offset, reason in scan.corrupt:
                self._integrity_failure(seg, offset, reason)
            for rec in scan.records:
                self._next_seq = max(self._next_seq, rec.header.seq + 1)
                if rec.header.dead:
                    continue
                key = rec.header.key()
                new = _Record(seg, rec.offset, rec.header.payload_len, rec.header.seq, rec.header.payload_hash, rec.header.key_bytes)
                old = self._index.get(key)
                if old is not None:
                    if old.seq > new.seq:
                        continue
                    old.seg.live -= 1
                    old.seg.live_bytes -= old.length
                self._index[key] = new
                seg.live += 1
                seg.live_bytes += new.length
            seg.frontier = scan.end
            seg.state = _Segment.SEALED if (scan.records or scan.corrupt) else _Segment.FREE
        if not self._segments:
            if self._take_segment(keep=0) is None:
                raise CapacityError(
                    f"path: cannot create a first segment of {format_size(self.segment_size)} in {self.path}: "
                    "the file system is full; free space or lower segment_size"
                )

    # -- Backend hooks ------------------------------------------------------------------------
    @classmethod
    def availability(cls) -> Availability:
        usable, why = segfiles.probe_uring()
        if usable:
            return Availability(True, f"io_uring via {why}; O_DIRECT needs a disk file system (not tmpfs)")
        return Availability(True, f"thread-pool I/O (preadv/pwritev): {why}")

    @classmethod
    def conformance_options(cls, tmp_path: Path, capacity_bytes: int | None = None) -> SsdOptions:
        capacity = capacity_bytes if capacity_bytes is not None else 64 * MIB
        segment = min(MIB, max(2 * PAGE, capacity // 4 // PAGE * PAGE))
        return SsdOptions(path=str(Path(tmp_path) / "ssd"), capacity=Size(max(capacity, 2 * segment)),
                          segment_size=Size(segment), queue_depth=4, fsync=False)

    # -- Tier: required -----------------------------------------------------------------------
    def put(self, keys: Sequence[BlockKey], blocks: Sequence[Buffer]) -> list[bool]:
        keys = _keys(keys)
        if len(keys) != len(blocks):
            raise InvalidArgument(f"blocks: expected one block per key ({len(keys)}), got {len(blocks)}")
        sources = [byte_view(block, what=f"blocks[{i}]") for i, block in enumerate(blocks)]
        return self._append(keys, [len(view) for view in sources], sources, None, "blocks")

    def append_records(self, keys: Sequence[BlockKey], sizes: Sequence[int], write: WriteRecords,
                       what: str = "blocks") -> list[bool]:
        """``put`` for a subclass whose payloads come from elsewhere (GPU memory): same answers,
        same log, reclaim and durability. ``write(plans)`` is called (with the writer lock held)
        for each run of new records; each ``PlannedRecord`` names ``source`` (the index in this
        batch), ``path``/``fd``, ``offset`` (the header page), ``payload_offset`` and
        ``payload_len``. It must write the payload, set ``phash`` to the payload's xxhash64, write
        the header page (``format.pack_header`` into a page written at ``offset`` with
        ``self.engine``) and set ``ok = False`` on a record that failed. The tier then fdatasyncs
        (with ``fsync``) and publishes the records that are ok."""
        keys = _keys(keys)
        if len(keys) != len(sizes):
            raise InvalidArgument(f"{what}: expected one block per key ({len(keys)}), got {len(sizes)}")
        return self._append(keys, list(sizes), None, write, what)

    @property
    def engine(self) -> Engine:
        """The O_DIRECT I/O engine (for a subclass's header pages); one batch at a time."""
        return self._engine

    def _append(self, keys: list[BlockKey], sizes: list[int], sources: list[memoryview] | None,
                write: WriteRecords | None, what: str) -> list[bool]:
        encoded = [encode_key(key) for key in keys]
        for i, size in enumerate(sizes):
            self._check_fits(size, f"{what}[{i}]")
        results = [False] * len(keys)
        with self._write_lock:
            first: dict[BlockKey, int] = {}
            todo: list[int] = []
            with self._lock:
                self._check_open()
                for i, key in enumerate(keys):
                    if key in first:
                        continue
                    first[key] = i
                    if key in self._index:
                        results[i] = True
                    else:
                        todo.append(i)
            plans: list[tuple[int, _Plan]] = []
            for i in todo:
                length = record_bytes(sizes[i])
                where = self._allocate(length, reclaim=False)
                if where is None:
                    # Write what is allocated before reclaiming: a reclaim then never runs while
                    # records of this batch are still unwritten in the log, and what is already
                    # allocated is on disk before anything is moved or zeroed.
                    self._flush(keys, plans, results, write)
                    plans = []
                    where = self._allocate(length)
                if where is None:  # full even after reclaiming: the rest of the batch answers False
                    break
                seg, offset = where
                payload = sources[i] if sources is not None else None
                plans.append((i, _Plan(encoded[i], self._take_seq(), payload, seg, offset, payload_len=sizes[i], source=i)))
            self._flush(keys, plans, results, write)
        for i, key in enumerate(keys):
            results[i] = results[first[key]]
        return results

    def _flush(self, keys: list[BlockKey], plans: list[tuple[int, _Plan]], results: list[bool],
               write: WriteRecords | None = None) -> None:
        """Write planned records and publish those that reached the disk (none if the write
        raised: their space is abandoned, never left pending)."""
        try:
            self._write([p for _, p in plans], write)
        finally:
            with self._lock:
                for i, plan in plans:
                    if plan.ok and plan.phash is not None:
                        self._publish(keys[i], plan)
                        results[i] = True
                    else:
                        self._abandon(plan)

    def get_into(self, keys: Sequence[BlockKey], dests: Sequence[Buffer]) -> list[bool]:
        keys = _keys(keys)
        if len(keys) != len(dests):
            raise InvalidArgument(f"dests: expected one destination per key ({len(keys)}), got {len(dests)}")
        targets = [byte_view(dest, writable=True, what=f"dests[{i}]") for i, dest in enumerate(dests)]
        results = [False] * len(keys)
        with self.reading_records(keys, [len(t) for t in targets]) as reading:
            if reading:
                self._engine.run(self._read_requests(keys, targets, reading, results))
        return results

    @contextmanager
    def reading_records(self, keys: Sequence[BlockKey], sizes: Sequence[int],
                        what: str = "dests") -> Iterator[list[tuple[int, StoredRecord]]]:
        """The stored records of ``keys`` as ``(index in the batch, StoredRecord)`` in file order,
        pinned for the ``with`` block: their segments are not zeroed, reused or closed until it
        ends, so a subclass can read them through another I/O path. Missing keys (and every key
        while a background rebuild runs) are left out. A stored block whose size differs from
        ``sizes[i]`` raises InvalidArgument before anything is pinned. A subclass verifies what it
        read against ``record.phash`` and reports a mismatch with ``reject_record``."""
        reading: list[tuple[int, _Record]] = []
        with self._lock:
            self._check_open()
            if self._loaded.is_set():  # still rebuilding: a miss now beats a stall on the load path
                for i, key in enumerate(keys):
                    rec = self._index.get(key)
                    if rec is None:
                        continue
                    if rec.payload_len != sizes[i]:
                        raise InvalidArgument(
                            f"{what}[{i}]: block {key!r} is {rec.payload_len} bytes, the destination is {sizes[i]} bytes"
                        )
                    reading.append((i, rec))
                for _, rec in reading:
                    rec.seg.readers += 1
        reading.sort(key=lambda item: (item[1].seg.id, item[1].offset))
        try:
            yield reading
        finally:
            if reading:
                with self._lock:
                    for _, rec in reading:
                        rec.seg.readers -= 1
                    self._idle.notify_all()

    def reject_record(self, rec: StoredRecord, reason: str) -> None:
        """A record read through another path failed verification: count it in
        ``integrity_failures``, log it with file and offset, and drop it from the index (a miss
        from now on, so the block is computed and saved again)."""
        with self._lock:
            key = BlockKey.decode(rec.key_bytes)
            if self._index.get(key) is rec:
                self._drop(key, rec)
            self._integrity_failure(rec.seg, rec.offset, reason)

    def _read_requests(self, keys: list[BlockKey], targets: list[memoryview], reading: list[tuple[int, _Record]],
                       results: list[bool]) -> Iterator[IORequest]:
        for i, rec in reading:
            def done(buf: memoryview, error: OSError | None, i: int = i, rec: _Record = rec) -> None:
                payload = self._verified(rec, buf, error)
                if payload is not None:
                    targets[i][:] = payload
                    results[i] = True

            yield IORequest(rec.seg.fd, rec.offset, rec.length, False, done)

    def _verified(self, rec: _Record, buf: memoryview, error: OSError | None) -> memoryview | None:
        """The record's payload in ``buf`` if every check passes; otherwise None, and a corrupt
        record is counted, logged and dropped. A record evicted meanwhile is a quiet miss."""
        if error is not None:
            reason = f"read failed: {error}"
        else:
            state, header, reason = parse_header(buf[:PAGE])
            if state == HeaderState.VALID and header is not None:
                if header.dead:
                    return None
                if header.key_bytes != rec.key_bytes or header.seq != rec.seq or header.payload_len != rec.payload_len:
                    reason = f"header names another record (seq {header.seq}, expected {rec.seq})"
                else:
                    payload = buf[PAGE : PAGE + rec.payload_len]
                    if payload_hash(payload) == rec.phash == header.payload_hash:
                        return payload
                    reason = "payload xxhash64 mismatch"
            elif state == HeaderState.EMPTY:
                reason = "header page is all zeros"
        self.reject_record(rec, reason)
        return None

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        keys = _keys(keys)
        with self._lock:
            self._check_open()
            if not self._loaded.is_set():
                return [False] * len(keys)
            return [key in self._index for key in keys]

    def evict(self, keys: Sequence[BlockKey]) -> int:
        keys = _keys(keys)
        with self._write_lock:
            dropped: list[_Record] = []
            with self._lock:
                self._check_open()
                for key in keys:
                    rec = self._index.get(key)
                    if rec is not None:
                        self._drop(key, rec)
                        dropped.append(rec)
            if dropped:
                self._mark_dead(dropped)
        return len(dropped)

    def usage(self) -> TierUsage:
        with self._lock:
            self._check_open()
            if not self._loaded.is_set():
                return TierUsage(self.options.capacity, 0, 0)
            used = sum(seg.live_bytes for seg in self._segments.values())
            return TierUsage(self.options.capacity, used, len(self._index))

    def close(self) -> None:
        """Wait for reads in flight, close the segment files and the engine. The contents stay
        on disk for the next open of the same path. Idempotent."""
        with self._write_lock:
            with self._lock:
                if self._closed:
                    return
                self._closed = True
                while any(seg.readers for seg in self._segments.values()):
                    self._idle.wait()
            self._engine.close()
            self._release_files()
            self._index.clear()

    # -- internals: writing -------------------------------------------------------------------
    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _write(self, plans: list[_Plan], write: WriteRecords | None = None) -> None:
        """Write the records (``write``, or the host path), mark failed ones not ok, and
        fdatasync the touched segments when ``fsync`` is on."""
        if not plans:
            return
        try:
            (write or self._write_host)(plans)
        except BaseException:
            for plan in plans:  # nothing of this run is published; the space is abandoned
                plan.ok = False
            self._seal_after_failure(plans)
            raise
        self._seal_after_failure(plans)
        if self.options.fsync:
            for seg in {id(p.seg): p.seg for p in plans if p.ok}.values():
                try:
                    os.fdatasync(seg.fd)
                except OSError as exc:
                    log.error("ssd tier: fdatasync of %s failed: %s", seg.path, exc)
                    for plan in plans:
                        if plan.seg is seg:
                            plan.ok = False

    def _write_host(self, plans: list[_Plan]) -> None:
        """Stream the records to disk, contiguous runs split into WRITE_PIECE pieces; mark the
        plans of failed pieces not ok."""
        runs: list[list[_Plan]] = []
        for plan in plans:
            last = runs[-1][-1] if runs else None
            if last is not None and last.seg is plan.seg and last.offset + record_bytes(last.payload_len) == plan.offset:
                runs[-1].append(plan)
            else:
                runs.append([plan])
        self._engine.run(self._pieces(runs))

    def _seal_after_failure(self, plans: list[_Plan]) -> None:
        for plan in plans:
            if not plan.ok and plan.seg is self._open:
                # A failed write leaves a hole; nothing may be appended behind it, or a scan
                # (which stops at a hole) would never reach the later records.
                plan.seg.state = _Segment.SEALED
                self._open = None

    def _pieces(self, runs: list[list[_Plan]]) -> Iterator[IORequest]:
        for run in runs:
            start = run[0].offset
            end = run[-1].offset + record_bytes(run[-1].payload_len)
            for piece in range(start, end, WRITE_PIECE):
                length = min(WRITE_PIECE, end - piece)
                covered = [p for p in run if p.offset < piece + length and p.offset + record_bytes(p.payload_len) > piece]

                def fill(buf: memoryview, base: int = piece, covered: list[_Plan] = covered) -> None:
                    _fill(buf, base, covered)

                def done(buf: memoryview, error: OSError | None, covered: list[_Plan] = covered) -> None:
                    if error is not None:
                        log.error("ssd tier: write to %s failed: %s", covered[0].seg.path, error)
                        for plan in covered:
                            plan.ok = False

                yield IORequest(run[0].seg.fd, piece, length, True, done, fill)

    def _publish(self, key: BlockKey, plan: _Plan) -> None:
        """Make a written record visible. Its space was counted as live when it was allocated."""
        assert plan.phash is not None
        self._index[key] = _Record(plan.seg, plan.offset, plan.payload_len, plan.seq, plan.phash, plan.key_bytes)
        plan.seg.pending -= 1

    def _abandon(self, plan: _Plan) -> None:
        """A record whose write failed (or lost a race): its space is dead."""
        plan.seg.pending -= 1
        plan.seg.live -= 1
        plan.seg.live_bytes -= record_bytes(plan.payload_len)

    def _drop(self, key: BlockKey, rec: _Record) -> None:
        del self._index[key]
        rec.seg.live -= 1
        rec.seg.live_bytes -= rec.length

    def _mark_dead(self, records: list[_Record]) -> None:
        """Rewrite each header page with the dead flag, so a later scan skips the record."""
        def request(rec: _Record) -> IORequest:
            def fill(buf: memoryview) -> None:
                pack_header(buf, rec.key_bytes, rec.seq, rec.payload_len, rec.phash, FLAG_DEAD)

            def done(buf: memoryview, error: OSError | None) -> None:
                if error is not None:  # the record comes back after a restart; its bytes are still right
                    log.warning("ssd tier: marking a record dead in %s at %d failed: %s", rec.seg.path, rec.offset, error)

            return IORequest(rec.seg.fd, rec.offset, PAGE, True, done, fill)

        self._engine.run(request(rec) for rec in sorted(records, key=lambda r: (r.seg.id, r.offset)))
        if self.options.fsync:
            for seg in {rec.seg.id: rec.seg for rec in records}.values():
                os.fdatasync(seg.fd)

    # -- internals: space ---------------------------------------------------------------------
    def _allocate(self, length: int, compacting: bool = False, reclaim: bool = True) -> tuple[_Segment, int] | None:
        """Room for one record at the log head, reclaiming space when needed (and allowed); None
        when full. ``compacting`` may take the reserved free segment and never reclaims."""
        while True:
            seg = self._open
            if seg is not None and seg.frontier + length <= self.segment_size:
                offset = seg.frontier
                seg.frontier += length
                with self._lock:
                    seg.live += 1
                    seg.live_bytes += length
                    seg.pending += 1
                return seg, offset
            if seg is not None:
                seg.state = _Segment.SEALED
                self._open = None
            fresh = self._take_segment(keep=0 if compacting else 1)
            if fresh is not None:
                fresh.state = _Segment.OPEN
                fresh.frontier = 0
                self._open = fresh
                continue
            if compacting or not reclaim or not self._reclaim():
                return None

    def _take_segment(self, keep: int) -> _Segment | None:
        """A free segment, leaving ``keep`` free (or creatable) for compaction."""
        free = sorted((s for s in self._segments.values() if s.state == _Segment.FREE), key=lambda s: s.id)
        creatable = 0 if self._disk_full else self.max_segments - len(self._segments)
        if len(free) + creatable <= keep:
            return None
        if free:
            return free[0]
        sid = max(self._segments, default=-1) + 1
        path = self.path / segfiles.segment_name(sid)
        try:
            fd = segfiles.open_direct(path, create=True)
        except OSError as exc:
            log.error("ssd tier: cannot create segment %s: %s", path, exc)
            return None
        try:
            segfiles.allocate(fd, self.segment_size)
            if self.options.fsync:
                segfiles.fsync_dir(self.path)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._disk_full = True  # retried after the next reclaim frees a segment
                log.warning("ssd tier: disk full creating %s (%s); puts answer False until space is freed", path, exc.strerror)
            else:
                log.error("ssd tier: cannot allocate segment %s: %s", path, exc)
            return None
        seg = _Segment(sid, path, fd)
        with self._lock:
            self._segments[sid] = seg
        return seg

    def _reclaim(self) -> bool:
        """Make at least one segment free: reuse an all-dead one, else compact the sealed segment
        with the least live data. False when nothing can be gained (the tier is full)."""
        self._disk_full = False
        sealed = [s for s in self._segments.values() if s.state == _Segment.SEALED and not s.pending]
        empty = [s for s in sealed if s.live == 0]
        if empty:
            for seg in empty:
                self._free_segment(seg)
            return True
        if not sealed:
            return False
        victim = min(sealed, key=lambda s: s.live_bytes)
        if self.segment_size - victim.live_bytes < PAGE:
            return False
        return self._compact(victim)

    def _compact(self, victim: _Segment) -> bool:
        """Rewrite ``victim``'s live records at the log head (new sequence numbers, so the copy
        wins if a crash leaves both), then free it."""
        with self._lock:
            live = sorted(((k, r) for k, r in self._index.items() if r.seg is victim), key=lambda kr: kr[1].offset)
        log.info("ssd tier: compacting %s (%d live records, %s live)", victim.path, len(live), format_size(victim.live_bytes))
        batch: list[tuple[BlockKey, _Record]] = []
        size = 0
        for key, rec in live + [(None, None)]:  # type: ignore[list-item]
            if rec is not None and size + rec.length <= COMPACT_BATCH:
                batch.append((key, rec))
                size += rec.length
                continue
            if batch and not self._move(batch):
                return False
            batch, size = ([(key, rec)], rec.length) if rec is not None else ([], 0)
        self._free_segment(victim)
        return True

    def _move(self, batch: list[tuple[BlockKey, _Record]]) -> bool:
        payloads: dict[int, bytes] = {}

        def reader(rec: _Record) -> IORequest:
            def done(buf: memoryview, error: OSError | None) -> None:
                payload = self._verified(rec, buf, error)
                if payload is not None:
                    payloads[id(rec)] = bytes(payload)

            return IORequest(rec.seg.fd, rec.offset, rec.length, False, done)

        self._engine.run(reader(rec) for _, rec in batch)
        plans: list[tuple[BlockKey, _Record, _Plan]] = []
        for key, rec in batch:
            data = payloads.get(id(rec))
            if data is None:
                continue
            where = self._allocate(rec.length, compacting=True)
            if where is None:
                break
            plans.append((key, rec, _Plan(rec.key_bytes, self._take_seq(), memoryview(data), where[0], where[1], rec.phash)))
        self._write([p for _, _, p in plans])
        with self._lock:
            for key, rec, plan in plans:
                if plan.ok and self._index.get(key) is rec:
                    self._drop(key, rec)
                    self._publish(key, plan)
                else:
                    self._abandon(plan)
        return len(plans) == len(payloads) and all(p.ok for _, _, p in plans)

    def _free_segment(self, seg: _Segment) -> None:
        """Zero a segment whose records are all dead or moved, once no read is using it."""
        with self._lock:
            while seg.readers:
                self._idle.wait()
            for key in [k for k, r in self._index.items() if r.seg is seg]:  # only after a failed move
                self._drop(key, self._index[key])
        if len(self._segments) > self.max_segments:  # capacity was lowered: give the file back
            self._segment_closing(seg.path)
            os.close(seg.fd)
            seg.path.unlink(missing_ok=True)
            with self._lock:
                del self._segments[seg.id]
            return
        segfiles.zero(seg.fd, self.segment_size)
        if self.options.fsync:
            os.fdatasync(seg.fd)
        seg.state = _Segment.FREE
        seg.frontier = 0
        seg.live = seg.live_bytes = 0

    # -- internals: misc ----------------------------------------------------------------------
    def _integrity_failure(self, seg: _Segment, offset: int, reason: str) -> None:
        self.integrity_failures += 1
        log.error("ssd tier: corrupt record in %s at offset %d: %s; treated as a miss", seg.path, offset, reason)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"ssd tier over {self.path} is closed")
        if self._load_error is not None:
            raise ClosedError(f"ssd tier over {self.path} failed to load its index: {self._load_error}")

    def _check_fits(self, nbytes: int, what: str) -> None:
        if nbytes <= 0:
            raise InvalidArgument(f"{what}: expected a block of at least 1 byte, got {nbytes} bytes")
        if record_bytes(nbytes) > self.segment_size:
            raise CapacityError(
                f"{what}: a block of {nbytes} bytes needs a record of {record_bytes(nbytes)} bytes, larger than "
                f"segment_size {self.segment_size} ({format_size(self.segment_size)}); raise segment_size"
            )

    def _segment_closing(self, path: Path) -> None:
        """A segment file is about to be closed and deleted: a subclass drops its own handles to
        it (a new segment may later be created under the same name)."""

    def _release_files(self) -> None:
        for seg in self._segments.values():
            self._segment_closing(seg.path)
            try:
                os.close(seg.fd)
            except OSError:
                pass
        self._segments.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1


def _fill(buf: memoryview, base: int, covered: list[_Plan]) -> None:
    """Write the part [base, base + len(buf)) of a run of records into staging ``buf``: header
    pages, payloads, and zeros for the padding (stale staging bytes must never reach the disk)."""
    end = base + len(buf)
    pos = base
    for plan in covered:
        payload_len = plan.payload_len
        assert plan.payload is not None, "records without a host payload are written by their own path"
        if plan.offset > pos:  # not expected inside a run, but never leave garbage
            buf[pos - base : plan.offset - base] = bytes(plan.offset - pos)
        hdr_end = plan.offset + PAGE
        if plan.offset < end and hdr_end > base:
            if plan.phash is None:
                plan.phash = payload_hash(plan.payload)
            page = bytearray(PAGE)
            pack_header(memoryview(page), plan.key_bytes, plan.seq, payload_len, plan.phash)
            lo, hi = max(plan.offset, base), min(hdr_end, end)
            buf[lo - base : hi - base] = page[lo - plan.offset : hi - plan.offset]
        p_start, p_end = hdr_end, hdr_end + payload_len
        lo, hi = max(p_start, base), min(p_end, end)
        if lo < hi:
            buf[lo - base : hi - base] = plan.payload[lo - p_start : hi - p_start]
        r_end = plan.offset + record_bytes(payload_len)
        lo, hi = max(p_end, base), min(r_end, end)
        if lo < hi:
            buf[lo - base : hi - base] = bytes(hi - lo)
        pos = r_end
    if pos < end:
        buf[max(pos, base) - base :] = bytes(end - max(pos, base))


def _disk_error(exc: OSError, what: str) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CapacityError(f"path: {what}: the file system is full ({exc.strerror}); free space or pick another path")
    return InvalidArgument(f"path: {what}: {exc.strerror or exc}")
