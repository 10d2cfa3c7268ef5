"""The ``faulty`` wrapper: fault-free it passes the contracts; each fault does what it says (and no
more: the stored copy is never touched); it loads from YAML with precise errors; and the contract
suite catches the faults it injects."""

from __future__ import annotations

import os
import re
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from pegaflow_conformance import TierContract, TransportContract
from pegaflow_core import cli, plugins
from pegaflow_core.config import load_config, parse_config
from pegaflow_core.default_plugins.faulty import (
    FaultCounts,
    FaultyTier,
    FaultyTierOptions,
    FaultyTransport,
    FaultyTransportOptions,
    InjectedFault,
    InjectedTransportError,
)
from pegaflow_core.default_plugins.loopback import LoopbackTransport
from pegaflow_core.errors import ClosedError, ConfigError, InvalidArgument, PegaflowError, TransportError
from pegaflow_core.keys import BlockKey
from pegaflow_core.tier import Tier
from pegaflow_core.transport import Region, RemoteRegion, TransferOp, Transport

pytest_plugins = ["pytester"]

BLOCK = 4096


def dram(tmp_path: Path, capacity: str = "4mb") -> dict[str, Any]:
    """A small, private, unpinned dram tier under tmp_path, as YAML would give it."""
    return {"kind": "dram", "capacity": capacity, "chunk": "64kb", "shm_dir": str(tmp_path), "numa": None, "pin": "never"}


def keys(n: int, salt: bytes = b"") -> list[BlockKey]:
    return [BlockKey("faulty-test", salt + i.to_bytes(4, "little") + os.urandom(8)) for i in range(n)]


def blocks(n: int, size: int = BLOCK) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


def differing_bits(a: bytes, b: bytes) -> int:
    assert len(a) == len(b)
    return bin(int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).count("1")


def read(tier: Tier, ks: list[BlockKey], size: int = BLOCK) -> tuple[list[bool], list[bytes]]:
    dests = [bytearray(size) for _ in ks]
    hits = tier.get_into(ks, dests)
    return hits, [bytes(d) for d in dests]


@pytest.fixture
def make_tier(tmp_path: Path) -> Iterator[Callable[..., FaultyTier]]:
    made: list[FaultyTier] = []

    def make(**faults: Any) -> FaultyTier:
        made.append(FaultyTier(FaultyTierOptions(inner=dram(tmp_path), **faults)))
        return made[-1]

    yield make
    for tier in made:
        tier.close()


# -- (1) fault-free, the wrappers pass the contracts ------------------------------------------------

class TestFaultFreeFaultyDramTier(TierContract):
    @pytest.fixture
    def tier_factory(self, tmp_path: Path) -> Callable[[int], Tier]:
        def factory(capacity_bytes: int) -> Tier:
            options = FaultyTier.conformance_options(tmp_path, capacity_bytes)
            assert options is not None, "pegaflow-dram is a dependency of core, so it must be installed"
            return FaultyTier(options)

        return factory


class TestFaultFreeFaultyLoopbackTransport(TransportContract):
    @pytest.fixture
    def transport_factory(self, tmp_path: Path) -> Iterator[Callable[[], Transport]]:
        made: list[Transport] = []

        def factory() -> Transport:
            made.append(FaultyTransport(FaultyTransport.conformance_options(tmp_path)))
            return made[-1]

        yield factory
        for transport in made:
            transport.close()


def test_wrapper_declares_the_inner_tiers_capabilities(make_tier: Callable[..., FaultyTier]) -> None:
    tier = make_tier()
    assert isinstance(tier, FaultyTier) and type(tier).__name__ == "FaultyTier"
    assert type(tier).capabilities == type(tier.inner).capabilities and type(tier).capabilities.host_views
    assert tier.capabilities == tier.inner.capabilities
    assert tier.recovered() == [] and tier.integrity_failures == 0
    assert tier.usage() == tier.inner.usage()
    tier.close()
    with pytest.raises(ClosedError):
        tier.inner.contains(keys(1))


def test_recovered_blocks_of_a_persistent_inner_tier_are_forwarded(tmp_path: Path) -> None:
    inner = {**dram(tmp_path), "pool_name": "faulty-test"}
    tier = FaultyTier(FaultyTierOptions(inner=inner))
    assert tier.capabilities.persistent, "a named dram pool is persistent, and the wrapper says so"
    ks = keys(3)
    assert tier.put(ks, blocks(3)) == [True] * 3
    tier.close()
    reopened = FaultyTier(FaultyTierOptions(inner=inner))
    try:
        assert sorted(reopened.recovered()) == sorted((key, BLOCK) for key in ks)
        assert reopened.integrity_failures == reopened.inner.integrity_failures == 0
    finally:
        reopened.close()


