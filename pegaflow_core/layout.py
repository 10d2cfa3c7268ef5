"""KV cache layouts as the daemon sees them: planes of strided, contiguous per-block pieces.

Engines lay KV out in many ways (vLLM's ``(2, num_blocks, block_size, H, D)`` or a strided view
per layer, MLA latent caches, SGLang's layer_first / page_first host pools, cross-layer caches).
All of them reduce to *planes*: for block ``b`` a plane holds ``block_bytes`` contiguous bytes at
``offset + b * block_stride`` in one registered region. A block's stored form is its planes
concatenated, so two engines share blocks exactly when their namespaces (which fingerprint the
layout) are equal.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgument


@dataclass(frozen=True)
class Plane:
    layer: int
    region: int
    offset: int
    block_stride: int
    block_bytes: int


@dataclass(frozen=True)
class KVLayout:
    num_blocks: int
    num_layers: int
    planes: tuple[Plane, ...]

    @property
    def block_bytes(self) -> int:
        """Size of one stored block: every plane's piece of it."""
        return sum(p.block_bytes for p in self.planes)

    def plane_offsets(self) -> list[int]:
        """Where each plane's piece starts inside a stored block."""
        offsets, at = [], 0
        for plane in self.planes:
            offsets.append(at)
            at += plane.block_bytes
        return offsets

    def layer_groups(self) -> list[list[int]]:
        """Plane indices per layer, in layer order (the unit of layer-wise completion)."""
        layers: dict[int, list[int]] = {}
        for i, plane in enumerate(self.planes):
            layers.setdefault(plane.layer, []).append(i)
        return [layers[layer] for layer in sorted(layers)]

    def validate(self, region_sizes: Sequence[int]) -> None:
        """Raise InvalidArgument unless every block of every plane lies inside its region."""
        if self.num_blocks <= 0:
            raise InvalidArgument(f"num_blocks must be > 0, got {self.num_blocks}")
        if not self.planes:
            raise InvalidArgument("a KV layout needs at least one plane")
        for i, p in enumerate(self.planes):
            where = f"planes[{i}]"
            if not 0 <= p.region < len(region_sizes):
                raise InvalidArgument(f"{where}.region: {p.region} is not one of the {len(region_sizes)} registered regions")
            if p.block_bytes <= 0:
                raise InvalidArgument(f"{where}.block_bytes must be > 0, got {p.block_bytes}")
            if p.block_stride < p.block_bytes and self.num_blocks > 1:
                raise InvalidArgument(f"{where}.block_stride {p.block_stride} is smaller than block_bytes {p.block_bytes}: blocks would overlap")
            end = p.offset + (self.num_blocks - 1) * p.block_stride + p.block_bytes
            if end > region_sizes[p.region]:
                raise InvalidArgument(
                    f"{where}: block {self.num_blocks - 1} ends at byte {end}, past the end of region "
                    f"{p.region} ({region_sizes[p.region]} bytes)"
                )

    def check_block_ids(self, block_ids: Sequence[int] | np.ndarray) -> None:
        if isinstance(block_ids, np.ndarray):  # one vectorised pass; the loop only to name the culprit
            if not block_ids.size or (block_ids.min() >= 0 and block_ids.max() < self.num_blocks):
                return
            block_ids = block_ids.tolist()
        for i, b in enumerate(block_ids):
            if not 0 <= b < self.num_blocks:
                raise InvalidArgument(f"block_ids[{i}] = {b} is out of range [0, {self.num_blocks})")


def namespace_for(model: str, **layout: object) -> str:
    """A namespace string: the model name plus a short digest of everything that shapes the bytes
    (dtype, block size, heads, head size, layout kind, TP size where it splits heads...). Engines
    whose KV bytes differ must never share a namespace; equal ones should."""
    digest = hashlib.sha256(json.dumps(layout, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{model}@{digest}"
