"""Byte buffers as they cross pegaflow's interfaces.

Any object with the buffer protocol (bytes, bytearray, memoryview, mmap, numpy arrays, CPU torch
tensors via ``.numpy()``) is accepted. ``byte_view`` is the one way backends turn it into a flat
``memoryview`` of unsigned bytes, so size checks and error messages are the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
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


class PoolViews(list):  # type: ignore[type-arg]
    """Views a tier hands out of one pool, each with its first byte's address (0 for a ``None``
    entry), so a copy path that needs raw addresses (the GPU lanes' DMA) reads them here instead
    of through the buffer protocol per view, which costs 1-2.5 us each: milliseconds per
    625-block request.

    The addresses follow every change that keeps the list a ``PoolViews`` (item assignment,
    ``pick``); anything else gives a plain list, whose addresses are then found the slow way."""

    __slots__ = ("addresses",)

    def __init__(self, views: list[memoryview | None], addresses: Any) -> None:
        super().__init__(views)
        if len(addresses) != len(views):
            raise ValueError(f"{len(views)} views but {len(addresses)} addresses")
        self.addresses = addresses

    def pick(self, indices: list[int]) -> PoolViews:
        """The views at ``indices``, with their addresses."""
        return PoolViews([self[i] for i in indices], self.addresses[indices])

    def __setitem__(self, index: Any, view: Any) -> None:
        if not isinstance(index, int):
            raise TypeError("PoolViews: only single items can be replaced")
        from .copier import buffer_addresses  # numpy lives there, off core's import path

        super().__setitem__(index, view)
        self.addresses[index] = 0 if view is None else buffer_addresses([view])[0]

    def _plain(self, *_: Any, **__: Any) -> None:
        raise TypeError("PoolViews keep one address per view: copy into a list to reshape")

    append = extend = insert = pop = remove = sort = reverse = clear = __delitem__ = __iadd__ = _plain  # type: ignore[assignment]


def joined(parts: Sequence[Sequence[memoryview | None]]) -> list[memoryview | None]:
    """The views of ``parts`` in order, as one ``PoolViews`` when every part is one (addresses kept)."""
    views = [v for part in parts for v in part]
    if parts and all(isinstance(part, PoolViews) for part in parts):
        import numpy as np  # numpy stays off core's import path until views are joined

        return PoolViews(views, np.concatenate([part.addresses for part in parts]))
    return views


def put(views: list[memoryview | None], indices: list[int], found: Sequence[memoryview | None]) -> None:
    """``views[indices[j]] = found[j]`` for every j; between two PoolViews the addresses are
    taken from ``found`` (finding them again through the buffer protocol cost ~8 us a view)."""
    if isinstance(views, PoolViews) and isinstance(found, PoolViews):
        for i, view in zip(indices, found):
            list.__setitem__(views, i, view)
        views.addresses[indices] = found.addresses
        return
    for i, view in zip(indices, found):
        views[i] = view


def pick(views: list[memoryview | None], indices: list[int]) -> list[memoryview | None]:
    """``[views[i] for i in indices]``, keeping a PoolViews' addresses."""
    return views.pick(indices) if isinstance(views, PoolViews) else [views[i] for i in indices]