# -- (2) each fault does what it says -----------------------------------------------------------------

def test_bit_flips_change_one_bit_of_what_get_into_returns_never_the_stored_copy(make_tier) -> None:
    tier = make_tier(bit_flip_rate=1.0, seed=3)
    ks, bs = keys(6), blocks(6)
    assert tier.put(ks, bs) == [True] * 6
    hits, got = read(tier, ks)
    assert hits == [True] * 6
    assert [differing_bits(g, b) for g, b in zip(got, bs)] == [1] * 6
    assert read(tier.inner, ks) == ([True] * 6, bs), "the stored copy must stay intact"
    assert tier.faults == FaultCounts(calls=2, bit_flips=6)


def test_bit_flips_in_views_are_private_corrupted_copies(make_tier) -> None:
    tier = make_tier()
    ks, bs = keys(3), blocks(3)
    tier.put(ks, bs)
    tier.flip_next(2)
    views = tier.view(ks)
    assert [differing_bits(bytes(v), b) for v, b in zip(views, bs)] == [1, 1, 0]
    assert all(v.readonly for v in views)
    assert [bytes(v) for v in tier.inner.view(ks)] == bs
    assert [bytes(v) for v in tier.view(ks)] == bs, "forced flips are used up"
    assert tier.faults.bit_flips == 2


def test_misses_are_never_flipped(make_tier) -> None:
    tier = make_tier()
    ks, bs = keys(3), blocks(1)
    tier.put(ks[1:2], bs)
    tier.flip_next(1)
    dests = [bytearray(b"\x5a" * BLOCK) for _ in ks]
    assert tier.get_into(ks, dests) == [False, True, False]
    assert bytes(dests[0]) == bytes(dests[2]) == b"\x5a" * BLOCK
    assert differing_bits(bytes(dests[1]), bs[0]) == 1


def torn_prefix(stored: bytes, written: bytes) -> int:
    """The length of the intact prefix of a torn block, checking that the rest reads as zeros."""
    prefix = next((i for i, (s, w) in enumerate(zip(stored, written)) if s != w), len(written))
    assert prefix < len(written), "a torn block must not hold the whole block"
    assert stored[prefix:] == bytes(len(written) - prefix), "after the prefix a torn block reads as zeros"
    return prefix


def test_torn_puts_store_a_prefix_and_report_success(make_tier) -> None:
    tier = make_tier(torn_write_rate=1.0, seed=5)
    ks, bs = keys(4), blocks(4)
    assert tier.put(ks, bs) == [True] * 4
    hits, stored = read(tier.inner, ks)
    assert hits == [True] * 4
    prefixes = [torn_prefix(s, b) for s, b in zip(stored, bs)]
    assert len(set(prefixes)) > 1, "prefix lengths are random"
    assert tier.put(ks[:1], bs[:1]) == [True], "a block already stored is not written again, so not torn"
    assert tier.faults.torn_writes == 4


def test_torn_commit_keeps_a_prefix_of_what_was_written(make_tier) -> None:
    tier = make_tier()
    ks, bs = keys(2), blocks(2)
    tier.tear_next(1)
    views = tier.reserve(ks, BLOCK)
    for view, block in zip(views, bs):
        view[:] = block
    tier.commit(ks)
    _, stored = read(tier.inner, ks)
    torn_prefix(stored[0], bs[0])
    assert stored[1] == bs[1]
    assert tier.faults.torn_writes == 1


def test_injected_tier_errors(make_tier) -> None:
    tier = make_tier(error_rate=1.0)
    ks = keys(2)
    with pytest.raises(InjectedFault, match=r"^faulty tier \(dram\): injected error in put\(\)$") as info:
        tier.put(ks, blocks(2))
    assert isinstance(info.value, PegaflowError) and not isinstance(info.value, (TransportError, InvalidArgument))
    assert tier.inner.contains(ks) == [False, False], "a failed put stores nothing"
    for call in (lambda: tier.get_into(ks, [bytearray(BLOCK)] * 2), lambda: tier.contains(ks),
                 lambda: tier.view(ks), lambda: tier.reserve(ks, BLOCK), lambda: tier.commit(ks)):
        with pytest.raises(InjectedFault):
            call()
    assert tier.evict(ks) == 0 and tier.abort(ks) is None, "cleanup calls never fail"
    assert tier.faults.errors == 6


