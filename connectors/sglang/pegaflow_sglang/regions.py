"""Registered regions for a set of tensors: one per distinct allocation, so tensors carved out
of one CUDA allocation (torch's caching allocator packs many) are opened once by the daemon."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pegaflow_core.client import RegionSpec
from pegaflow_core.layout import Plane
from pegaflow_core.regions import region_for_storage


def _identity(spec: RegionSpec) -> tuple[object, ...]:
    if spec.kind == "cuda_ipc":
        return ("cuda_ipc", spec.handle)
    if spec.kind == "shm":
        return ("shm", spec.path)
    return ("cma", spec.pid, spec.address)


def regions_for(tensors: Sequence[Any], planes: Sequence[Plane], memory: str) -> tuple[tuple[RegionSpec, ...], tuple[Plane, ...]]:
    """Regions covering ``tensors`` and ``planes`` (whose ``region`` indexes ``tensors`` and whose
    offsets are relative to each tensor's storage) re-pointed at those regions."""
    specs: list[RegionSpec] = []
    index_of: dict[tuple[object, ...], int] = {}
    placed: list[tuple[int, int]] = []  # per tensor: (region index, storage offset inside it)
    for tensor in tensors:
        region = region_for_storage(tensor, memory)
        ident = _identity(region.spec)
        if ident not in index_of:
            index_of[ident] = len(specs)
            specs.append(region.spec)
        elif specs[index_of[ident]].nbytes < region.spec.nbytes:
            specs[index_of[ident]] = region.spec
        placed.append((index_of[ident], region.base_offset))
    moved = tuple(
        Plane(p.layer, placed[p.region][0], p.offset + placed[p.region][1], p.block_stride, p.block_bytes) for p in planes
    )
    return tuple(specs), moved
