"""The config loader: sizes and durations, option validation, the top-level schema, the embedded
default, the seed's server flags and the YAML round trip. Error texts are pinned: they are the
interface a user reads."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pegaflow_core import config as config_module
from pegaflow_core import plugins
from pegaflow_core.backend import Availability, Backend
from pegaflow_core.config import (
    EMBEDDED_SOURCE,
    FLAGS_SOURCE,
    DaemonConfig,
    ServerConfig,
    config_from_server_flags,
    default_config_text,
    load_config,
    options_from_mapping,
    parse_config,
)
from pegaflow_core.errors import ConfigError, InvalidArgument, PluginError
from pegaflow_core.sizes import Duration, Size, parse_duration, parse_size

GIB = 1 << 30


# -- test-only backends, registered through a registry of our own -------------------------------

@dataclass(frozen=True)
class FakeDramOptions:
    capacity: Size | Literal["auto"] = field(default="auto", metadata={"help": "pool size; auto: some of free memory"})
    numa: int | Literal["auto"] | None = "auto"
    pool_name: str | None = None  # the embedded default names its pool


class FakeDram(Backend):
    kind = "dram"
    Options = FakeDramOptions

    def __init__(self, options: FakeDramOptions) -> None:
        self.options = options


@dataclass(frozen=True)
class DiskOptions:
    path: str = field(metadata={"help": "directory of the block files"})
    capacity: Size = field(metadata={"help": "bytes the tier may use"})
    sync: Literal["always", "batch", "never"] = "batch"
    flush_every: Duration = Duration(0.5)
    devices: tuple[str, ...] = ()
    weights: list[float] = field(default_factory=list)
    label: str | None = None

    def __post_init__(self) -> None:
        if self.path == "/":
            raise InvalidArgument("path: refusing to fill the root directory")


class FakeDisk(Backend):
    kind = "disk"
    Options = DiskOptions

    def __init__(self, options: DiskOptions) -> None:
        self.options = options


class FakeLocal(Backend):
    kind = "local"


class FakeLoopback(Backend):
    kind = "loopback"


class FakeRdma(Backend):
    kind = "rdma"

    @classmethod
    def availability(cls) -> Availability:
        return Availability(False, "pyverbs is not installed")


class FakeFlaky(Backend):
    kind = "flaky"

    @classmethod
    def availability(cls) -> Availability:
        raise RuntimeError("probe crashed")


@dataclass(frozen=True)
class ClashingOptions:
    name: str = "x"


class FakeClashing(Backend):
    kind = "clashing"
    Options = ClashingOptions


def make_registry() -> plugins.Registry:
    registry = plugins.Registry()
    for role, cls in [
        ("tier", FakeDram), ("tier", FakeDisk), ("tier", FakeFlaky), ("tier", FakeClashing),
        ("index", FakeLocal), ("transport", FakeLoopback), ("transport", FakeRdma),
    ]:
        registry.add(plugins.PluginRecord(role, cls.kind, cls, "tests", "pegaflow-tests", "9.9"))
    return registry


@pytest.fixture(autouse=True)
def registry(monkeypatch: pytest.MonkeyPatch) -> plugins.Registry:
    """Every test sees only the fake backends, whatever is installed."""
    registry = make_registry()
    monkeypatch.setattr(plugins, "get_registry", lambda reload=False: registry)
    return registry


def parse(text: str, source: str = "stack.yaml") -> DaemonConfig:
    return parse_config(text, source)


# -- sizes and durations ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, nbytes", [
    ("30gb", 30 * GIB), ("500mb", 500 << 20), ("1.5tb", int(1.5 * (1 << 40))), ("4096", 4096), (4096, 4096),
    ("64KiB", 64 << 10), ("2g", 2 * GIB), (" 1 GB ", GIB), (0, 0),
])
def test_sizes(text: Any, nbytes: int) -> None:
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("bad", ["lots", "-1gb", "30 gigs", True, None, 1.5, -1])
def test_bad_sizes(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="size"):
        parse_size(bad)


@pytest.mark.parametrize("text, seconds", [
    (30, 30.0), (1.5, 1.5), ("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), ("45", 45.0), ("0.25s", 0.25),
])
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["soon", "-1s", "5 days", True, None, -3, float("inf"), float("nan")])
def test_bad_durations(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="duration"):
        parse_duration(bad)


# -- options_from_mapping --------------------------------------------------------------------------

def disk(**options: Any) -> DiskOptions:
    return options_from_mapping(DiskOptions, {"path": "/data", "capacity": "1gb", **options}, file="f.yaml", path="tiers[2]")


def test_options_coerce_every_supported_type() -> None:
    options = disk(capacity="1.5tb", sync="always", flush_every="250ms", devices=["nvme0", "nvme1"],
                   weights=[1, 2.5], label=None)
    assert options == DiskOptions("/data", int(1.5 * (1 << 40)), "always", 0.25, ("nvme0", "nvme1"), [1.0, 2.5], None)
    assert isinstance(options.devices, tuple) and isinstance(options.weights, list)
    assert disk(capacity=4096, flush_every=2).flush_every == 2.0
    assert disk().sync == "batch"  # defaults fill what is left out


def test_union_with_literal_and_none() -> None:
    def dram(**options: Any) -> FakeDramOptions:
        return options_from_mapping(FakeDramOptions, options, file="f.yaml", path="tiers[0]")

    assert dram(capacity="auto").capacity == "auto"
    assert dram(capacity="30gb").capacity == 30 * GIB
    assert dram(numa=None).numa is None
    assert dram(numa=1).numa == 1
    assert options_from_mapping(FakeDramOptions, None, file="f.yaml", path="tiers[0]") == FakeDramOptions()
    with pytest.raises(ConfigError, match=r"^f\.yaml: tiers\[0\]\.capacity: expected a size like '30gb', '500mb' "
                                          r"or a byte count, or 'auto', got 'lots'$"):
        dram(capacity="lots")
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.numa: expected an integer or 'auto' or null, got 'near'"):
        dram(numa="near")


@pytest.mark.parametrize("key, value, message", [
    ("capacity", "lots", r"tiers\[2\]\.capacity: expected a size like '30gb', '500mb' or a byte count, got 'lots'"),
    ("capacity", True, r"tiers\[2\]\.capacity: expected a size like '30gb'.*, got true"),
    ("sync", "sometimes", r"tiers\[2\]\.sync: expected one of 'always', 'batch', 'never', got 'sometimes'"),
    ("flush_every", "soon", r"tiers\[2\]\.flush_every: expected a duration like '30s', '500ms', '2m' or seconds, got 'soon'"),
    ("path", 5, r"tiers\[2\]\.path: expected a string, got 5"),
    ("devices", "nvme0", r"tiers\[2\]\.devices: expected a list, each item a string, got 'nvme0'"),
    ("devices", ["nvme0", 7], r"tiers\[2\]\.devices\[1\]: expected a string, got 7"),
    ("weights", [True], r"tiers\[2\]\.weights\[0\]: expected a number, got true"),
    ("label", {"a": 1}, r"tiers\[2\]\.label: expected a string or null, got a mapping"),
])
def test_option_type_errors(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^f\.yaml: " + message + "$") as info:
        disk(**{key: value})
    assert info.value.file == "f.yaml" and info.value.path.startswith(f"tiers[2].{key}")


def test_bools_are_not_integers() -> None:
    @dataclass(frozen=True)
    class Counts:
        count: int = 1
        ratio: float = 1.0
        flag: bool = False

    def load(**values: Any) -> Counts:
        return options_from_mapping(Counts, values, file="f.yaml", path="index")

    with pytest.raises(ConfigError, match=r"index\.count: expected an integer, got true"):
        load(count=True)
    with pytest.raises(ConfigError, match=r"index\.ratio: expected a number, got false"):
        load(ratio=False)
    with pytest.raises(ConfigError, match=r"index\.flag: expected true or false, got 1"):
        load(flag=1)
    with pytest.raises(ConfigError, match=r"index\.count: expected an integer, got 1\.5"):
        load(count=1.5)
    assert load(count=3, ratio=2, flag=True) == Counts(3, 2.0, True)


def test_unknown_key_suggests_a_close_match() -> None:
    with pytest.raises(ConfigError, match=r"^f\.yaml: tiers\[2\]: unknown key 'capcity' \(did you mean 'capacity'\?\); "
                                          r"valid keys: path, capacity, sync, flush_every, devices, weights, label$"):
        disk(capcity="1gb")
    with pytest.raises(ConfigError, match=r"unknown key 'colour'; valid keys: path,") as info:
        disk(colour="blue")
    assert "did you mean" not in str(info.value)


def test_missing_required_keys_are_listed_with_their_help() -> None:
    with pytest.raises(ConfigError, match=r"^f\.yaml: tiers\[2\]: missing required keys 'path' \(directory of the "
                                          r"block files\), 'capacity' \(bytes the tier may use\)$"):
        options_from_mapping(DiskOptions, {}, file="f.yaml", path="tiers[2]")
    with pytest.raises(ConfigError, match=r"missing required key 'capacity' \("):
        options_from_mapping(DiskOptions, {"path": "/d"}, file="f.yaml", path="tiers[2]")


def test_options_must_be_a_mapping_with_string_keys() -> None:
    with pytest.raises(ConfigError, match=r"^f\.yaml: tiers\[2\]: expected a mapping of options, got a list$"):
        options_from_mapping(DiskOptions, [1], file="f.yaml", path="tiers[2]")
    with pytest.raises(ConfigError, match=r"tiers\[2\]: keys must be strings, got 3"):
        options_from_mapping(DiskOptions, {3: "x"}, file="f.yaml", path="tiers[2]")


def test_dataclass_checks_become_config_errors_at_the_component() -> None:
    with pytest.raises(ConfigError, match=r"^f\.yaml: tiers\[2\]: path: refusing to fill the root directory$"):
        disk(path="/")


def test_check_metadata_runs_on_the_coerced_value() -> None:
    def even(value: int) -> None:
        if value % 2:
            raise ValueError(f"expected an even number, got {value}")

    @dataclass(frozen=True)
    class Checked:
        slots: int = field(default=2, metadata={"check": even})
        spare: int | None = field(default=None, metadata={"check": even})

    assert options_from_mapping(Checked, {"slots": 4, "spare": None}, file="f.yaml", path="x").slots == 4
    with pytest.raises(ConfigError, match=r"^f\.yaml: x\.slots: expected an even number, got 3$"):
        options_from_mapping(Checked, {"slots": 3}, file="f.yaml", path="x")


def test_backend_author_mistakes_are_plugin_errors() -> None:
    @dataclass(frozen=True)
    class Unsupported:
        table: dict[int, str] = field(default_factory=dict)  # YAML mappings of options have string keys

    with pytest.raises(PluginError, match=r"Unsupported\.table: unsupported option type"):
        options_from_mapping(Unsupported, {}, file="f.yaml", path="x")

    class NotADataclass:
        pass

    with pytest.raises(PluginError, match="frozen dataclass"):
        options_from_mapping(NotADataclass, {}, file="f.yaml", path="x")


def test_mapping_options_check_keys_and_values_and_round_trip() -> None:
    @dataclass(frozen=True)
    class Mapped:
        limits: dict[str, Size] = field(default_factory=dict)
        extra: dict[str, Any] = field(default_factory=dict)

    got = options_from_mapping(Mapped, {"limits": {"hot": "1kb"}, "extra": {"kind": "x", "n": [1]}}, file="f.yaml", path="x")
    assert got.limits == {"hot": 1024} and got.extra == {"kind": "x", "n": [1]}
    with pytest.raises(ConfigError, match=r"^f\.yaml: x\.limits\.hot: expected a size like '30gb', '500mb' or a byte count, got 'big'$"):
        options_from_mapping(Mapped, {"limits": {"hot": "big"}}, file="f.yaml", path="x")
    with pytest.raises(ConfigError, match=r"^f\.yaml: x\.extra: expected a mapping, got a list$"):
        options_from_mapping(Mapped, {"extra": [1]}, file="f.yaml", path="x")
    with pytest.raises(ConfigError, match=r"^f\.yaml: x\.extra: expected a mapping with string keys, got 3$"):
        options_from_mapping(Mapped, {"extra": {3: "three"}}, file="f.yaml", path="x")
    assert config_module._plain(dict[str, Size], got.limits) == {"hot": "1kb"}
    assert config_module._yaml_value(config_module._plain(dict[str, Any], {"kind": "x", "a": 1})) == "{kind: x, a: 1}"


@dataclass(frozen=True)
class WrapperOptions:
    """Options of a test backend that wraps another tier, the way ``faulty`` does."""

    inner: dict[str, Any] = field(metadata={"help": "the wrapped tier"})
    inner_config: Any = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        inner = config_module.component_from_mapping("tier", self.inner, file=None, path="inner")
        object.__setattr__(self, "inner_config", inner)


class FakeWrapper(Backend):
    kind = "wrapper"
    Options = WrapperOptions


def test_nested_components_are_validated_with_their_full_key_path(registry: plugins.Registry) -> None:
    registry.add(plugins.PluginRecord("tier", "wrapper", FakeWrapper, "tests", "pegaflow-tests", "9.9"))
    config = parse("tiers:\n  - kind: wrapper\n    inner: {kind: dram, capacity: 1gb}\n")
    inner = config.tiers[0].options.inner_config
    assert (inner.role, inner.kind, inner.cls, inner.options.capacity) == ("tier", "dram", FakeDram, GIB)
    assert config.tiers[0].option_items() == [("inner", "{kind: dram, capacity: 1gb}")]
    assert parse(config.to_yaml()) == config
    for inner_text, message in [
        ("{kind: dram, capacity: lots}", r"tiers\[0\]\.inner\.capacity: expected a size like '30gb'.*got 'lots'$"),
        ("{kind: ssd}", r"tiers\[0\]\.inner\.kind: unknown tier kind 'ssd'; installed: "),
        ("{capacity: 1gb}", r"tiers\[0\]\.inner: missing required key 'kind'"),
        ("{kind: dram, name: hot}", r"tiers\[0\]\.inner: unknown key 'name'"),
        ("{kind: rdma}", r"tiers\[0\]\.inner\.kind: unknown tier kind 'rdma'"),
        ("{kind: wrapper, inner: {kind: dram, numa: near}}", r"tiers\[0\]\.inner\.inner\.numa: expected an integer"),
        ("[dram]", r"tiers\[0\]\.inner: expected a mapping, got a list$"),
    ]:
        with pytest.raises(ConfigError, match=r"^stack\.yaml: " + message):
            parse(f"tiers:\n  - kind: wrapper\n    inner: {inner_text}\n")


def test_nested_components_resolve_in_the_registry_the_config_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    mine = make_registry()
    mine.add(plugins.PluginRecord("tier", "wrapper", FakeWrapper, "tests", "pegaflow-tests", "9.9"))
    monkeypatch.setattr(plugins, "get_registry", lambda reload=False: plugins.Registry())
    config = parse_config("tiers: [{kind: wrapper, inner: {kind: disk, path: /x, capacity: 1gb}}]", "s.yaml", registry=mine)
    assert config.tiers[0].options.inner_config.cls is FakeDisk
    with pytest.raises(InvalidArgument, match=r"^role: expected one of 'tier', 'transport', 'index', got 'engine'$"):
        config_module.component_from_mapping("engine", {"kind": "x"}, file=None, path="inner")


# -- the embedded default ----------------------------------------------------------------------------

def test_embedded_default() -> None:
    config = load_config(None)
    assert config.source == EMBEDDED_SOURCE
    assert config.server == ServerConfig()
    assert (config.index.role, config.index.kind, config.index.cls) == ("index", "local", FakeLocal)
    [tier] = config.tiers
    assert (tier.kind, tier.name, tier.path, tier.options.capacity) == ("dram", "dram", "tiers[0]", "auto")
    assert config.transport is None


def test_default_yaml_server_section_matches_the_dataclass_defaults() -> None:
    """default.yaml documents the server defaults; they must not drift from ServerConfig's."""
    raw = yaml.safe_load(default_config_text())
    documented = options_from_mapping(ServerConfig, raw["server"], file="default.yaml", path="server")
    assert documented == ServerConfig()
    assert raw["index"] == {"kind": "local"} and raw["tiers"] == [{"kind": "dram", "capacity": "auto", "pool_name": "default"}]


