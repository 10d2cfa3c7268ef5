"""A simulated engine rank: what a connector does, without a model.

It owns a paged KV cache in shared memory, turns token ids into a prefix chain of block hashes
(as vLLM does: each hash covers its parent and its block's tokens), and runs a prefill the way a
connector drives it: Query the daemon for the cached prefix, Load those blocks into free engine
blocks, "compute" the rest (fill them with bytes derived from their hash, so loads are checkable),
and Save the new blocks. The demo and the benchmarks use it; tests check loaded bytes with it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .client import PegaflowClient
from .errors import DaemonUnavailable
from .host_kv import HostKVCache, KVShape

LLAMA_8B = KVShape(num_layers=32, num_blocks=0, block_size=16, num_kv_heads=8, head_size=128, dtype="bfloat16")


def block_hashes(tokens: Sequence[int], block_size: int, seed: bytes = b"pegaflow") -> list[bytes]:
    """Prefix-chain hashes of the full blocks of ``tokens``."""
    out, parent = [], hashlib.sha256(seed).digest()
    data = np.asarray(tokens, dtype=np.int64).tobytes()  # once: a numpy array per block costs ~3 us
    step = 8 * block_size
    for start in range(0, 8 * (len(tokens) - block_size + 1), step):
        parent = hashlib.sha256(parent + data[start : start + step]).digest()
        out.append(parent)
    return out


def _plane_pattern(block_hash: bytes, plane: int, size: int) -> np.ndarray:
    words = np.frombuffer(block_hash, dtype=np.uint16) ^ np.uint16(plane)
    return np.tile(words, -(-size // words.size))[:size]


def fill_block(cache: HostKVCache, block_id: int, block_hash: bytes) -> None:
    """Deterministic content for a block, derived from its hash, so any load can be verified."""
    for l in range(cache.shape.num_layers):
        for kv in range(2):
            flat = cache.layer(l)[kv, block_id].reshape(-1)
            flat[:] = _plane_pattern(block_hash, 2 * l + kv, flat.size)


def block_matches(cache: HostKVCache, block_id: int, block_hash: bytes) -> bool:
    for l in range(cache.shape.num_layers):
        for kv in range(2):
            flat = cache.layer(l)[kv, block_id].reshape(-1)
            if not np.array_equal(flat, _plane_pattern(block_hash, 2 * l + kv, flat.size)):
                return False
    return True


@dataclass(frozen=True)
class PrefillStats:
    blocks: int
    hit_blocks: int
    query_s: float
    load_s: float
    compute_s: float
    save_s: float
    loaded_bytes: int
    saved_blocks: int
    failed_blocks: int
    daemon_down: bool = False

    @property
    def total_s(self) -> float:
        return self.query_s + self.load_s + self.compute_s + self.save_s


class SimulatedEngine:
    def __init__(
        self, client: PegaflowClient, shape: KVShape, model: str = "llama-3.1-8b", instance_id: str = "sim-0",
        fill: bool = True, memory: str = "shm",
    ) -> None:
        self.client = client
        self.shape = shape
        self.cache = HostKVCache(shape, memory)
        self.fill = fill
        self.namespace = shape.namespace(model)
        self.handle = client.register_context(self.cache.context_spec(self.namespace, instance_id=instance_id))
        self._next_block = 0

    def allocate(self, n: int) -> list[int]:
        """Engine block ids for a request: a rotating window, scattered like a busy engine's."""
        if n > self.shape.num_blocks:
            raise ValueError(f"request needs {n} blocks, the cache has {self.shape.num_blocks}")
        ids = [(self._next_block + 7 * i) % self.shape.num_blocks for i in range(n)]
        if len(set(ids)) != n:  # 7 shares a factor with num_blocks: fall back to a contiguous window
            ids = [(self._next_block + i) % self.shape.num_blocks for i in range(n)]
        self._next_block = (self._next_block + n) % self.shape.num_blocks
        return ids

    def prefill(self, tokens: Sequence[int], verify: bool = False) -> PrefillStats:
        """One request's prefill. The daemon going away at any step is a miss (recompute, skip the
        save), never an error: that is what a connector must do too."""
        hashes = block_hashes(tokens, self.shape.block_size)
        ids = self.allocate(len(hashes))
        down = False
        t0 = time.perf_counter()
        try:
            hit = self.client.query(self.handle, hashes)
        except DaemonUnavailable:
            return self._compute_only(hashes, ids, time.perf_counter() - t0)
        t1 = time.perf_counter()
        failed: tuple[int, ...] = ()
        loaded = 0
        if hit.hit_blocks:
            try:
                result = self.client.load(self.handle, hit.lease_id, ids[: hit.hit_blocks]).wait()
                failed, loaded = result.failed_block_ids, result.bytes
            except DaemonUnavailable:
                failed, down = tuple(ids[: hit.hit_blocks]), True
        t2 = time.perf_counter()
        first_failed = min((ids.index(b) for b in failed), default=hit.hit_blocks)
        reuse = min(hit.hit_blocks, first_failed)
        if verify:
            bad = [i for i in range(reuse) if not block_matches(self.cache, ids[i], hashes[i])]
            if bad:
                raise AssertionError(f"loaded blocks {bad[:5]} hold wrong bytes")
        if self.fill:
            for i in range(reuse, len(hashes)):
                fill_block(self.cache, ids[i], hashes[i])
        t3 = time.perf_counter()
        saved = 0
        if reuse < len(hashes) and not down:
            try:
                saved = self.client.save(self.handle, ids[reuse:], hashes[reuse:]).stored
            except DaemonUnavailable:
                down = True
        t4 = time.perf_counter()
        return PrefillStats(len(hashes), reuse, t1 - t0, t2 - t1, t3 - t2, t4 - t3, loaded, saved, len(failed), down)

    def _compute_only(self, hashes: list[bytes], ids: list[int], query_s: float) -> PrefillStats:
        t = time.perf_counter()
        if self.fill:
            for block_id, h in zip(ids, hashes):
                fill_block(self.cache, block_id, h)
        return PrefillStats(len(hashes), 0, query_s, 0.0, time.perf_counter() - t, 0.0, 0, 0, 0, daemon_down=True)

    def close(self) -> None:
        try:
            self.client.unregister_context(self.handle)
        except DaemonUnavailable:
            pass
        self.cache.close()
