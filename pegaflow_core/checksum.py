"""Block checksums: what sealing writes and verification compares.

The native routine (built with the copy routine) releases the GIL and runs at memory speed, so a
background sealer keeps up with saves even when the daemon's Python threads are busy; measured on
the CI machine, xxhash through its Python binding holds the GIL and fell behind under load. Without
the compiled library, xxh3-64 is used; the two never mix, because a pool's journal records which
one sealed it (``ALGORITHM``).
"""

from __future__ import annotations

import ctypes

import numpy as np
import xxhash

from .buffers import Buffer, byte_view
from .copier import native_library

_lib = native_library()
if _lib is not None:
    _native = _lib.pegaflow_checksum
    _native.restype = ctypes.c_uint64
    _native.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64]
    ALGORITHM = b"pfhash64"

    def checksum(data: Buffer) -> int:
        array = np.frombuffer(byte_view(data), dtype=np.uint8)  # no copy; works read-only too
        return _native(array.__array_interface__["data"][0] if array.size else None, array.size, 0)
else:
    ALGORITHM = b"xxh3-64\0"

    def checksum(data: Buffer) -> int:
        return xxhash.xxh3_64_intdigest(byte_view(data))