def test_server_defaults() -> None:
    server = ServerConfig()
    assert (server.listen, server.metrics, server.device, server.lease_ttl, server.state_dir, server.local_socket) == (
        "127.0.0.1:50055", "127.0.0.1:9091", None, 30.0, "/dev/shm/pegaflow", "auto")
    assert server.node == socket.gethostname()


def test_sections_left_out_come_from_the_default() -> None:
    config = parse("server: {listen: 127.0.0.1:6000}\n")
    assert config.server.listen == "127.0.0.1:6000" and config.server.metrics == "127.0.0.1:9091"
    assert config.index.kind == "local" and [t.kind for t in config.tiers] == ["dram"]
    assert parse("") == load_config(None)
    assert parse("# nothing but a comment\n") == load_config(None)


# -- files and YAML --------------------------------------------------------------------------------

def test_load_config_from_a_file(tmp_path: Any) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text("tiers:\n  - {kind: dram, capacity: 30gb}\n")
    config = load_config(path)
    assert config.source == str(path) and config.tiers[0].options.capacity == 30 * GIB


def test_missing_file(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file$"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r": is a directory, expected a YAML file$"):
        load_config(tmp_path)


def test_file_that_is_not_utf8(tmp_path: Any) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00tiers")
    with pytest.raises(ConfigError, match=r"binary\.yaml: expected UTF-8 text"):
        load_config(path)


def test_yaml_syntax_error_names_line_and_column() -> None:
    with pytest.raises(ConfigError, match=r"^stack\.yaml: invalid YAML at line 2, column 1: found character '\\t' "
                                          r"that cannot start any token$") as info:
        parse("server:\n\tlisten: 127.0.0.1:1\n")
    assert info.value.file == "stack.yaml"
    with pytest.raises(ConfigError, match=r"^stack\.yaml: invalid YAML at line 2, column 15: mapping values are not allowed"):
        parse("tiers:\n  - kind: dram: x\n")


def test_duplicate_keys_are_errors_not_silently_merged() -> None:
    with pytest.raises(ConfigError, match=r"^stack\.yaml: invalid YAML at line 3, column 5: duplicate key 'capacity' "
                                          r"\(first given at line 2\)$"):
        parse("tiers:\n  - {kind: dram, capacity: 1gb,\n    capacity: 2gb}\n")


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"^stack\.yaml: expected a mapping with the keys server, index, tiers, "
                                          r"transport at the top level, got a list$"):
        parse("- kind: dram\n")
    with pytest.raises(ConfigError, match=r"got 'dram'$"):
        parse("dram\n")


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError, match=r"^stack\.yaml: unknown key 'tier' \(did you mean 'tiers'\?\); "
                                          r"valid keys: server, index, tiers, transport$"):
        parse("tier:\n  - {kind: dram}\n")


