"""One engine rank: a decoder, its paged KV cache and a KV backend, serving prefills the way vLLM
does with a KV connector.

Per request: hash the prompt's full blocks as a prefix chain (the project's hashing,
``pegaflow_core.sim_engine.block_hashes``), Query the backend for the cached prefix (at most all
but the last token: the engine always computes at least one token, as vLLM does), start the Load,
then compute the uncached suffix layer by layer, each layer as soon as the backend reports it in
place, and finally Save the new full blocks in one call. The engine keeps no prefix cache of its
own: every request starts from freshly allocated blocks, so every hit is the backend's.

TTFT is from the request's arrival to the first token's logits on the host; the Save is timed
separately (the vLLM connector runs it off the critical path).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pegaflow_core.errors import PegaflowError
from pegaflow_core.sim_engine import block_hashes

from .graphs import GraphCache
from .kv_backend import Hit, KVBackend
from .kv_cache import PagedKVCache
from .model import Decoder
from .shapes import ModelShape


@dataclass(frozen=True)
class Prefill:
    tokens: int
    hit_tokens: int  # served from the backend
    computed_tokens: int
    ttft_s: float
    hash_s: float
    query_s: float  # hashing included
    load_wait_s: float  # the compute waiting for layers still loading
    load_issue_s: float  # the Load call itself (until the engine may start computing)
    load_end_s: float  # from arrival to the last layer loaded (0: nothing loaded)
    promote_wait_s: float
    save_s: float
    saved_blocks: int
    failed_blocks: int
    next_token: int
    logits: torch.Tensor | None = field(default=None, repr=False)  # [computed_tokens, vocab], when asked for


@dataclass
class _LoadTimes:
    """Where one prefill's load went (seconds): the Load call, the compute waiting for layers, and
    the moment the last layer was in (from the request's arrival at ``started``; 0: no load)."""

    started: float
    issue_s: float = 0.0
    wait_s: float = 0.0
    end_s: float = 0.0


class Engine:
    def __init__(self, shape: ModelShape, backend: KVBackend, device: torch.device, kv_blocks: int,
                 instance_id: str = "engine-0", seed: int = 0, tied: bool = False, tp_rank: int = 0,
                 tp_size: int = 1, save: bool = True, graphs: bool = True) -> None:
        self.shape = shape
        self.device = device
        self.backend = backend
        self.save_enabled = save
        self.decoder = Decoder(shape, device, seed=seed, tied=tied, tp_size=tp_size)
        self.cache = PagedKVCache(shape, kv_blocks, device, seed=seed + tp_rank + 1)
        # Short suffixes replay captured CUDA graphs (graphs.py), as vLLM does unless told to stay eager.
        self.graphs = GraphCache(self.decoder, self.cache) if graphs and device.type == "cuda" else None
        self.instance_id, self.seed, self.tp_rank, self.tp_size = instance_id, seed, tp_rank, tp_size
        self._register(backend)

    def _register(self, backend: KVBackend) -> None:
        # MLA latent caches are identical on every TP rank: one key shard (0) for all of them.
        shard = 0 if self.shape.attention == "mla" else self.tp_rank
        backend.register(self.cache, self.shape.namespace(weights_seed=self.seed), self.instance_id, shard,
                         self.tp_rank, self.tp_size)
        self.backend = backend

    def use_backend(self, backend: KVBackend) -> None:
        """Serve the next requests with another backend (another daemon, or none): the weights stay."""
        self.backend.close()
        self._register(backend)

    def prefill(self, tokens: Sequence[int], keep_logits: bool = False) -> Prefill:
        started = time.perf_counter()
        B = self.shape.block_size
        hashes = block_hashes(tokens, B)
        hashed = time.perf_counter()
        times = _LoadTimes(started)
        block_ids = self.cache.allocate(-(-len(tokens) // B))
        try:
            hit = self.backend.lookup(hashes[: (len(tokens) - 1) // B])
            queried = time.perf_counter()
            result, failed = self._forward(tokens, block_ids, hit, keep_logits, times)
            if failed:  # some loaded block was bad: recompute the whole prompt, as vLLM would
                result, _ = self._forward(tokens, block_ids, Hit(0), keep_logits, times)
                hit = Hit(0)
            next_token = int(result[-1].argmax())  # forces the host to wait for the GPU
            ttft = time.perf_counter() - started
            save_start = time.perf_counter()
            full = len(tokens) // B
            saved = self.backend.save(block_ids[hit.blocks : full], hashes[hit.blocks : full]) if self.save_enabled else 0
            save_s = time.perf_counter() - save_start
        finally:
            self.cache.free(block_ids)
        if self.graphs is not None:
            self.graphs.capture_pending()  # after the request, outside its timings
        hit_tokens = hit.blocks * B
        return Prefill(len(tokens), hit_tokens, len(tokens) - hit_tokens, ttft, hashed - started, queried - started,
                       times.wait_s, times.issue_s, times.end_s, hit.wait_s, save_s,
                       saved, len(failed), next_token, result if keep_logits else None)

    @torch.inference_mode()
    def _forward(self, tokens: Sequence[int], block_ids: list[int], hit: Hit, keep_logits: bool,
                 times: _LoadTimes) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Logits of the computed tokens (all of them, or the last) and the blocks that failed to load."""
        B, dev = self.shape.block_size, self.device
        load = None
        if hit.blocks:
            issued = time.perf_counter()
            try:
                load = self.backend.load(hit, block_ids[: hit.blocks])
                times.issue_s = time.perf_counter() - issued
            except PegaflowError:
                return self._forward(tokens, block_ids, Hit(0), keep_logits, times)[0], tuple(block_ids[: hit.blocks])
        start = hit.blocks * B
        ids = torch.tensor(tokens[start:], device=dev)
        positions = torch.arange(start, len(tokens), device=dev)
        table = torch.tensor(block_ids, device=dev)
        slots = table[positions // B] * B + positions % B
        graphs = self.graphs.runner((len(ids), len(tokens), len(block_ids))) if self.graphs is not None else None
        if graphs is not None:
            graphs.start(ids, positions, table, slots)
        else:
            h = self.decoder.embed(ids)
        failed: tuple[int, ...] = ()
        for layer in range(self.shape.layers):
            if load is not None:
                waiting = time.perf_counter()
                try:
                    load.wait_layer(layer)
                except PegaflowError:
                    failed = tuple(block_ids[: hit.blocks])
                    load = None
                times.wait_s += time.perf_counter() - waiting
            if graphs is not None:
                h = graphs.layer(layer)
            else:
                h = self.decoder.layer(layer, h, positions, self.cache, table, slots, len(tokens))
        if load is not None:
            waiting = time.perf_counter()
            failed = load.finish()
            loaded = time.perf_counter()
            times.wait_s += loaded - waiting
            times.end_s = loaded - times.started
        return self.decoder.logits(h if keep_logits else h[-1:]), failed

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.close()
        self.backend.close()
        self.cache.close()
