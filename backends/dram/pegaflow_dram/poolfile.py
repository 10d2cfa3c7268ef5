"""The pool's memory: one named shared-memory file, mapped once, placed and pre-faulted at start.

File ``<shm_dir>/pegaflow-<name>.pool``::

    [ header page | chunk 0 | chunk 1 | ... ]

The header page (one page, or one huge page so that chunks stay huge-page aligned) holds a magic,
a format version and the geometry, so a later daemon can tell whether a file it finds is a pool it
can re-attach to. Offsets handed out by the allocator are relative to the data region after it.

Every open pool file is held with an exclusive ``flock``: a second daemon pointed at the same name
fails at once instead of sharing (and corrupting) the slabs. Unnamed pools carry the creator's pid
in their name; ``reap_orphans`` removes those whose creator died without unlinking them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import re
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pegaflow_core import ConfigError
from pegaflow_core.sizes import format_size

from . import numa

log = logging.getLogger("pegaflow.dram.pool")

MAGIC = b"PEGAPOOL"
VERSION = 1
PAGE = 4096
# magic, version, header bytes, chunk bytes, chunks, page size, creator pid, created (unix s)
_HEADER = struct.Struct("<8sIIQQQQd")
_MADV_POPULATE_WRITE = 23  # Linux 5.14; not in Python 3.11's mmap module
_HUGETLBFS = "hugetlbfs"
POOL_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_ANON_RE = re.compile(r"^pegaflow-anon-(\d+)-[0-9a-f]+\.pool$")


@dataclass(frozen=True)
class Geometry:
    """What a re-attaching reader must agree on before trusting a pool file."""

    header_bytes: int
    chunk_bytes: int
    chunks: int
    page_size: int

    @property
    def data_bytes(self) -> int:
        return self.chunk_bytes * self.chunks

    @property
    def file_bytes(self) -> int:
        return self.header_bytes + self.data_bytes


def pool_path(shm_dir: str | Path, name: str) -> Path:
    return Path(shm_dir) / f"pegaflow-{name}.pool"


def read_header(data: bytes) -> Geometry | None:
    """The geometry in a header page; None when it is not a pool header of this version."""
    if len(data) < _HEADER.size:
        return None
    magic, version, header_bytes, chunk_bytes, chunks, page_size, _pid, _created = _HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        return None
    return Geometry(header_bytes, chunk_bytes, chunks, page_size)


def _mount_of(path: Path) -> tuple[str, str]:
    """(fstype, options) of the mount holding ``path`` (the longest matching mount point)."""
    target = str(path.resolve())
    best = ("", "", "")
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "", ""
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        point = parts[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
            best = (point, parts[2], parts[3])
    return best[1], best[2]


def filesystem_of(path: Path) -> str:
    """The filesystem type holding ``path`` ('tmpfs', 'hugetlbfs', 'ext4', ...), '' if unknown."""
    return _mount_of(path)[0]


def huge_page_size(shm_dir: Path) -> tuple[int, bool]:
    """(huge page size, whether shm_dir is hugetlbfs) or ConfigError saying how to get huge pages.

    hugetlbfs files are backed by reserved huge pages (MAP_HUGETLB does not apply to files). A
    tmpfs gives transparent huge pages only when mounted with ``huge=``; we madvise for them.
    """
    fstype, options = _mount_of(shm_dir)
    opts = dict(opt.partition("=")[::2] for opt in options.split(","))
    if fstype == _HUGETLBFS:
        size = opts.get("pagesize")
        if size:
            unit = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(size[-1].lower(), 1)
            return int(size.rstrip("kKmMgG")) * unit, True
        return _default_huge_page_size(), True
    if fstype == "tmpfs" and opts.get("huge") in ("always", "within_size", "advise"):
        return _default_huge_page_size(), False
    raise ConfigError(
        f"hugepages: true needs shm_dir on a hugetlbfs mount (e.g. 'mount -t hugetlbfs -o pagesize=2M none "
        f"/dev/hugepages' with vm.nr_hugepages set) or on a tmpfs mounted with huge=within_size; "
        f"{shm_dir} is {fstype or 'an unknown filesystem'}" + (f" ({options})" if options else ""),
        path="hugepages",
    )


def _default_huge_page_size() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Hugepagesize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 << 20


def reap_orphans(shm_dir: str | Path) -> int:
    """Remove unnamed pool files whose creating process is gone and that nobody holds; how many."""
    removed = 0
    for entry in Path(shm_dir).glob("pegaflow-anon-*.pool"):
        match = _ANON_RE.match(entry.name)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # creator alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            fd = os.open(entry, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            entry.unlink(missing_ok=True)
            removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


class PoolFile:
    """One mapped pool file. ``data`` / ``array`` cover the data region (after the header).

    Build with ``PoolFile.open``; ``close`` unmaps it (and unlinks it when it has no given name).
    """

    def __init__(
        self, path: Path, fd: int, mm: mmap.mmap, geometry: Geometry, named: bool, reattached: bool, detail: str
    ) -> None:
        self.path = path
        self.geometry = geometry
        self.named = named
        self.reattached = reattached
        self.detail = detail  # placement summary for logs and availability
        self._fd = fd
        self._mmap = mm
        whole = np.frombuffer(mm, dtype=np.uint8)
        self.array: np.ndarray = whole[geometry.header_bytes :]
        self.address: int = int(self.array.ctypes.data)

    @property
    def data(self) -> memoryview:
        """Writable view of the data region; offsets from the allocator index into it."""
        return memoryview(self.array).cast("B")

    @classmethod
    def open(
        cls,
        shm_dir: str | Path,
        name: str | None,
        chunk_bytes: int,
        chunks: int,
        *,
        hugepages: bool = False,
        populate: bool = True,
        numa_node: int | None = None,
        numa_strict: bool = False,
    ) -> PoolFile:
        directory = Path(shm_dir)
        if not directory.is_dir():
            raise ConfigError(f"expected an existing directory for the pool file, got {str(directory)!r}", path="shm_dir")
        page, on_hugetlbfs = huge_page_size(directory) if hugepages else (PAGE, False)
        if chunk_bytes % page:
            raise ConfigError(f"expected a multiple of the page size {page} bytes, got {chunk_bytes}", path="chunk")
        geometry = Geometry(page, chunk_bytes, chunks, page)
        named = name is not None
        if name is None:
            reap_orphans(directory)
            name = f"anon-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        elif not POOL_NAME_RE.fullmatch(name) or name.startswith("anon-"):
            raise ConfigError(
                f"expected letters, digits, '.', '_' or '-' (and not starting with 'anon-'), got {name!r}",
                path="pool_name",
            )
        path = pool_path(directory, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"pool file {path} is in use by another process; give this daemon another pool_name", path="pool_name") from None
            reattached = cls._check_existing(fd, path, geometry)
            try:
                if not reattached:
                    os.ftruncate(fd, 0)  # drop stale contents of another geometry
                    os.ftruncate(fd, geometry.file_bytes)
                mm = mmap.mmap(fd, geometry.file_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                raise ConfigError(_no_memory_hint(exc, geometry, on_hugetlbfs, directory), path="capacity") from exc
            pool = cls(path, fd, mm, geometry, named, reattached, "")
        except BaseException:
            if not named:
                path.unlink(missing_ok=True)
            os.close(fd)
            raise
        try:
            pool._place(numa_node, numa_strict, hugepages and not on_hugetlbfs, populate)
            pool._write_header()
        except BaseException:
            pool.close()
            raise
        return pool

    @staticmethod
    def _check_existing(fd: int, path: Path, geometry: Geometry) -> bool:
        """True when the file already is a pool of this geometry (re-attach); ConfigError when it is
        something else that we must not clobber."""
        size = os.fstat(fd).st_size
        if size == 0:
            return False
        head = os.pread(fd, _HEADER.size, 0)
        found = read_header(head)
        if found is None:
            if head.startswith(MAGIC) or not any(head):
                log.warning("pool file %s has an unreadable or older header; starting it afresh", path)
                return False
            raise ConfigError(
                f"{path} exists and is not a pegaflow pool (no {MAGIC!r} header); remove it or choose another pool_name",
                path="pool_name",
            )
        if found != geometry or size != geometry.file_bytes:
            log.warning("pool file %s has geometry %s, this config needs %s; starting it afresh", path, found, geometry)
            return False
        return True

    def _place(self, node: int | None, strict: bool, advise_huge: bool, populate: bool) -> None:
        """NUMA-bind, ask for transparent huge pages, then fault every page in, in that order:
        placement only applies to pages faulted after it."""
        notes: list[str] = []
        length = self.geometry.data_bytes
        if node is not None:
            try:
                numa.bind(self.address, length, node)
                notes.append(f"bound to NUMA node {node}")
            except OSError as exc:
                if strict:
                    raise ConfigError(f"could not bind the pool to NUMA node {node}: {exc}", path="numa") from exc
                log.warning("dram pool: %s; continuing without NUMA binding", exc)
        if advise_huge:
            self._mmap.madvise(mmap.MADV_HUGEPAGE, self.geometry.header_bytes, length)
            notes.append("transparent huge pages")
        if populate:
            self._check_room()
            notes.append("pre-faulting in the background")
        self.detail = ", ".join(notes)

    def _check_room(self) -> None:
        """Fail at start, with a clear message, when the file system cannot hold the pool: the
        pages are reserved chunk by chunk in the background, and a tmpfs that runs out would
        otherwise surface as SIGBUS in some later copy."""
        st = os.statvfs(self.path.parent)
        free = st.f_bavail * st.f_frsize + os.fstat(self._fd).st_blocks * 512
        if free < self.geometry.file_bytes:
            raise ConfigError(
                f"{self.path.parent} has {format_size(free)} free for a pool of {format_size(self.geometry.file_bytes)}; "
                "lower capacity or enlarge the file system (e.g. mount -o remount,size=... /dev/shm)",
                path="capacity",
            )

    def populate_chunk(self, index: int) -> None:
        """Reserve and fault in the pages of chunk ``index``. Raises OSError (ENOSPC, ENOMEM)
        when the memory is not there; the tier then keeps serving from the chunks already done."""
        start = self.geometry.header_bytes + index * self.geometry.chunk_bytes
        length = self.geometry.chunk_bytes
        os.posix_fallocate(self._fd, start, length)
        try:
            self._mmap.madvise(_MADV_POPULATE_WRITE, start, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
        # Older kernels: write each page's first byte back to itself, which faults the page in
        # writable without changing what a re-attached pool holds.
        chunk = self.array[index * length : (index + 1) * length]
        touched = chunk[:: self.geometry.page_size]
        touched[:] = touched

    def _write_header(self) -> None:
        g = self.geometry
        header = _HEADER.pack(MAGIC, VERSION, g.header_bytes, g.chunk_bytes, g.chunks, g.page_size, os.getpid(), time.time())
        self._mmap[: len(header)] = header

    def close(self) -> None:
        """Unmap and unlock; unlink when unnamed. Views still held by callers keep the mapping alive
        until they are released (the mmap refuses to close under them), never dangling."""
        if self._mmap is None:
            return
        self.array = np.empty(0, dtype=np.uint8)
        mm, self._mmap = self._mmap, None
        try:
            mm.close()
        except BufferError:
            log.warning("dram pool %s: views of the pool are still held; it is unmapped when they are released", self.path)
        if not self.named:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)


def _no_memory_hint(exc: OSError, geometry: Geometry, hugetlbfs: bool, directory: Path) -> str:
    need = geometry.file_bytes
    if hugetlbfs:
        pages = need // geometry.page_size
        return (
            f"could not map a pool of {need} bytes on hugetlbfs {directory}: {exc}; it needs {pages} free huge pages "
            f"of {geometry.page_size} bytes (see HugePages_Free in /proc/meminfo, raise vm.nr_hugepages)"
        )
    return f"could not create a pool of {need} bytes in {directory}: {exc}; is the filesystem large enough?"
