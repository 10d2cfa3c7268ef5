"""SGLang's KV memory as pegaflow planes, derived from tensors' shapes and strides only.

One SGLang page is one pegaflow block. Its stored form is SGLang's *flat page*: the bytes
``host_pool.get_data_page(i, flat=True)`` returns, in that order. For each layout the flat page
is a few strided runs of the pool's buffer (page_first: all of K, then all of V; layer_first: one
run per layer of K, then per layer of V; MLA: one run, or one per layer): those runs are the
planes, in flat order, so the daemon copies straight between the pool and its tiers and the
stored bytes equal what SGLang itself would write to a file. The key-based calls of older
releases hand over flat pages, which then need no reordering at all.

Nothing here imports SGLang: the GPU test drives the same code with SGLang-shaped torch tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pegaflow_core.layout import Plane

from .naming import PAGE_ORDER, PageFormat


@dataclass(frozen=True)
class Run:
    """One contiguous piece of a page: ``nbytes`` at ``offset`` from the storage's first byte."""

    offset: int
    nbytes: int


def dense_runs(view: Any) -> list[Run]:
    """The contiguous byte runs of ``view`` in flattening (C) order, offsets relative to its
    storage. Dims of size 1 are ignored; the innermost dims that are dense together form one run
    and every index of the outer dims starts another."""
    itemsize = view.element_size()
    dims = [(size, stride * itemsize) for size, stride in zip(view.shape, view.stride()) if size > 1]
    run = itemsize
    inner = 0
    for size, stride in reversed(dims):
        if stride != run:
            break
        run *= size
        inner += 1
    outer = dims[: len(dims) - inner]
    base = (view.data_ptr() - view.untyped_storage().data_ptr())
    return [
        Run(base + sum(i * stride for i, (_, stride) in zip(index, outer)), run)
        for index in itertools.product(*(range(size) for size, _ in outer))
    ]


@dataclass(frozen=True)
class PageLayout:
    """A pool's pages as planes over one registered storage (offsets relative to its start)."""

    planes: tuple[Plane, ...]
    num_pages: int
    tokens_per_page: int  # SGLang index units per page (the logical page size)
    format: PageFormat

    @property
    def page_bytes(self) -> int:
        return sum(p.block_bytes for p in self.planes)

    def shifted(self, region: int, base_offset: int) -> tuple[Plane, ...]:
        """The planes against a registered region whose storage starts ``base_offset`` in."""
        return tuple(Plane(p.layer, region, p.offset + base_offset, p.block_stride, p.block_bytes) for p in self.planes)


def host_page_layout(pool: Any, mla: bool) -> PageLayout:
    """Planes of a SGLang host pool (HostKVCache: layer_first, page_first, page_first_direct;
    MHA or MLA), from the pool's own ``get_data_page`` views. Raises ValueError, saying why, for
    anything the daemon could not address as fixed-stride blocks."""
    layout = getattr(pool, "layout", None)
    if layout not in PAGE_ORDER:
        raise ValueError(
            f"pegaflow stores SGLang host pools laid out as {sorted(PAGE_ORDER)}; this pool is {layout!r} "
            "(set --hicache-mem-layout page_first, page_first_direct or layer_first)"
        )
    if getattr(pool, "kv_buffer", None) is None:
        raise ValueError(f"{type(pool).__name__} has no host buffer (an allocator-only pool): nothing to register")
    page = int(getattr(pool, "logical_page_size", pool.page_size))
    num_pages = int(getattr(pool, "logical_size", pool.size)) // page
    first = pool.get_data_page(0, flat=False)
    runs = dense_runs(first)
    page_bytes = first.numel() * first.element_size()
    if sum(r.nbytes for r in runs) != page_bytes:
        raise ValueError(f"{type(pool).__name__} ({layout}): page runs cover {sum(r.nbytes for r in runs)} of {page_bytes} bytes")
    stride = 0
    if num_pages > 1:
        stride = pool.get_data_page(page, flat=False).data_ptr() - first.data_ptr()
        last = pool.get_data_page((num_pages - 1) * page, flat=False).data_ptr()
        if stride <= 0 or last != first.data_ptr() + (num_pages - 1) * stride:
            raise ValueError(f"{type(pool).__name__} ({layout}): pages are not a fixed stride apart; cannot register it")
    planes = tuple(Plane(0, 0, r.offset, stride or r.nbytes, r.nbytes) for r in runs)
    fmt = PageFormat(order=PAGE_ORDER[layout], dtype=str(first.dtype), page_size=int(pool.page_size),
                     num_layers=int(pool.layer_num), page_bytes=page_bytes, mla=mla)
    return PageLayout(planes, num_pages, page, fmt)


def flat_staging_layout(fmt: PageFormat, num_pages: int) -> PageLayout:
    """A bounce buffer of whole flat pages back to back: one plane, same stored form."""
    return PageLayout((Plane(0, 0, 0, fmt.page_bytes, fmt.page_bytes),), num_pages, 1, fmt)


def device_page_layout(k_buffers: Sequence[Any], v_buffers: Sequence[Any] | None, page_size: int, mla: bool) -> tuple[list[Any], list[Plane], PageFormat]:
    """Planes of SGLang's GPU KV pool (per-layer tensors ``[slots, heads, dim]``; MLA: one
    ``[slots, 1, kv_dim]`` per layer), in the layer-major flat order: K of every layer, then V of
    every layer, so a GPU page is stored exactly like a layer_first / page_first_direct host page
    and the two routes share blocks. Plane ``layer`` is the model layer, so loads complete layer
    by layer. Returns the tensors in plane order (one region each, the caller merges regions),
    the planes relative to each tensor's storage (``region`` = index into the tensors), and the
    page format."""
    tensors = list(k_buffers) + ([] if mla or v_buffers is None else list(v_buffers))
    if not tensors:
        raise ValueError("the SGLang KV pool has no layer buffers")
    layers = len(k_buffers)
    planes: list[Plane] = []
    for i, tensor in enumerate(tensors):
        if not tensor.is_contiguous():
            raise ValueError(
                f"KV buffer {i} (shape {tuple(tensor.shape)}, strides {tensor.stride()}) is not contiguous: "
                "pegaflow needs token-major per-layer KV buffers (SGLang's default NHD layout)"
            )
        token_bytes = tensor[0].numel() * tensor.element_size()
        offset = tensor.data_ptr() - tensor.untyped_storage().data_ptr()
        planes.append(Plane(i % layers, i, offset, page_size * token_bytes, page_size * token_bytes))
    dtypes = {str(t.dtype) for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"KV buffers of one pool have different dtypes: {sorted(dtypes)}")
    fmt = PageFormat(order="layer-major", dtype=dtypes.pop(), page_size=page_size, num_layers=layers,
                     page_bytes=sum(p.block_bytes for p in planes), mla=mla)
    return tensors, planes, fmt
