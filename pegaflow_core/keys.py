"""Block keys: what identifies a KV block independently of the engine that computed it."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidArgument

MAX_HASH_BYTES = 64


@dataclass(frozen=True, slots=True)
class BlockKey:
    """One KV block.

    ``namespace`` fingerprints the model and the KV layout, so engines with a different layout
    never share bytes. ``block_hash`` is the engine's prefix-chain hash of the block (it already
    covers every earlier token). ``shard`` is the TP rank / KV-head shard; caches that are identical
    on every rank (MLA) use shard 0 for all ranks and are stored once.
    """

    namespace: str
    block_hash: bytes
    shard: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str) or not self.namespace:
            raise InvalidArgument(f"BlockKey.namespace: expected a non-empty string, got {self.namespace!r}")
        if not isinstance(self.block_hash, bytes) or not 0 < len(self.block_hash) <= MAX_HASH_BYTES:
            raise InvalidArgument(
                f"BlockKey.block_hash: expected 1..{MAX_HASH_BYTES} bytes, got {self.block_hash!r:.80}"
            )
        if not isinstance(self.shard, int) or isinstance(self.shard, bool) or self.shard < 0:
            raise InvalidArgument(f"BlockKey.shard: expected an integer >= 0, got {self.shard!r}")

    def encode(self) -> bytes:
        """Stable byte form, used as a key by persistent tiers and remote indexes."""
        ns = self.namespace.encode()
        return (
            len(ns).to_bytes(2, "little") + ns + self.shard.to_bytes(4, "little") + self.block_hash
        )

    @classmethod
    def decode(cls, data: bytes) -> BlockKey:
        ns_len = int.from_bytes(data[:2], "little")
        ns = data[2 : 2 + ns_len].decode()
        shard = int.from_bytes(data[2 + ns_len : 6 + ns_len], "little")
        return cls(ns, bytes(data[6 + ns_len :]), shard)

    def __repr__(self) -> str:
        return f"BlockKey({self.namespace!r}, {self.block_hash.hex()[:16]}, shard={self.shard})"
