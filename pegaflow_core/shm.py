"""Named shared-memory regions: how CPU engines hand their KV cache to the daemon.

The engine creates a file under /dev/shm and uses it as its KV cache; the daemon maps the same file
and copies blocks in and out of it. The file name carries the creator's pid so the daemon can
remove files whose creator died without unlinking them (``reap_orphans``).
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import uuid
from pathlib import Path

import numpy as np

from .errors import InvalidArgument

log = logging.getLogger("pegaflow.shm")

SHM_DIR = Path("/dev/shm")
_PREFIX = "pegaflow-kv-"
_NAME_RE = re.compile(rf"^{_PREFIX}(\d+)-[0-9a-f]+$")


class SharedRegion:
    """A mapped shared-memory file. ``array`` is a writable uint8 numpy view of all of it."""

    def __init__(self, path: Path, mm: mmap.mmap, owner: bool) -> None:
        self.path = path
        self._mmap = mm
        self.owner = owner
        self.array = np.frombuffer(mm, dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return len(self._mmap)

    @classmethod
    def create(cls, nbytes: int, directory: Path = SHM_DIR) -> SharedRegion:
        """A new zero-filled region owned by this process (unlinked by ``close``)."""
        if nbytes <= 0:
            raise InvalidArgument(f"shared region size must be > 0, got {nbytes}")
        path = directory / f"{_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(path, mm, owner=True)

    @classmethod
    def attach(cls, path: str | Path, nbytes: int) -> SharedRegion:
        """Map a region another process created; it must exist and be exactly ``nbytes`` long."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise InvalidArgument(f"shared region {path} does not exist") from None
        except PermissionError:
            raise InvalidArgument(f"shared region {path} is not readable and writable by the daemon (uid {os.getuid()})") from None
        try:
            size = os.fstat(fd).st_size
            if size != nbytes:
                raise InvalidArgument(f"shared region {path} has {size} bytes, the registration says {nbytes}")
            mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(path, mm, owner=False)

    def close(self) -> None:
        """Unmap; the creator also unlinks the file. Views still held elsewhere keep it alive."""
        self.array = np.empty(0, dtype=np.uint8)
        try:
            self._mmap.close()
        except BufferError:
            log.debug("region %s still has exported views; unmapped at their release", self.path)
        if self.owner:
            self.path.unlink(missing_ok=True)


def reap_orphans(directory: Path = SHM_DIR) -> int:
    """Remove KV region files whose creating process no longer exists; return how many."""
    removed = 0
    for entry in directory.glob(f"{_PREFIX}*"):
        match = _NAME_RE.match(entry.name)
        if not match:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            entry.unlink(missing_ok=True)
            removed += 1
        except PermissionError:
            pass
    return removed