# -- server section ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("server: {listen: localhost}", r"server\.listen: expected host:port like '127\.0\.0\.1:50055' \(IPv6 as "
                                    r"'\[::1\]:50055'\) or 'unix:///path', got 'localhost'"),
    ("server: {listen: 'unix:relative.sock'}", r"server\.listen: expected a Unix socket as 'unix:///absolute/path', "
                                               r"got 'unix:relative\.sock'"),
    ("server: {listen: 'host:99999'}", r"server\.listen: expected host:port .*got 'host:99999'"),
    ("server: {listen: '::1:80'}", r"server\.listen: expected host:port .*got '::1:80'"),
    ("server: {listen: 50055}", r"server\.listen: expected a string, got 50055"),
    ("server: {metrics: off}", r"server\.metrics: expected host:port like '127\.0\.0\.1:9091', or null to disable "
                               r"metrics, got false"),
    ("server: {device: -1}", r"server\.device: expected an integer >= 0, got -1"),
    ("server: {device: gpu0}", r"server\.device: expected an integer or null, got 'gpu0'"),
    ("server: {lease_ttl: 0}", r"server\.lease_ttl: expected a value above 0, got 0\.0"),
    ("server: {lease_ttl: forever}", r"server\.lease_ttl: expected a duration like '30s'.*, got 'forever'"),
    ("server: {node: ''}", r"server\.node: expected a non-empty string, got ''"),
    ("server: {lisen: 1}", r"server: unknown key 'lisen' \(did you mean 'listen'\?\); valid keys: listen, metrics, "
                           r"device, lease_ttl, node, state_dir, local_socket$"),
    ("server: {local_socket: run/rpc.sock}", r"server\.local_socket: expected 'auto', an absolute path like "
                                             r"'/run/pegaflow/rpc\.sock', or null, got 'run/rpc\.sock'"),
    ("server: {local_socket: '/%s.sock'}" % ("x" * 110), r"server\.local_socket: a Unix socket path holds at most 107 "
                                                          r"bytes, got 116: '/x+\.sock'"),
    ("server: {local_socket: 7}", r"server\.local_socket: expected 'auto', an absolute path like "
                                  r"'/run/pegaflow/rpc\.sock', or null for none, got 7"),
    ("server: [1]", r"server: expected a mapping of options, got a list"),
])
def test_server_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^stack\.yaml: " + message):
        parse(text)


