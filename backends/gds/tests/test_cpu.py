"""What CI checks on machines without a GPU: options and config errors, the shared on-disk
format (ssd and gds tiers open each other's directories), input validation of the device calls,
the route the daemon picks, and how the tier reports that device I/O cannot run here."""

from __future__ import annotations

from pathlib import Path

import pytest

from pegaflow_core import InvalidArgument, PluginError, Tier, TierCapabilities
from pegaflow_core.config import options_from_mapping, parse_config
from pegaflow_core.device_io import LoadRoute, check_device_segments, load_route
from pegaflow_core.errors import ConfigError
from pegaflow_gds import GdsOptions, GdsTier
from pegaflow_gds.cufile import GdsUnavailable
from pegaflow_ssd import SsdOptions, SsdTier

from .conftest import KIB, MIB, blocks_of, keys_of

no_device = pytest.mark.skipif(GdsTier.availability().ok, reason="device I/O works here; this checks machines without it")


def test_options_have_ssd_options_and_three_of_their_own() -> None:
    opts = options_from_mapping(GdsOptions, {"path": "/nvme/pf", "capacity": "2gb", "segment_size": "64mb",
                                             "direct": "always", "compat": "on", "threads": 8},
                                file="stack.yaml", path="tiers[1]")
    assert (opts.capacity, opts.segment_size, opts.direct, opts.compat, opts.threads) == (2 << 30, 64 << 20, "always", "on", 8)
    defaults = GdsOptions(path="/p", capacity=1 << 30)
    assert (defaults.direct, defaults.compat, defaults.threads, defaults.fsync) == ("auto", "auto", 16, True)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("direct", "sometimes", r"tiers\[1\]\.direct: expected one of 'auto', 'always', 'never', got 'sometimes'"),
    ("compat", True, r"tiers\[1\]\.compat"),
    ("threads", 0, r"tiers\[1\]\.threads: expected an integer from 1 to 256, got 0"),
    ("segment_size", "5000", r"tiers\[1\]\.segment_size"),
])
def test_config_errors_name_the_key(key: str, value: object, message: str) -> None:
    mapping = {"path": "/p", "capacity": "2gb", key: value}
    with pytest.raises(ConfigError, match=message):
        options_from_mapping(GdsOptions, mapping, file="stack.yaml", path="tiers[1]")


def test_options_built_in_code_are_checked() -> None:
    with pytest.raises(InvalidArgument, match=r"threads: expected an integer"):
        GdsOptions(path="/p", capacity=MIB, threads=1000)
    with pytest.raises(InvalidArgument, match=r"capacity: .* fewer than two segments"):
        GdsOptions(path="/p", capacity=MIB, segment_size=MIB)
    with pytest.raises(InvalidArgument, match=r"expected GdsTier.Options, got SsdOptions"):
        GdsTier(SsdOptions(path="/p", capacity=2 * MIB, segment_size=MIB))  # type: ignore[arg-type]


def test_ssd_and_gds_tiers_share_one_format(tmp_path: Path, make_tier) -> None:
    keys, blocks = keys_of(6), blocks_of(6, 12 * KIB + 5)
    ssd = SsdTier(SsdOptions(path=str(tmp_path / "gds"), capacity=MIB, segment_size=64 * KIB, fsync=False))
    assert ssd.put(keys[:3], blocks[:3]) == [True] * 3
    ssd.close()
    gds = make_tier()
    assert sorted(k for k, _ in gds.recovered()) == sorted(keys[:3])
    assert gds.put(keys[3:], blocks[3:]) == [True] * 3
    assert gds.evict([keys[0]]) == 1
    gds.close()
    again = SsdTier(SsdOptions(path=str(tmp_path / "gds"), capacity=MIB, segment_size=64 * KIB, fsync=False))
    try:
        dests = [bytearray(len(blocks[0])) for _ in keys]
        assert again.get_into(keys, dests) == [False] + [True] * 5
        assert [bytes(d) for d in dests[1:]] == blocks[1:]
        assert again.integrity_failures == 0
    finally:
        again.close()


