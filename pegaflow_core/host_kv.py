"""A CPU engine's paged KV cache in shared memory, laid out per layer as vLLM's
``(2, num_blocks, block_size, num_kv_heads, head_size)`` (K plane then V plane).

Used by the simulated engine, the benchmarks, tests and CPU connectors: the engine computes into
``layer(i)`` and registers ``context_spec()`` with the daemon, which maps the same memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .client import ContextSpec, RegionSpec
from .layout import Plane, namespace_for
from .shm import SharedRegion


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_blocks: int
    block_size: int  # tokens per block
    num_kv_heads: int
    head_size: int
    dtype: str = "bfloat16"  # stored as raw 2-byte words on CPU when numpy lacks the dtype

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype in ("bfloat16", "float16") else np.dtype(self.dtype).itemsize

    @property
    def plane_block_bytes(self) -> int:
        """Bytes of one block in one plane (K or V of one layer)."""
        return self.block_size * self.num_kv_heads * self.head_size * self.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over every layer and both planes: what the daemon stores."""
        return 2 * self.num_layers * self.plane_block_bytes

    @property
    def layer_bytes(self) -> int:
        return 2 * self.num_blocks * self.plane_block_bytes

    def namespace(self, model: str, tp_size: int = 1) -> str:
        return namespace_for(model, layout="vllm_2nbhd", block_size=self.block_size, num_kv_heads=self.num_kv_heads,
                             head_size=self.head_size, dtype=self.dtype, num_layers=self.num_layers, tp_size=tp_size)


class HostKVCache:
    """A KV cache in host memory: a shared-memory file the daemon maps (``memory="shm"``) or
    private memory of this process that the daemon reaches by cross-memory attach
    (``memory="cma"``, like a CPU engine's own torch tensors). ``close()`` releases it."""

    def __init__(self, shape: KVShape, memory: str = "shm") -> None:
        if memory not in ("shm", "cma"):
            raise ValueError(f"memory must be 'shm' or 'cma', got {memory!r}")
        self.shape = shape
        self.memory = memory
        nbytes = shape.num_layers * shape.layer_bytes
        self.region = SharedRegion.create(nbytes) if memory == "shm" else None
        self.array = self.region.array if self.region is not None else np.empty(nbytes, dtype=np.uint8)
        self.array.fill(0)  # touch every page now, as an engine allocating its KV cache does
        word = np.uint16 if shape.itemsize == 2 else np.dtype(shape.dtype)
        self._layers = [
            self.array[l * shape.layer_bytes : (l + 1) * shape.layer_bytes]
            .view(word)
            .reshape(2, shape.num_blocks, shape.block_size, shape.num_kv_heads, shape.head_size)
            for l in range(shape.num_layers)
        ]

    def layer(self, index: int) -> np.ndarray:
        return self._layers[index]

    def block_bytes_view(self, block_id: int) -> np.ndarray:
        """All bytes of one block gathered (a copy), in the daemon's stored order: for tests."""
        s = self.shape
        parts = []
        for l in range(s.num_layers):
            for kv in range(2):
                parts.append(self._layers[l][kv, block_id].reshape(-1).view(np.uint8))
        return np.concatenate(parts)

    def planes(self) -> tuple[Plane, ...]:
        s = self.shape
        stride = s.plane_block_bytes
        return tuple(
            Plane(layer=l, region=0, offset=l * s.layer_bytes + kv * s.num_blocks * stride, block_stride=stride, block_bytes=stride)
            for l in range(s.num_layers)
            for kv in range(2)
        )

    def region_spec(self) -> RegionSpec:
        if self.region is not None:
            return RegionSpec(nbytes=self.region.nbytes, path=str(self.region.path))
        return RegionSpec(nbytes=self.array.nbytes, kind="cma", pid=os.getpid(), address=self.array.ctypes.data)

    def context_spec(self, namespace: str, instance_id: str = "", shard: int = 0, tp_rank: int = 0, tp_size: int = 1) -> ContextSpec:
        return ContextSpec(
            namespace=namespace, num_blocks=self.shape.num_blocks,
            regions=(self.region_spec(),),
            planes=self.planes(), instance_id=instance_id, shard=shard, tp_rank=tp_rank, tp_size=tp_size,
        )

    def close(self) -> None:
        self._layers = []
        self.array = np.empty(0, dtype=np.uint8)
        if self.region is not None:
            self.region.close()
