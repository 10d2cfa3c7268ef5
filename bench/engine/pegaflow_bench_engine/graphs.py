"""CUDA graphs of the decoder's layers for short suffixes, as vLLM captures its forward.

A warm request computes only its last block: 16 new tokens over a 10K-token context. Launching a
layer's ~50 kernels from Python then costs more than running them (32 layers: 22.8-29 ms of host
time against 13.8 ms of GPU time on the H100), so the engine, not the load, sets the warm TTFT.
Replaying one captured graph per layer cuts the host's part to a launch per layer, and keeps the
layer boundaries, so the engine still waits for each layer's load before computing it.

Graphs are captured per request shape (new tokens, context tokens, block-table length) after a
request of that shape has run eagerly (warm kernels and allocator), outside any timed section,
and only for suffixes of at most MAX_TOKENS tokens (longer ones are compute-bound).
"""

from __future__ import annotations

import logging

import torch

from .kv_cache import PagedKVCache
from .model import Decoder

log = logging.getLogger("pegaflow.bench.engine")

MAX_TOKENS = 64

Shape = tuple[int, int, int]  # new tokens, context tokens, block-table length


class LayerGraphs:
    """One request shape's graphs: static input buffers, one graph per layer (sharing a memory
    pool, replayed in capture order) and each layer's output."""

    def __init__(self, decoder: Decoder, cache: PagedKVCache, shape: Shape) -> None:
        new, total, table_len = shape
        dev = decoder.device
        self.decoder, self.total = decoder, total
        self.ids = torch.zeros(new, dtype=torch.long, device=dev)
        self.positions = torch.arange(total - new, total, device=dev)
        self.table = torch.zeros(table_len, dtype=torch.long, device=dev)
        self.slots = torch.zeros(new, dtype=torch.long, device=dev)
        self.hidden = decoder.embed(self.ids)
        self.cos, self.sin = decoder.rope_values(self.positions)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.outputs: list[torch.Tensor] = []
        pool = torch.cuda.graph_pool_handle()
        self._use_static_rope()
        # One eager layer on the capture stream first, so its library handles and workspaces exist
        # before capture (its KV write lands in slot 0 of a free block: the engine captures between
        # requests, when every block is free).
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            decoder.layer(0, self.hidden, self.positions, cache, self.table, self.slots, total)
        torch.cuda.current_stream(dev).wait_stream(stream)
        h = self.hidden
        for layer in range(decoder.shape.layers):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                h = decoder.layer(layer, h, self.positions, cache, self.table, self.slots, total)
            self.graphs.append(graph)
            self.outputs.append(h)

    def _use_static_rope(self) -> None:
        self.decoder.use_rope(self.positions, self.cos, self.sin)

    def start(self, ids: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, slots: torch.Tensor) -> None:
        """Copy one request's inputs into the static buffers (on the current stream, before any replay)."""
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.table.copy_(table)
        self.slots.copy_(slots)
        self.hidden.copy_(self.decoder.embed(self.ids))
        cos, sin = self.decoder.rope_values(self.positions)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        self._use_static_rope()

    def layer(self, index: int) -> torch.Tensor:
        self.graphs[index].replay()
        return self.outputs[index]


class GraphCache:
    """The engine's captured shapes. ``runner`` answers a shape's graphs once captured;
    ``capture_pending`` captures the short shapes that ran eagerly since the last call."""

    def __init__(self, decoder: Decoder, cache: PagedKVCache) -> None:
        self.decoder, self.cache = decoder, cache
        self._graphs: dict[Shape, LayerGraphs | None] = {}  # None: capture failed, stay eager
        self._pending: set[Shape] = set()

    def runner(self, shape: Shape) -> LayerGraphs | None:
        if shape[0] > MAX_TOKENS:
            return None
        if shape not in self._graphs:
            self._pending.add(shape)
        return self._graphs.get(shape)

    @torch.inference_mode()
    def capture_pending(self) -> None:
        for shape in sorted(self._pending):
            try:
                self._graphs[shape] = LayerGraphs(self.decoder, self.cache, shape)
            except RuntimeError as exc:  # a kernel that cannot be captured: this shape stays eager
                log.warning("CUDA graph capture of shape %s failed (%s); running it eagerly", shape, exc)
                self._graphs[shape] = None
        self._pending.clear()

    def close(self) -> None:
        self._graphs.clear()
        self._pending.clear()