def test_server_values() -> None:
    server = parse("server: {listen: '[::1]:0', metrics: null, device: 1, lease_ttl: 500ms, node: n1, "
                   "state_dir: /run/pf, local_socket: /run/pf/rpc.sock}").server
    assert server == ServerConfig("[::1]:0", None, 1, 0.5, "n1", "/run/pf", "/run/pf/rpc.sock")
    assert parse("server: {local_socket: null}").server.local_socket is None


# -- components ------------------------------------------------------------------------------------

def test_tier_stack_with_names_options_and_transport() -> None:
    config = parse(
        "index: {kind: local}\n"
        "tiers:\n"
        "  - {kind: dram, capacity: 30gb, numa: 0}\n"
        "  - {kind: disk, name: nvme, path: /var/cache/pegaflow, capacity: 1tb}\n"
        "transport: {kind: loopback}\n"
    )
    dram, nvme = config.tiers
    assert (dram.name, dram.options) == ("dram", FakeDramOptions(30 * GIB, 0))
    assert (nvme.name, nvme.kind, nvme.path, nvme.options.capacity) == ("nvme", "disk", "tiers[1]", 1 << 40)
    assert config.transport is not None and config.transport.cls is FakeLoopback
    built = nvme.build()
    assert isinstance(built, FakeDisk) and built.options is nvme.options


