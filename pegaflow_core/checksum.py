"""Block checksums: what sealing writes and verification compares.

The native routine (built with the copy routine, pfhash2) releases the GIL and, with AVX2, runs at
memory speed (40 GB/s on a 2 MiB block in cache on the CI machine's EPYC, against 12 GB/s for its
first version), so a background sealer keeps up with saves and a remote fetch verifies blocks as
fast as the transport lands them; xxhash through its Python binding holds the GIL and fell behind
under load. Without the compiled library, xxh3-64 is used; the two never mix, because a pool's
journal records which one sealed it (``ALGORITHM``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import numpy as np
import xxhash

from .buffers import Buffer, byte_view
from .copier import native_library

_lib = native_library()


def _bind(name: str) -> Callable[[Buffer], int]:
    routine = getattr(_lib, name)
    routine.restype = ctypes.c_uint64
    routine.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64]

    def run(data: Buffer) -> int:
        array = np.frombuffer(byte_view(data), dtype=np.uint8)  # no copy; works read-only too
        return routine(array.__array_interface__["data"][0] if array.size else None, array.size, 0)

    return run


def _xxh3(data: Buffer) -> int:
    return xxhash.xxh3_64_intdigest(byte_view(data))


if _lib is not None:
    ALGORITHM = b"pfhash2\0"
    checksum = _bind("pegaflow_checksum")
    checksum_portable = _bind("pegaflow_checksum_portable")  # the non-vector path: tests compare the two
else:
    ALGORITHM = b"xxh3-64\0"
    checksum = checksum_portable = _xxh3


def algorithm_name(tag: bytes = ALGORITHM) -> str:
    """An algorithm tag as peers exchange it (``ALGORITHM`` without its padding)."""
    return tag.rstrip(b"\0").decode()


def checksum_for(name: str) -> Callable[[Buffer], int] | None:
    """The checksum function a peer named (its Pin answer), or None if this node cannot compute
    it: a peer with the compiled routines and one without still verify each other's blocks."""
    if name == algorithm_name():
        return checksum
    if name == "xxh3-64":
        return _xxh3
    return None