def test_device_segments_are_validated_before_anything_moves(make_tier) -> None:
    tier = make_tier()
    keys = keys_of(2)
    tier.put(keys, blocks_of(2, 4 * KIB))
    cases = [
        ([[(1 << 40, 4096)]], r"dests: expected one segment list per key \(2\), got 1"),
        ([[(1 << 40, 4096)], []], r"dests\[1\]: expected a non-empty list"),
        ([[(1 << 40, 4096)], [(0, 4096)]], r"dests\[1\]\[0\]: expected a device address above 0, got 0"),
        ([[(1 << 40, 4096)], [(1 << 40, -1)]], r"dests\[1\]\[0\]: expected a length above 0, got -1"),
        ([[(1 << 40, 4096)], [(1 << 40,)]], r"dests\[1\]\[0\]: expected a \(device address, nbytes\) pair"),
        ("abc", r"dests: expected a sequence of segment lists, got str"),
    ]
    for dests, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            tier.read_into_device(keys, dests)
    with pytest.raises(InvalidArgument, match=r"keys\[0\]: expected a BlockKey, got tuple"):
        tier.read_into_device([("ns", b"h", 0)], [[(1 << 40, 4096)]])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument, match=r"sources\[0\]\[0\]: expected a length above 0"):
        tier.write_from_device(keys[:1], [[(1 << 40, 0)]])
    assert tier.read_into_device([], []) == [] and tier.write_from_device([], []) == []


@no_device
def test_without_a_gpu_the_tier_serves_host_io_and_says_why_device_io_cannot_run(make_tier) -> None:
    reason = GdsTier.availability().detail
    assert "kvikio" in reason or "driver" in reason, reason
    tier = make_tier(direct="always")
    keys, blocks = keys_of(2), blocks_of(2, 8 * KIB)
    assert tier.put(keys, blocks) == [True, True]
    with pytest.raises(GdsUnavailable, match=r"kvikio|driver"):
        tier.read_into_device(keys[:1], [[(1 << 40, 8 * KIB)]])
    with pytest.raises(GdsUnavailable):
        tier.write_from_device(keys[:1], [[(1 << 40, 8 * KIB)]])
    assert tier.direct_loads is False  # even with direct: always, loads go through DRAM
    assert load_route(tier, True) is LoadRoute.STAGED


@no_device
def test_config_with_a_gds_tier_is_refused_with_the_reason() -> None:
    yaml = "tiers:\n  - {kind: dram, capacity: 64mb}\n  - {kind: gds, path: /tmp/pf-gds, capacity: 1gb}\n"
    with pytest.raises(ConfigError, match=r"tiers\[1\].*backend 'gds' is unavailable on this machine: .*(kvikio|driver)"):
        parse_config(yaml, "stack.yaml")


class _FakeDirect(Tier):
    """Only its attributes matter to load_route; it stores nothing."""

    kind = "route-probe"
    capabilities = TierCapabilities(device_io=True)

    def __init__(self, direct: bool) -> None:
        self.direct_loads = direct

    put = get_into = contains = evict = usage = close = None  # type: ignore[assignment]


def test_load_route_per_hit() -> None:
    class Pool(_FakeDirect):
        capabilities = TierCapabilities(host_views=True)

    assert load_route(Pool(False), True) is LoadRoute.POOL
    assert load_route(_FakeDirect(True), True) is LoadRoute.DIRECT
    assert load_route(_FakeDirect(True), False) is LoadRoute.STAGED  # host engine memory: no GPU address
    assert load_route(_FakeDirect(False), True) is LoadRoute.STAGED


def test_tiers_without_device_io_say_so(tmp_path: Path) -> None:
    ssd = SsdTier(SsdTier.conformance_options(tmp_path))
    try:
        with pytest.raises(PluginError, match=r"tier 'ssd' does not offer device I/O"):
            ssd.read_into_device(keys_of(1), [[(1 << 40, 4096)]])
        assert load_route(ssd, True) is LoadRoute.STAGED
    finally:
        ssd.close()


def test_check_device_segments_returns_plain_pairs() -> None:
    assert check_device_segments([[[1 << 40, 10], (2 << 40, 20)]], 1, "d") == [[(1 << 40, 10), (2 << 40, 20)]]
    with pytest.raises(InvalidArgument, match=r"d\[0\]\[0\]: expected a device address above 0, got True"):
        check_device_segments([[(True, 10)]], 1, "d")