def test_unknown_kind_lists_installed_kinds() -> None:
    with pytest.raises(ConfigError, match=r"^stack\.yaml: tiers\[1\]\.kind: unknown tier kind 'ssd'; "
                                          r"installed: clashing, disk, dram, flaky$") as info:
        parse("tiers:\n  - {kind: dram}\n  - {kind: ssd}\n")
    assert info.value.path == "tiers[1].kind"
    with pytest.raises(ConfigError, match=r"^stack\.yaml: index\.kind: unknown index kind 'redis'; installed: local$"):
        parse("index: {kind: redis}\n")


def test_unknown_kind_mentions_plugins_that_failed_to_load(registry: plugins.Registry) -> None:
    registry.broken.append(plugins.BrokenPlugin("ssd", "pegaflow-ssd", "ImportError: liburing.so.2"))
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.kind: unknown tier kind 'ssd'; installed: .*; plugin 'ssd' "
                                          r"failed to load: ImportError: liburing\.so\.2"):
        parse("tiers: [{kind: ssd}]\n")


def test_component_shape_errors() -> None:
    with pytest.raises(ConfigError, match=r"^stack\.yaml: tiers\[0\]: missing required key 'kind' \(installed tier "
                                          r"kinds: clashing, disk, dram, flaky\)$"):
        parse("tiers: [{capacity: 1gb}]\n")
    with pytest.raises(ConfigError, match=r"^stack\.yaml: tiers\[0\]: expected a mapping with a 'kind' key, got 'dram'$"):
        parse("tiers: [dram]\n")
    with pytest.raises(ConfigError, match=r"^stack\.yaml: tiers\[0\]\.kind: expected a tier kind \(a string\), got 3$"):
        parse("tiers: [{kind: 3}]\n")
    with pytest.raises(ConfigError, match=r"^stack\.yaml: index: expected a mapping with a 'kind' key, got null$"):
        parse("index: null\n")
    with pytest.raises(ConfigError, match=r"^stack\.yaml: index: unknown key 'name'; valid keys: kind$"):
        parse("index: {kind: local, name: main}\n")


