"""KeyCache: the daemon's keys by hash (keys.py). It must give exactly what BlockKey.many gives,
reuse the objects it has seen, validate every new hash and stay within its bound."""

from __future__ import annotations

import pytest

from pegaflow_core.contexts import ContextTable, EngineContext
from pegaflow_core.errors import InvalidArgument
from pegaflow_core.keys import BlockKey, KeyCache


def hashes(start: int, count: int) -> list[bytes]:
    return [f"h-{i}".encode().ljust(32, b"\0") for i in range(start, start + count)]


def test_keys_equal_block_key_many_and_are_reused():
    cache = KeyCache("ns", shard=3)
    first = cache.keys(hashes(0, 10))
    assert first == BlockKey.many("ns", hashes(0, 10), 3) and all(type(k) is BlockKey for k in first)
    again = cache.keys(hashes(5, 10))  # five known, five new, in fresh bytes objects
    assert again == BlockKey.many("ns", hashes(5, 10), 3)
    assert all(a is b for a, b in zip(again[:5], first[5:]))


def test_new_hashes_are_validated():
    cache = KeyCache("ns")
    cache.keys(hashes(0, 2))
    with pytest.raises(InvalidArgument, match=r"block_hashes\[2\]: expected 1\.\.64 bytes"):
        cache.keys(hashes(0, 2) + [b""])
    with pytest.raises(InvalidArgument, match=r"block_hashes\[0\]: expected 1\.\.64 bytes"):
        cache.keys([b"x" * 65])
    assert len(cache) == 2


def test_the_cache_stays_within_its_limit():
    cache = KeyCache("ns", limit=100)
    for start in range(0, 1000, 30):
        assert cache.keys(hashes(start, 30)) == BlockKey.many("ns", hashes(start, 30))
        assert len(cache) <= 100


def test_contexts_of_one_namespace_and_shard_share_a_cache_until_the_last_goes():
    table = ContextTable()

    def context(cid: str, namespace: str, shard: int = 0) -> EngineContext:
        ctx = EngineContext(context_id=cid, session_id="s", instance_id=cid, namespace=namespace, shard=shard,
                            layout=None, regions=[])
        table.add(ctx)
        return ctx

    a, b, c = context("a", "ns"), context("b", "ns"), context("c", "ns", shard=1)
    assert a.key_cache is b.key_cache and a.key_cache is not c.key_cache
    table.pop("a")
    assert context("d", "ns").key_cache is b.key_cache
    table.pop("b"), table.pop("d")
    assert context("e", "ns").key_cache is not b.key_cache
