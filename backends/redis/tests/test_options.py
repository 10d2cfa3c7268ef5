"""Options as the config loader sees them, the plugin registration, and the backend probes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pegaflow_core.config import options_from_mapping, parse_config
from pegaflow_core.errors import ConfigError, InvalidArgument
from pegaflow_core.plugins import get_registry
from pegaflow_redis import RedisIndex, RedisIndexOptions


def test_registered_through_the_entry_point() -> None:
    assert get_registry().get("index", "redis") is RedisIndex


def test_yaml_config_with_human_durations() -> None:
    config = parse_config(
        "index: {kind: redis, url: 'redis://10.0.0.5:6379/2', node: gpu-7, key_prefix: prod,"
        " heartbeat: 500ms, node_ttl: 3s, socket_timeout: 250ms}\n",
        "cluster.yaml",
    )
    assert config.index.cls is RedisIndex
    assert config.index.options == RedisIndexOptions(
        url="redis://10.0.0.5:6379/2", node="gpu-7", key_prefix="prod", heartbeat=0.5, node_ttl=3.0,
        socket_timeout=0.25,
    )


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"url": "http://x"}, r"cluster.yaml: index.url: expected a Redis URL like 'redis://127.0.0.1:6379/0'"),
        ({"heartbeat": "soon"}, r"index.heartbeat: expected a duration like '30s'"),
        ({"heartbeat": 0}, r"index.heartbeat: expected a duration above 0, got 0"),
        ({"node": ""}, r"index.node: expected a non-empty string"),
        ({"heartbeat": "2s", "node_ttl": "2s"}, r"index: node_ttl \(2s\) must be longer than heartbeat \(2s\)"),
        ({"socket_timout": 1}, r"unknown key 'socket_timout' \(did you mean 'socket_timeout'\?\)"),
    ],
)
def test_bad_options_name_the_key(mapping, message) -> None:
    with pytest.raises(ConfigError, match=message):
        options_from_mapping(RedisIndexOptions, mapping, file="cluster.yaml", path="index")


def test_options_built_in_code_are_checked_too() -> None:
    with pytest.raises(ValueError, match="control characters"):
        RedisIndexOptions(node="a\0b")


def test_defaults() -> None:
    options = RedisIndexOptions()
    assert options.url == "redis://127.0.0.1:6379/0" and options.key_prefix == "pegaflow"
    assert options.node and options.node_ttl > options.heartbeat


def test_availability_does_not_connect() -> None:
    availability = RedisIndex.availability()
    assert availability.ok and availability.detail.startswith("redis-py ")


def test_conformance_options_need_a_server(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PEGAFLOW_REDIS_URL", raising=False)
    assert RedisIndex.conformance_options(tmp_path) is None
    monkeypatch.setenv("PEGAFLOW_REDIS_URL", "redis://127.0.0.1:6390/3")
    first, second = RedisIndex.conformance_options(tmp_path), RedisIndex.conformance_options(tmp_path)
    assert first.url == "redis://127.0.0.1:6390/3"
    assert first.key_prefix != second.key_prefix, "every index the suite builds needs its own keys"


def test_conformance_options_build_a_working_index(monkeypatch, tmp_path: Path, redis_server) -> None:
    monkeypatch.setenv("PEGAFLOW_REDIS_URL", redis_server.url)
    with RedisIndex(RedisIndex.conformance_options(tmp_path)) as index:
        assert index.stats().blocks == 0


def test_bad_names_are_invalid_arguments(redis_server, make_index) -> None:
    from pegaflow_core.index import Location
    from pegaflow_core.keys import BlockKey

    index = make_index(redis_server.url)
    key = BlockKey("ns", b"\x01")
    with pytest.raises(InvalidArgument, match=r"entries\[0\]\[1\].node"):
        index.insert([(key, Location("dram", "a\0b"))])
    with pytest.raises(InvalidArgument, match="owner"):
        index.acquire([key], ttl_s=1, owner="x\0y")
    with pytest.raises(InvalidArgument, match="ttl_s"):
        index.acquire([key], ttl_s=float("inf"))
    assert index.lookup([key]) == [()]


def test_batch_encoding_matches_blockkey_encode() -> None:
    from pegaflow_core.keys import BlockKey
    from pegaflow_redis.index import _encode

    keys = [BlockKey("ns-a", b"\x00" * 64), BlockKey("ns-é", b"\x01", 7), BlockKey("ns-a", b"\x02", 2**31)]
    assert _encode(keys) == [key.encode() for key in keys]
    assert [BlockKey.decode(enc) for enc in _encode(keys)] == keys