def test_fail_next_then_recovers(make_tier) -> None:
    tier = make_tier()
    ks, bs = keys(1), blocks(1)
    tier.put(ks, bs)
    tier.fail_next(1)
    with pytest.raises(InjectedFault, match="get_into"):
        read(tier, ks)
    assert read(tier, ks) == ([True], bs), "a retry succeeds"


def test_after_and_max_faults(make_tier) -> None:
    tier = make_tier(error_rate=1.0, after=3, max_faults=2)
    outcomes = []
    for _ in range(8):
        try:
            tier.contains(keys(1))
            outcomes.append("ok")
        except InjectedFault:
            outcomes.append("fault")
    assert outcomes == ["ok"] * 3 + ["fault"] * 2 + ["ok"] * 3
    assert tier.faults == FaultCounts(calls=8, errors=2)


def test_latency_delays_each_call(make_tier) -> None:
    tier = make_tier(latency=0.05)
    start = time.monotonic()
    tier.contains(keys(1))
    tier.put(keys(1), blocks(1))
    assert time.monotonic() - start >= 0.1


def test_seeds_reproduce_faults(make_tier) -> None:
    ks, bs = keys(40), blocks(40, 512)

    def run(seed: int) -> list[bytes]:
        tier = make_tier(seed=seed, bit_flip_rate=0.5)
        tier.put(ks, bs)
        return read(tier, ks, 512)[1] + read(tier, ks, 512)[1]

    first = run(7)
    assert first == run(7)
    assert first != run(8)
    assert first != bs + bs and sum(g != b for g, b in zip(first, bs + bs)) < 80


def test_closed_wrapper_reports_closed_not_injected_faults(make_tier) -> None:
    tier = make_tier()
    tier.fail_next(5)
    tier.close()
    tier.close()
    with pytest.raises(ClosedError):
        tier.contains(keys(1))


def test_wrap_a_tier_built_in_code(tmp_path: Path) -> None:
    from pegaflow_dram import DramTier

    inner = DramTier(DramTier.conformance_options(tmp_path, 1 << 20))
    with FaultyTier.wrap(inner, seed=2, bit_flip_rate=1.0) as tier:
        assert type(tier).capabilities.host_views and tier.inner is inner
        ks, bs = keys(1), blocks(1)
        tier.put(ks, bs)
        assert differing_bits(read(tier, ks)[1][0], bs[0]) == 1
    with pytest.raises(ClosedError):
        inner.contains(ks)
    with pytest.raises(InvalidArgument, match=r"^drop_rate: not a fault option of FaultOptions; known: seed, "):
        FaultyTier.wrap(DramTier(DramTier.conformance_options(tmp_path, 1 << 20)), drop_rate=0.5)
    with pytest.raises(InvalidArgument, match=r"^error_rate: expected a probability from 0 to 1, got 1\.5$"):
        FaultyTierOptions(inner=dram(tmp_path), error_rate=1.5)
    with pytest.raises(InvalidArgument, match=r"^n: expected an integer >= 0, got -1$"):
        FaultyTier(FaultyTierOptions(inner=dram(tmp_path))).flip_next(-1)


# -- transports --

@pytest.fixture
def endpoints() -> Iterator[tuple[FaultyTransport, LoopbackTransport]]:
    """A faulty endpoint A and a plain endpoint B."""
    a, b = FaultyTransport.wrap(LoopbackTransport()), LoopbackTransport()
    yield a, b
    a.close()
    b.close()


def regions(a: Transport, b: Transport, size: int = 4 * BLOCK) -> tuple[bytearray, bytearray, Region, RemoteRegion]:
    local_buf, remote_buf = bytearray(b"\xee" * size), bytearray(os.urandom(size))
    local, remote = a.register(local_buf), b.register(remote_buf)
    return local_buf, remote_buf, local, RemoteRegion(b.address, remote.descriptor)


def test_transport_read_flips_one_bit_in_what_the_caller_receives(endpoints) -> None:
    a, b = endpoints
    local_buf, remote_buf, local, remote = regions(a, b)
    original = bytes(remote_buf)
    ops = [TransferOp(local, i * BLOCK, remote, i * BLOCK, BLOCK) for i in range(4)]
    a.flip_next(1)
    a.read(ops).result(10)
    assert differing_bits(bytes(local_buf), original) == 1
    assert bytes(remote_buf) == original
    a.read(ops).result(10)
    assert bytes(local_buf) == original, "a retry succeeds"
    assert a.faults == FaultCounts(calls=2, bit_flips=1)