@pytest.mark.parametrize("text, message", [
    ("tiers: []", r"tiers: expected a non-empty list of tiers, each a mapping with a 'kind' key, got an empty list"),
    ("tiers: {kind: dram}", r"tiers: expected a non-empty list of tiers, .*, got a mapping"),
    ("tiers: null", r"tiers: expected a non-empty list of tiers, .*, got null"),
])
def test_tiers_must_be_a_non_empty_list(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^stack\.yaml: " + message + "$"):
        parse(text)


def test_duplicate_tier_names() -> None:
    with pytest.raises(ConfigError, match=r"^stack\.yaml: tiers\[1\]: duplicate tier name 'dram' \(tiers\[0\] is also "
                                          r"named 'dram', the default being the kind\); add `name:` to tell them apart$"):
        parse("tiers: [{kind: dram}, {kind: dram}]\n")
    with pytest.raises(ConfigError, match=r"^stack\.yaml: tiers\[1\]\.name: tier name 'fast' is already used by "
                                          r"tiers\[0\]; tier names must be unique$"):
        parse("tiers: [{kind: dram, name: fast}, {kind: dram, name: fast}]\n")
    config = parse("tiers: [{kind: dram}, {kind: dram, name: dram2}]\n")
    assert [t.name for t in config.tiers] == ["dram", "dram2"]


@pytest.mark.parametrize("name", ["", "has space", "-dash-first", 7])
def test_bad_tier_names(name: Any) -> None:
    with pytest.raises(ConfigError, match=r"^stack\.yaml: tiers\[0\]\.name: expected a name of letters, digits, "
                                          r"'-', '_' or '\.', got "):
        parse(yaml.safe_dump({"tiers": [{"kind": "dram", "name": name}]}))


def test_unknown_option_of_a_backend_lists_kind_name_and_options() -> None:
    with pytest.raises(ConfigError, match=r"^stack\.yaml: tiers\[0\]: unknown key 'capcity' \(did you mean "
                                          r"'capacity'\?\); valid keys: kind, name, capacity, numa, pool_name$"):
        parse("tiers: [{kind: dram, capcity: 1gb}]\n")


def test_unavailable_backend() -> None:
    with pytest.raises(ConfigError, match=r"^stack\.yaml: transport: backend 'rdma' is unavailable on this machine: "
                                          r"pyverbs is not installed$"):
        parse("transport: {kind: rdma}\n")
    with pytest.raises(ConfigError, match=r"^stack\.yaml: tiers\[0\]: backend 'flaky' is unavailable on this machine: "
                                          r"availability check raised RuntimeError\('probe crashed'\)$"):
        parse("tiers: [{kind: flaky}]\n")


def test_option_named_like_a_reserved_key_is_a_plugin_bug() -> None:
    with pytest.raises(PluginError, match=r"FakeClashing\.Options declares 'name', which the config reserves"):
        parse("tiers: [{kind: clashing}]\n")


def test_defaults_taken_from_the_embedded_config_are_blamed_on_it(registry: plugins.Registry) -> None:
    """If the default's dram tier is not installed, the error must not point into the user's file."""
    del registry._records[("tier", "dram")]
    with pytest.raises(ConfigError, match=r"^<embedded default>: tiers\[0\]\.kind: unknown tier kind 'dram'"):
        parse("server: {listen: 127.0.0.1:1}\n")


# -- round trip --------------------------------------------------------------------------------------

COMPLEX = """
server: {listen: '[::1]:7000', metrics: null, device: 3, lease_ttl: 1.25, node: 'node: #1', state_dir: /run/x}
index: {kind: local}
tiers:
  - {kind: dram, capacity: 12gb, numa: null}
  - {kind: disk, name: nvme, path: /var/cache/pegaflow, capacity: 1000, sync: never, flush_every: 2m,
     devices: [nvme0n1, 'a, b'], weights: [0.5, 1], label: "it's # not a comment"}
transport: {kind: loopback}
"""


@pytest.mark.parametrize("comments", [True, False])
def test_to_yaml_round_trips(comments: bool) -> None:
    for config in (load_config(None), parse(COMPLEX)):
        text = config.to_yaml(comments=comments)
        again = parse_config(text, "again.yaml")
        assert again == config
        assert again.to_yaml(comments=comments) == text.replace(config.source, "again.yaml")


def test_to_yaml_reads_like_a_hand_written_file() -> None:
    text = parse(COMPLEX).to_yaml()
    assert text.startswith("# effective pegaflow config, from stack.yaml\n")
    assert "    capacity: 12gb" in text  # exact sizes in units, odd ones in bytes
    assert "    capacity: 1000" in text
    assert "    flush_every: 120s" in text
    assert "  - kind: disk\n    name: nvme\n" in text and "  - kind: dram\n    capacity" in text
    assert "# pool size; auto: some of free memory" in text
    assert "lease_ttl: 1.25" in text and "transport:\n  kind: loopback" in text
    assert "#" not in parse(COMPLEX).to_yaml(comments=False).split("\n", 1)[1].replace("node: #1", "").replace(
        "# not a comment", "")


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(min_value=0, max_value=1 << 50), ttl=st.floats(min_value=0.001, max_value=1e6))
def test_round_trip_of_any_size_and_duration(capacity: int, ttl: float) -> None:
    config = parse(f"server: {{lease_ttl: {ttl!r}}}\ntiers: [{{kind: dram, capacity: {capacity}}}]\n")
    again = parse_config(config.to_yaml(), "again.yaml")
    assert again.tiers[0].options.capacity == capacity and again.server.lease_ttl == ttl


