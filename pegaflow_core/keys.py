"""Block keys: what identifies a KV block independently of the engine that computed it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import repeat
from typing import NamedTuple

from .errors import InvalidArgument

MAX_HASH_BYTES = 64


class _BlockKeyFields(NamedTuple):
    namespace: str
    block_hash: bytes
    shard: int = 0


class BlockKey(_BlockKeyFields):
    """One KV block.

    ``namespace`` fingerprints the model and the KV layout, so engines with a different layout
    never share bytes. ``block_hash`` is the engine's prefix-chain hash of the block (it already
    covers every earlier token). ``shard`` is the TP rank / KV-head shard; caches that are identical
    on every rank (MLA) use shard 0 for all ranks and are stored once.

    A tuple underneath: hashing and equality run in C, which matters because every index and tier
    operation is a dict operation on thousands of keys per engine step.
    """

    __slots__ = ()

    def __new__(cls, namespace: str, block_hash: bytes, shard: int = 0) -> BlockKey:
        _check_namespace(namespace)
        _check_shard(shard)
        _check_hash(block_hash, "BlockKey.block_hash")
        return tuple.__new__(cls, (namespace, block_hash, shard))

    @classmethod
    def many(cls, namespace: str, block_hashes: Iterable[bytes], shard: int = 0) -> list[BlockKey]:
        """Keys of one namespace and shard, validated once per batch (the daemon's hot path)."""
        _check_namespace(namespace)
        _check_shard(shard)
        hashes = block_hashes if isinstance(block_hashes, (list, tuple)) else list(block_hashes)
        if not hashes:
            return []
        # Validate and build with C-level iteration only: this runs for every Query and Save.
        lengths = set(map(len, hashes)) if set(map(type, hashes)) == {bytes} else {0}
        if min(lengths) == 0 or max(lengths) > MAX_HASH_BYTES:
            for i, block_hash in enumerate(hashes):
                _check_hash(block_hash, f"block_hashes[{i}]")
        return list(map(tuple.__new__, repeat(cls), zip(repeat(namespace), hashes, repeat(shard))))

    def encode(self) -> bytes:
        """Stable byte form, used as a key by persistent tiers and remote indexes."""
        ns = self.namespace.encode()
        return len(ns).to_bytes(2, "little") + ns + self.shard.to_bytes(4, "little") + self.block_hash

    @classmethod
    def decode(cls, data: bytes) -> BlockKey:
        ns_len = int.from_bytes(data[:2], "little")
        ns = data[2 : 2 + ns_len].decode()
        shard = int.from_bytes(data[2 + ns_len : 6 + ns_len], "little")
        return cls(ns, bytes(data[6 + ns_len :]), shard)

    def __repr__(self) -> str:
        return f"BlockKey({self.namespace!r}, {self.block_hash.hex()[:16]}, shard={self.shard})"


class KeyCache:
    """The keys of one namespace and shard by hash, for the daemon's hot path.

    Engines send the same hashes again and again: every Query re-sends a prompt's whole prefix
    chain, a Save follows the Query of the same blocks, requests share system prompts. A key seen
    before costs one dict lookup of its hash here instead of a new tuple, and the index then finds
    the very object it stores (a dict compares identical keys without looking inside). Bounded:
    cleared when it would pass ``limit`` keys, so it never holds more than a recent working set.
    Thread-safe through the GIL: every step is one C-level dict call.
    """

    def __init__(self, namespace: str, shard: int = 0, limit: int = 1 << 16) -> None:
        _check_namespace(namespace)
        _check_shard(shard)
        self.namespace = namespace
        self.shard = shard
        self.limit = limit
        self._known: dict[bytes, BlockKey] = {}

    def keys(self, block_hashes: list[bytes]) -> list[BlockKey]:
        """``BlockKey.many(namespace, block_hashes, shard)``, reusing the keys seen before."""
        known = self._known
        found = list(map(known.get, block_hashes))
        if all(found):  # a BlockKey is a non-empty tuple, a miss is None
            return found
        built = BlockKey.many(self.namespace, block_hashes, self.shard)  # validates the new hashes
        if len(known) + len(built) > self.limit:
            known.clear()
        return list(map(known.setdefault, block_hashes, built))  # keeps the known ones' identity

    def __len__(self) -> int:
        return len(self._known)


def _check_namespace(namespace: object) -> None:
    if not isinstance(namespace, str) or not namespace:
        raise InvalidArgument(f"BlockKey.namespace: expected a non-empty string, got {namespace!r}")


def _check_shard(shard: object) -> None:
    if not isinstance(shard, int) or isinstance(shard, bool) or shard < 0:
        raise InvalidArgument(f"BlockKey.shard: expected an integer >= 0, got {shard!r}")


def _check_hash(block_hash: object, where: str) -> None:
    if not isinstance(block_hash, bytes) or not 0 < len(block_hash) <= MAX_HASH_BYTES:
        raise InvalidArgument(f"{where}: expected 1..{MAX_HASH_BYTES} bytes, got {block_hash!r:.80}")


def check_keys(keys: Sequence[BlockKey], what: str = "keys") -> list[BlockKey]:
    """Validate a batch of keys before anything changes, so bad input corrupts nothing; the one
    check every tier and index uses (errors name the position: ``keys[2]: expected a BlockKey``)."""
    if isinstance(keys, BlockKey):  # a BlockKey is itself a tuple: catch the missing brackets
        raise InvalidArgument(f"{what}: expected a sequence of BlockKey, got a single {keys!r}; wrap it in a list")
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
        raise InvalidArgument(f"{what}: expected a sequence of BlockKey, got {type(keys).__name__}")
    out = list(keys)
    if set(map(type, out)) - {BlockKey}:  # one C-level pass; the loop only to name the culprit
        for i, key in enumerate(out):
            if not isinstance(key, BlockKey):
                raise InvalidArgument(f"{what}[{i}]: expected a BlockKey, got {type(key).__name__} {key!r:.60}")
    return out