def test_transport_write_flips_a_private_copy(endpoints) -> None:
    a, b = endpoints
    local_buf, remote_buf, local, remote = regions(a, b)
    local_buf[:] = os.urandom(len(local_buf))
    sent = bytes(local_buf)
    a.flip_next(1)
    a.write([TransferOp(local, 0, remote, 0, len(local_buf))]).result(10)
    assert differing_bits(bytes(remote_buf), sent) == 1
    assert bytes(local_buf) == sent, "the sender's bytes are never touched"


def test_transport_torn_write_delivers_a_prefix_and_succeeds(endpoints) -> None:
    a, b = endpoints
    local_buf, remote_buf, local, remote = regions(a, b, BLOCK)
    local_buf[:] = os.urandom(BLOCK)
    before = bytes(remote_buf)
    a.tear_next(1)
    a.write([TransferOp(local, 0, remote, 0, BLOCK)]).result(10)
    prefix = next((i for i in range(BLOCK) if remote_buf[i] != local_buf[i]), BLOCK)
    assert prefix < BLOCK and bytes(remote_buf[prefix:]) == before[prefix:]
    assert a.faults.torn_writes == 1


def test_transport_drop_delivers_a_prefix_of_ops_then_fails(endpoints) -> None:
    a, b = endpoints
    local_buf, remote_buf, local, remote = regions(a, b)
    ops = [TransferOp(local, i * BLOCK, remote, i * BLOCK, BLOCK) for i in range(4)]
    for _ in range(3):
        local_buf[:] = b"\xee" * len(local_buf)
        a.drop_next(1)
        with pytest.raises(InjectedTransportError, match=r"connection dropped during read, after \d of its ops"):
            a.read(ops).result(10)
        delivered = [bytes(local_buf[i * BLOCK:(i + 1) * BLOCK]) == bytes(remote_buf[i * BLOCK:(i + 1) * BLOCK])
                     for i in range(4)]
        assert delivered == sorted(delivered, reverse=True) and not delivered[-1], "a prefix of the ops, never all"
    assert a.faults.drops == 3


def test_transport_errors(endpoints) -> None:
    a, b = endpoints
    a.fail_next(2)
    with pytest.raises(TransportError, match="injected error connecting"):
        a.connect(b.address)
    local_buf, _, local, remote = regions(a, b)
    future = a.write([TransferOp(local, 0, remote, 0, 16)])
    with pytest.raises(InjectedTransportError, match=r"^faulty transport: injected error in write of 1 ops$"):
        future.result(10)
    a.connect(b.address)
    a.read([TransferOp(local, 0, remote, 0, 16)]).result(10)
    assert a.faults.errors == 2


def test_transport_latency_delays_completion_not_the_caller(endpoints) -> None:
    a = FaultyTransport.wrap(LoopbackTransport(), latency=0.3)
    try:
        _, b = endpoints
        _, _, local, remote = regions(a, b)
        start = time.monotonic()
        future: Future[None] = a.read([TransferOp(local, 0, remote, 0, 64)])
        assert not future.done(), "read() returns at once; the latency is on the future"
        future.result(10)
        assert time.monotonic() - start >= 0.3
    finally:
        a.close()


def test_transport_bad_input_is_still_invalid_argument(endpoints) -> None:
    a, b = endpoints
    _, _, local, remote = regions(a, b, 64)
    a.tear_next(1)
    with pytest.raises(InvalidArgument):
        a.write([TransferOp(local, 60, remote, 0, 16)]).result(10)
    inner = LoopbackTransport()
    try:
        with pytest.raises(InvalidArgument, match=r"^drop_rat: not a fault option of TransportFaultOptions; known: .*drop_rate"):
            FaultyTransport.wrap(inner, drop_rat=0.5)
    finally:
        inner.close()


# -- (3) the YAML path ------------------------------------------------------------------------------

def test_faulty_is_a_builtin_tier_and_transport() -> None:
    registry = plugins.get_registry()
    assert registry.get("tier", "faulty") is FaultyTier
    assert registry.get("transport", "faulty") is FaultyTransport