def test_option_items_for_summaries() -> None:
    nvme = parse(COMPLEX).tiers[1]
    assert dict(nvme.option_items())["capacity"] == "1000 B"
    assert dict(nvme.option_items())["flush_every"] == "120s"
    brief = dict(nvme.option_items(brief=True))
    assert brief["capacity"] == "1000 B" and brief["sync"] == "never" and "label" in brief
    assert dict(parse("tiers: [{kind: dram}]").tiers[0].option_items(brief=True)) == {"capacity": "auto"}


# -- the seed's server flags -------------------------------------------------------------------------

def test_server_flags_map_onto_the_default() -> None:
    config = config_from_server_flags("0.0.0.0:50055", 0, "30gb")
    assert config.source == FLAGS_SOURCE
    assert (config.server.listen, config.server.device) == ("0.0.0.0:50055", 0)
    assert [(t.kind, t.options.capacity) for t in config.tiers] == [("dram", 30 * GIB)]
    assert config.index.kind == "local" and config.transport is None
    assert config_from_server_flags("127.0.0.1:1", None, 1 << 20).tiers[0].options.capacity == 1 << 20
    assert config_from_server_flags("127.0.0.1:1", None, None).tiers[0].options.capacity == "auto"
    assert parse_config(config.to_yaml(), "x") == config


