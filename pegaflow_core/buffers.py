"""Byte buffers as they cross pegaflow's interfaces.

Any object with the buffer protocol (bytes, bytearray, memoryview, mmap, numpy arrays, CPU torch
tensors via ``.numpy()``) is accepted. ``byte_view`` is the one way backends turn it into a flat
``memoryview`` of unsigned bytes, so size checks and error messages are the same everywhere.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from .errors import InvalidArgument

Buffer: TypeAlias = Any  # anything supporting the buffer protocol (typing.Buffer needs 3.12)


def byte_view(obj: Buffer, *, writable: bool = False, what: str = "buffer") -> memoryview:
    """A flat ``memoryview`` of ``obj`` in bytes; raises InvalidArgument naming ``what``."""
    try:
        view = obj if isinstance(obj, memoryview) else memoryview(obj)
    except TypeError:
        raise InvalidArgument(f"{what}: expected a buffer (bytes, memoryview, numpy array), got {type(obj).__name__}") from None
    if not view.c_contiguous:
        raise InvalidArgument(f"{what}: buffer must be C-contiguous")
    if writable and view.readonly:
        raise InvalidArgument(f"{what}: buffer is read-only, a writable one is needed")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view
