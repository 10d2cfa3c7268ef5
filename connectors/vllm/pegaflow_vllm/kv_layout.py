"""vLLM's KV cache as pegaflow sees it: which group is transferred, the block namespace, and the
planes (strided, contiguous per-block pieces) of the worker's KV tensors.

Two processes must agree on the namespace without talking to each other: the scheduler (which
has no KV tensors, only ``kv_cache_config``) queries the daemon, the workers save and load. Both
derive it from the config with ``CacheLayout.from_config``; the worker then reads the real shapes
and strides of its tensors (``planes_of_tensor``), and refuses to register if the bytes it would
store differ from what the config promised.

The stored form of a block is its planes concatenated: for every layer (model order) the
layer's page, in the tensor's physical order. Layouts whose pages hold the same bytes in the same
order (LBNHC and BLNHC, say) therefore share blocks; the page order is part of the namespace.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pegaflow_core.layout import Plane, namespace_for

# Logical dims of vLLM's per-layer view [B, H, N, C] (blocks, head slots, tokens, content).
_VIEW_DIMS = "BHNC"


@dataclass(frozen=True)
class CacheLayout:
    """What the config says about the transferred KV cache group (identical on every process)."""

    group_id: int
    layer_names: tuple[str, ...]  # layers with their own storage, in model order
    block_size: int
    num_heads: int  # head slots per rank (1 for MLA)
    head_size: int
    head_size_v: int
    dtype: str
    cache_dtype: str
    page_bytes: int  # content bytes of one layer's page of one block (padding excluded)
    page_order: str  # e.g. "NHC": physical order of the page's dims that have size > 1
    is_mla: bool
    tp_shards: int  # distinct KV shards across TP (1 for MLA or fully replicated heads)
    tp_replicas: int  # consecutive TP ranks holding identical KV
    pp_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def block_bytes(self) -> int:
        return self.num_layers * self.page_bytes

    def shard_of(self, tp_rank: int) -> int:
        """Key shard of a TP rank: MLA caches are identical on every rank, so all use shard 0."""
        return 0 if self.is_mla else tp_rank // self.tp_replicas

    def namespace(self, model: str, pp_rank: int = 0) -> str:
        """Model + every property that shapes the stored bytes + the TP split. Pipeline stages hold
        different layers, so each stage has its own namespace."""
        return namespace_for(
            model, layout="vllm-pages", page_order=self.page_order, mla=self.is_mla, block_size=self.block_size,
            num_heads=self.num_heads, head_size=self.head_size, head_size_v=self.head_size_v, dtype=self.dtype,
            cache_dtype=self.cache_dtype, num_layers=self.num_layers, page_bytes=self.page_bytes,
            tp_shards=self.tp_shards, pp=f"{pp_rank}/{self.pp_size}",
        )

    @classmethod
    def from_config(cls, vllm_config: Any, kv_cache_config: Any) -> CacheLayout:
        """Read the one prefix-cacheable attention group. Models with several (hybrid attention
        with the hybrid allocator on) are refused with a clear error: their groups share block ids
        in ways a prefix-hash store cannot describe."""
        from vllm.v1.kv_cache_interface import AttentionSpec, MLAAttentionSpec

        groups = [(i, g) for i, g in enumerate(kv_cache_config.kv_cache_groups)
                  if getattr(g, "enable_kv_transfer", True) and getattr(g.kv_cache_spec, "prefix_cacheable", True)]
        if len(groups) != 1:
            kinds = [type(g.kv_cache_spec).__name__ for _, g in groups]
            raise ValueError(
                f"PegaflowConnector supports models with exactly one prefix-cacheable KV cache group; this "
                f"one has {len(groups)} ({kinds}). Run vLLM with --disable-hybrid-kv-cache-manager."
            )
        group_id, group = groups[0]
        spec = _single_spec(group.kv_cache_spec)
        if not isinstance(spec, AttentionSpec):
            raise ValueError(f"PegaflowConnector stores attention KV caches; got {type(spec).__name__}")
        layout_name = kv_cache_config.kv_cache_layout or vllm_config.cache_config.kv_cache_layout or "LBNHC"
        num_heads = spec.num_heads
        content = spec.state_content_size_bytes
        tokens = spec.num_states
        page_bytes = getattr(spec, "unpadded_page_size_bytes", None) or num_heads * tokens * content
        sizes = {"H": num_heads, "N": tokens, "C": content}
        order = "".join(d for d in _physical_view_order(layout_name) if d != "B" and sizes[d] > 1)
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        replicas = max(1, int(getattr(kv_cache_config, "kv_tp_replicas", 1) or 1))
        is_mla = isinstance(spec, MLAAttentionSpec)
        own = _layers_with_storage(group.layer_names, kv_cache_config.kv_cache_tensors)
        return cls(
            group_id=group_id, layer_names=tuple(sorted_layers(own)), block_size=spec.block_size,
            num_heads=num_heads, head_size=spec.head_size, head_size_v=spec.head_size_v, dtype=str(spec.dtype),
            cache_dtype=str(vllm_config.cache_config.cache_dtype), page_bytes=page_bytes, page_order=order,
            is_mla=is_mla, tp_shards=1 if is_mla else max(1, tp_size // replicas),
            tp_replicas=tp_size if is_mla else replicas, pp_size=vllm_config.parallel_config.pipeline_parallel_size,
        )


def _single_spec(spec: Any) -> Any:
    """UniformTypeKVCacheSpecs wraps per-layer specs; the connector needs them all equal."""
    inner = getattr(spec, "kv_cache_specs", None)
    if inner is None:
        return spec
    distinct = set(inner.values())
    if len(distinct) != 1:
        raise ValueError(f"PegaflowConnector needs one KV cache spec for all layers of a group, got {len(distinct)}")
    return distinct.pop()


def _layers_with_storage(layer_names: Sequence[str], kv_cache_tensors: Sequence[Any]) -> list[str]:
    """Layers that own memory (KV-sharing layers reuse another layer's cache and store nothing)."""
    owners = {name for t in kv_cache_tensors for name in t.layers}
    if not owners:  # a config built by hand (tests, tools) lists no tensors: every layer owns its cache
        return list(layer_names)
    return [name for name in layer_names if name in owners]


def _physical_view_order(layout_name: str) -> str:
    """Dims of the per-layer [B, H, N, C] view in memory order, from a KVCacheLayout name."""
    from vllm.v1.kv_cache_layout import KVCacheLayout

    aliases = {"NHD": "LBNHC", "HND": "LBHNC"}
    layout = KVCacheLayout[aliases.get(layout_name, layout_name)]
    return "".join(_VIEW_DIMS[i] for i in layout.layer_view_order)


def sorted_layers(names: Sequence[str]) -> list[str]:
    """Model order: by the first number in the name (``model.layers.7.self_attn.attn`` -> 7)."""
    def key(name: str) -> tuple[int, str]:
        match = re.search(r"\d+", name)
        return (int(match.group()) if match else 1 << 30, name)

    return sorted(names, key=key)


# -- tensors -> planes (worker side) ----------------------------------------------------------------
@dataclass(frozen=True)
class TensorPlanes:
    """The planes of one layer tensor relative to its storage's first byte."""

    planes: tuple[Plane, ...]
    page_order: str  # same meaning as CacheLayout.page_order
    page_bytes: int


def planes_of_tensor(tensor: Any, num_blocks: int, layer: int, storage_base: int) -> TensorPlanes:
    """Describe one layer's KV tensor as planes, from its shape and strides only.

    The block dim is dim 0 (vLLM >= 0.29: ``[num_blocks, H, N, C]``, any KVCacheLayout) or dim 1
    of a legacy ``(2, num_blocks, ...)`` tensor. The dims of a block's page are split into an
    inner dense run (one plane) and outer dims enumerated into several planes: a block-contiguous
    page is one plane per layer, K and V of a legacy layout are two, a head-outer layout (LHBNC)
    is one per head.
    """
    shape, itemsize = tuple(tensor.shape), tensor.element_size()
    strides = tuple(s * itemsize for s in tensor.stride())
    if shape[0] == num_blocks:
        block_dim, names = 0, _VIEW_DIMS if len(shape) == 4 else "B" + "".join(f"d{i}" for i in range(1, len(shape)))
    elif len(shape) >= 3 and shape[0] == 2 and shape[1] == num_blocks:
        block_dim, names = 1, ["KV", "B", *("NHC" if len(shape) == 5 else [f"d{i}" for i in range(2, len(shape))])]
    else:
        raise ValueError(
            f"KV tensor of layer {layer} has shape {shape}: expected num_blocks={num_blocks} in dim 0 "
            "([num_blocks, heads, block_size, head_size(+v)]) or dim 1 ((2, num_blocks, ...))"
        )
    dims = [(names[i], shape[i], strides[i]) for i in range(len(shape)) if i != block_dim and shape[i] > 1]
    dims.sort(key=lambda d: d[2], reverse=True)  # physical order, outermost first
    inner: list[tuple[str, int, int]] = []
    run = itemsize
    for name, size, stride in reversed(dims):  # grow the dense run from the innermost dim out
        if stride != run:
            break
        inner.insert(0, (name, size, stride))
        run *= size
    outer = dims[: len(dims) - len(inner)]
    if not inner and dims:
        raise ValueError(f"KV tensor of layer {layer} (shape {shape}, strides {tensor.stride()}) has no dense innermost dim")
    base = tensor.data_ptr() - storage_base
    block_stride = strides[block_dim]
    planes = tuple(
        Plane(layer=layer, region=0, offset=base + sum(i * d[2] for i, d in zip(index, outer)),
              block_stride=block_stride, block_bytes=run)
        for index in itertools.product(*(range(d[1]) for d in outer))
    )
    page_bytes = run * len(planes)
    # "KV" (legacy) leads the order like any outer dim; C is counted in elements here but the
    # config side counts bytes, so compare by name only.
    order = "".join(d[0] for d in dims if d[0] in ("KV", "H", "N", "C") or d[0].startswith("d"))
    return TensorPlanes(planes, order, page_bytes)


def merge_cross_layer(planes: Sequence[Plane]) -> tuple[Plane, ...]:
    """Fold consecutive planes into one when layer l+1's piece of every block starts right where
    layer l's ends (block-outermost, "cross-layer" layouts such as BLNHC): one contiguous run per
    block instead of one per layer. The stored bytes are the same; the daemon then reports the
    merged run as one layer group, so only apply it when layer-wise loading is not wanted."""
    merged: list[Plane] = []
    for plane in planes:
        last = merged[-1] if merged else None
        if (last is not None and last.region == plane.region and last.block_stride == plane.block_stride
                and plane.offset == last.offset + last.block_bytes):
            merged[-1] = Plane(last.layer, last.region, last.offset, last.block_stride, last.block_bytes + plane.block_bytes)
        else:
            merged.append(plane)
    return tuple(merged)


def layer_tensors(kv_caches: Mapping[str, Any], layout: CacheLayout) -> list[tuple[str, Any]]:
    """The transferred layers' tensors in model order, one per distinct memory (a layer that
    reuses another's cache shares its tensor and is not stored twice)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = []
    for name in sorted_layers([n for n in kv_caches if n in set(layout.layer_names)] or list(kv_caches)):
        tensor = kv_caches[name]
        ident = (tensor.data_ptr(), tuple(tensor.stride()))
        if ident in seen:
            continue
        seen.add(ident)
        out.append((name, tensor))
    return out