@pytest.mark.parametrize("addr, device, pool, message", [
    ("50055", None, None, r"^<command line>: --addr: expected host:port like '127\.0\.0\.1:50055'"),
    ("127.0.0.1:1", -1, None, r"^<command line>: --device: expected a CUDA device index >= 0, got -1$"),
    ("127.0.0.1:1", None, "lots", r"^<command line>: --pool-size: expected a size like '30gb'.*got 'lots'$"),
    ("127.0.0.1:1", None, "0gb", r"^<command line>: --pool-size: expected a size above 0, got 0$"),
])
def test_bad_server_flags_name_the_flag(addr: str, device: int | None, pool: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_server_flags(addr, device, pool)


def test_with_server_validates_like_yaml() -> None:
    config = load_config(None).with_server(listen="127.0.0.1:9", device=2)
    assert (config.server.listen, config.server.device, config.server.lease_ttl) == ("127.0.0.1:9", 2, 30.0)
    with pytest.raises(ConfigError, match=r"^<command line>: server\.listen: expected host:port"):
        load_config(None).with_server(listen="nowhere")


def test_explicit_registry_argument_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    def unused(reload: bool = False) -> plugins.Registry:
        raise AssertionError("the global registry must not be consulted")

    monkeypatch.setattr(plugins, "get_registry", unused)
    assert load_config(None, registry=make_registry()).tiers[0].cls is FakeDram


def test_configs_are_frozen_values() -> None:
    config = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.listen = "x"  # type: ignore[misc]
    assert config_module.DaemonConfig.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_docs_describe_every_server_key_and_section() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    for f in dataclasses.fields(ServerConfig):
        assert f"| `{f.name}` |" in docs, f"docs/config.md does not document server.{f.name}"
    for key in config_module.TOP_LEVEL_KEYS:
        assert f"`{key}`" in docs


def test_listen_accepts_a_unix_socket():
    config = parse_config("server: {listen: 'unix:///run/pegaflow.sock'}", "stack.yaml")
    assert config.server.listen == "unix:///run/pegaflow.sock"