def test_yaml_config_loads_shows_and_builds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text(textwrap.dedent(f"""\
        tiers:
          - kind: faulty
            name: chaos
            seed: 1
            bit_flip_rate: 0.01
            latency: 2ms
            inner: {{kind: dram, capacity: 4mb, chunk: 64kb, shm_dir: {tmp_path}, numa: null, pin: never}}
        transport: {{kind: faulty, drop_rate: 0.5, inner: {{kind: loopback}}}}
        """))
    config = load_config(path)
    tier = config.tiers[0]
    assert (tier.kind, tier.name, tier.options.seed, tier.options.latency) == ("faulty", "chaos", 1, 0.002)
    assert tier.options.component.kind == "dram" and tier.options.component.options.capacity == 4 << 20
    assert isinstance(config.transport.options, FaultyTransportOptions) and config.transport.options.drop_rate == 0.5
    assert parse_config(config.to_yaml(), "again") == config
    assert cli.main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "faulty" in out and "bit_flip_rate 0.01" in out and "inner {kind: dram, capacity: 4mb" in out
    assert "transport  faulty (drop_rate 0.5, inner {kind: loopback})" in out
    built = tier.build()
    try:
        assert isinstance(built, FaultyTier) and built.capabilities.host_views
    finally:
        built.close()


@pytest.mark.parametrize("body, message", [
    ("tiers: [{kind: faulty, inner: {kind: dram, capacity: lots}}]",
     r"tiers\[0\]\.inner\.capacity: expected a size like '30gb', '500mb' or a byte count, or 'auto', got 'lots'"),
    ("tiers: [{kind: faulty, inner: {kind: faulty, inner: {kind: dram, pin: sometimes}}}]",
     r"tiers\[0\]\.inner\.inner\.pin: expected one of 'auto', 'always', 'never', got 'sometimes'"),
    ("tiers: [{kind: faulty, inner: {kind: loopback}}]", r"tiers\[0\]\.inner\.kind: unknown tier kind 'loopback'"),
    ("tiers: [{kind: faulty}]", r"tiers\[0\]: missing required key 'inner' \(the wrapped tier: "),
    ("tiers: [{kind: faulty, error_rate: 2, inner: {kind: dram}}]",
     r"tiers\[0\]\.error_rate: expected a probability from 0 to 1, got 2$"),
    ("tiers: [{kind: faulty, drop_rate: 0.1, inner: {kind: dram}}]", r"tiers\[0\]: unknown key 'drop_rate'"),
    ("transport: {kind: faulty, inner: {kind: loopback, port: 70000}}",
     r"transport\.inner: loopback\.port: expected a port 0\.\.65535"),
    ("transport: {kind: faulty, inner: {kind: loopback, prot: 1}}",
     r"transport\.inner: unknown key 'prot' \(did you mean 'port'\?\)"),
])
def test_bad_nested_options_name_the_key_path(tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(body + "\n")
    with pytest.raises(ConfigError, match=r"^" + re.escape(str(path)) + ": " + message):
        load_config(path)
    assert cli.main(["config", "check", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


# -- (4) the contract suite catches the faults ------------------------------------------------------

@pytest.mark.parametrize("fault, must_fail", [
    ("bit_flip_rate=1.0", ["test_round_trip_each_block_size", "test_partial_hits_are_a_mask", "test_host_views_reserve_commit"]),
    ("torn_write_rate=1.0", ["test_round_trip_each_block_size", "test_put_copies_the_source", "test_host_views_reserve_commit"]),
])
def test_the_tier_contract_catches_injected_faults(pytester: pytest.Pytester, fault: str, must_fail: list[str]) -> None:
    pytester.makepyfile(test_faulty_dram=textwrap.dedent(f"""
        import pytest
        from pegaflow_conformance import TierContract
        from pegaflow_core.default_plugins.faulty import FaultyTier, FaultyTierOptions

        class TestFaultyDram(TierContract):
            @pytest.fixture
            def tier_factory(self, tmp_path):
                def factory(capacity_bytes):
                    inner = FaultyTier.conformance_options(tmp_path, capacity_bytes).inner
                    return FaultyTier(FaultyTierOptions(inner=inner, seed=1, {fault}))
                return factory
        """))
    result = pytester.runpytest_inprocess("-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-m", "not pegaflow_stateful",
                                          "-k", " or ".join(must_fail + ["test_contains", "test_evict_ignores_missing_keys"]))
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed") == len(must_fail), result.stdout.str()
    assert outcomes.get("passed") == 2, "the calls the fault does not touch still pass: " + result.stdout.str()
    result.stdout.fnmatch_lines([f"FAILED *TestFaultyDram::{name}*" for name in must_fail], consecutive=False)
