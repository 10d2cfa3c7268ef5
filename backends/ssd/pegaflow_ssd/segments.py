"""Segment files: fixed-size log files opened with O_DIRECT, created, zeroed for reuse, and
scanned (record headers only) to rebuild the tier's index at open.

Why zero a segment before reuse: a scan walks a segment's records from offset 0 and stops at the
first all-zero page, so whatever the previous life of the segment left behind must not look like
the continuation of the new log. ``FALLOC_FL_ZERO_RANGE`` does that as a metadata operation on
ext4/xfs; elsewhere the file is truncated and allocated again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .engine import Engine, IORequest
from .format import MAGIC, PAGE, HeaderState, RecordHeader, parse_header

log = logging.getLogger("pegaflow.ssd")

SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".dat"
RESYNC_CHUNK = 4 << 20
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def segment_name(seg_id: int) -> str:
    return f"{SEGMENT_PREFIX}{seg_id:06d}{SEGMENT_SUFFIX}"


def segment_id(name: str) -> int | None:
    if name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX):
        digits = name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)]
        if digits.isdigit():
            return int(digits)
    return None


def open_direct(path: Path, create: bool = False) -> int:
    flags = os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
    return os.open(path, flags, 0o644)


def allocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes of disk for the file (reads as zeros). Raises OSError(ENOSPC)."""
    os.posix_fallocate(fd, 0, size)


def zero(fd: int, size: int) -> None:
    """Make the whole segment read as zeros again, cheaply where the file system allows."""
    if _libc.fallocate(fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, 0, size) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, f"fallocate(ZERO_RANGE): {os.strerror(err)}")
    os.ftruncate(fd, 0)
    allocate(fd, size)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ScannedRecord:
    offset: int
    header: RecordHeader


@dataclass
class SegmentScan:
    """What a scan found in one segment: valid records in log order, where the log ends, and the
    corrupt spots (offset, reason) it skipped."""

    records: list[ScannedRecord]
    end: int
    corrupt: list[tuple[int, str]]


def scan_segments(engine: Engine, segments: dict[int, tuple[int, Path]], segment_size: int,
                  window: int = 256) -> dict[int, SegmentScan]:
    """Walk every segment's record chain, reading one header page per record and never a payload.

    A record's header gives the next record's offset, so each segment is a chain. Two things keep
    the queue full anyway: the chains of all segments advance together, and each chain reads ahead
    speculatively at the stride of its last record (KV blocks of one model all have one size), up to
    ``window`` pages per round across all chains. A page read ahead is used only if the chain really
    arrives at its offset, so a wrong guess costs a read, never a wrong record. A corrupt page (torn
    write, bit rot) is reported and the rest of that segment is searched in large reads for the
    next valid header (:func:`_resync`).
    """
    result = {sid: SegmentScan([], 0, []) for sid in segments}
    cursors = {sid: 0 for sid in segments}
    strides = {sid: 0 for sid in segments}
    while cursors:
        ahead = max(1, window // len(cursors))
        pages: dict[tuple[int, int], bytes | OSError] = {}

        def keep(sid: int, off: int) -> Callable[[memoryview, OSError | None], None]:
            def done(buf: memoryview, error: OSError | None) -> None:
                pages[sid, off] = error if error is not None else bytes(buf)

            return done

        wanted = [
            (sid, off)
            for sid, start in cursors.items()
            for off in ([start + k * strides[sid] for k in range(ahead)] if strides[sid] else [start])
            if off + PAGE <= segment_size
        ]
        engine.run(IORequest(segments[sid][0], off, PAGE, False, keep(sid, off)) for sid, off in wanted)
        for sid in list(cursors):
            off = cursors[sid]
            scan = result[sid]
            while (sid, off) in pages and off < segment_size:
                page = pages[sid, off]
                if isinstance(page, OSError):
                    state, header, reason = HeaderState.CORRUPT, None, f"read failed: {page}"
                else:
                    state, header, reason = parse_header(page)
                if state == HeaderState.VALID and header is not None and off + header.record_len > segment_size:
                    state, reason = HeaderState.CORRUPT, f"record of {header.record_len} bytes runs past the segment end"
                if state == HeaderState.VALID and header is not None:
                    scan.records.append(ScannedRecord(off, header))
                    strides[sid] = header.record_len
                    off += header.record_len
                    scan.end = off
                elif state == HeaderState.EMPTY:
                    scan.end = off
                    off = segment_size
                else:
                    scan.corrupt.append((off, reason))
                    found = _resync(engine, segments[sid][0], off + PAGE, segment_size)
                    off = found if found is not None else segment_size
                    scan.end = off
                    strides[sid] = 0
                    break
            if off >= segment_size:
                del cursors[sid]
            else:
                cursors[sid] = off
    return result


def _resync(engine: Engine, fd: int, start: int, segment_size: int) -> int | None:
    """Offset of the next valid header page at or after ``start``, or None. Reads the rest of the
    segment in large chunks and checks only pages that begin with the record magic."""
    magic = np.frombuffer(MAGIC, dtype=np.uint8)
    found: list[int] = []
    off = start
    while off < segment_size and not found:
        length = min(RESYNC_CHUNK, segment_size - off)

        def done(buf: memoryview, error: OSError | None, base: int = off) -> None:
            if error is not None:
                return
            pages = np.frombuffer(buf, dtype=np.uint8).reshape(-1, PAGE)
            for i in np.flatnonzero((pages[:, : len(MAGIC)] == magic).all(axis=1)):
                state, _, _ = parse_header(buf[i * PAGE : (i + 1) * PAGE])
                if state == HeaderState.VALID:
                    found.append(base + int(i) * PAGE)
                    return

        engine.run([IORequest(fd, off, length, False, done)])
        off += length
    return found[0] if found else None


_URING_PROBE = """
import liburing
ring = liburing.io_uring()
rc = liburing.io_uring_queue_init(4, ring, 0)
if rc < 0:
    raise SystemExit(f"io_uring_queue_init failed: errno {-rc}")
liburing.io_uring_queue_exit(ring)
print(getattr(liburing, "__version__", "?"))
"""

_probe_cache: tuple[bool, str] | None = None


def probe_uring() -> tuple[bool, str]:
    """Whether liburing imports and sets up a ring here, checked once in a child process: a wheel
    built for a newer CPU dies with SIGILL, which must not take the daemon down with it."""
    global _probe_cache
    if _probe_cache is None:
        try:
            done = subprocess.run([sys.executable, "-c", _URING_PROBE], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            _probe_cache = (False, f"io_uring probe could not run: {exc}")
        else:
            if done.returncode == 0:
                _probe_cache = (True, f"liburing {done.stdout.strip()}")
            elif done.returncode < 0:
                _probe_cache = (False, f"liburing crashed a probe process with signal {-done.returncode} "
                                       "(SIGILL: a wheel built for a newer CPU; pip install 'liburing==2024.5.3')")
            else:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                _probe_cache = (False, f"liburing unusable: {last}")
    return _probe_cache
