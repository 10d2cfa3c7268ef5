"""Small helpers shared by the contract classes."""

from __future__ import annotations

import os

from pegaflow_core.keys import BlockKey

NAMESPACE = "conformance/model-a"


def make_keys(count: int, *, namespace: str = NAMESPACE, shard: int = 0, salt: bytes = b"") -> list[BlockKey]:
    """``count`` distinct keys; ``salt`` keeps keys of different tests apart."""
    return [BlockKey(namespace, salt + i.to_bytes(8, "little") + os.urandom(8), shard) for i in range(count)]


def random_blocks(count: int, size: int) -> list[bytes]:
    return [os.urandom(size) for _ in range(count)]
