"""The daemon's config: one YAML file describing the server and its tier stack.

Everything is validated before anything is built, and every error names the file, the key path and
what would have been right (``stack.yaml: tiers[1].capacity: expected a size like '30gb', ...``),
because a daemon that starts on a half-understood config loses cache silently.

Backend options are not described here. Each backend class declares a frozen dataclass ``Options``
and :func:`options_from_mapping` checks the YAML against its field annotations, so a third-party
backend gets the same validation, error messages and ``pegaflow config show`` comments as ours by
writing nothing but the dataclass. Supported field types: ``int``, ``float``, ``bool``, ``str``,
:data:`~pegaflow_core.sizes.Size`, :data:`~pegaflow_core.sizes.Duration`, ``Literal[...]``, unions
of those (``Size | Literal['auto']``, ``int | None``), ``tuple[X, ...]``, ``list[X]``,
``dict[str, X]`` and ``Any``. A backend that wraps another one (such as ``faulty``) takes the inner
component as a ``dict[str, Any]`` option and validates it with :func:`component_from_mapping`.
Field metadata may carry ``help`` (shown in docs and ``config show``), ``expect`` (replaces the
type's description in errors) and ``check`` (a callable raising ``ValueError`` with the message).
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import difflib
import functools
import importlib.resources
import os
import re
import socket
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from . import plugins
from .backend import Availability, NoOptions
from .errors import ConfigError, InvalidArgument, PegaflowError, PluginError
from .sizes import Duration, Size, format_size, parse_duration, parse_size

EMBEDDED_SOURCE = "<embedded default>"
FLAGS_SOURCE = "<command line>"
TOP_LEVEL_KEYS = ("server", "index", "tiers", "transport")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

T = TypeVar("T")


# -- field checks used by ServerConfig (and available to backends) ------------------------------

def check_host_port(value: str) -> None:
    """Raise ValueError unless ``value`` is ``host:port`` (IPv6 hosts in brackets) or
    ``unix:///absolute/path`` (a Unix socket: the lowest-latency choice on one machine)."""
    if value.startswith("unix:"):
        if not value.startswith("unix:///") or len(value) <= len("unix:///"):
            raise ValueError(f"expected a Unix socket as 'unix:///absolute/path', got {value!r}")
        return
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if (
        not sep
        or not host
        or not port.isdigit()
        or int(port) > 65535
        or (":" in host and not bracketed)
        or host.startswith("[") != host.endswith("]")
    ):
        raise ValueError(
            f"expected host:port like '127.0.0.1:50055' (IPv6 as '[::1]:50055') or 'unix:///path', got {value!r}"
        )


# sun_path of struct sockaddr_un holds 108 bytes, the terminating NUL included.
MAX_UNIX_PATH = 107


def check_local_socket(value: str) -> None:
    """Raise ValueError unless ``value`` is ``auto`` or an absolute path short enough to bind."""
    if value == "auto":
        return
    if not value.startswith("/"):
        raise ValueError(f"expected 'auto', an absolute path like '/run/pegaflow/rpc.sock', or null, got {value!r}")
    if len(os.fsencode(value)) > MAX_UNIX_PATH:
        raise ValueError(f"a Unix socket path holds at most {MAX_UNIX_PATH} bytes, got {len(os.fsencode(value))}: {value!r}")


def check_non_negative(value: int) -> None:
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {value}")


def check_positive(value: float) -> None:
    if not value > 0:
        raise ValueError(f"expected a value above 0, got {value}")


def check_non_empty(value: str) -> None:
    if not value.strip():
        raise ValueError("expected a non-empty string, got ''")


# -- schema values -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerConfig:
    """Where the daemon listens and what it calls itself. Every field has a default."""

    listen: str = field(
        default="127.0.0.1:50055",
        metadata={"help": "gRPC control-plane address, host:port (port 0 picks a free one)", "check": check_host_port},
    )
    metrics: str | None = field(
        default="127.0.0.1:9091",
        metadata={
            "help": "Prometheus /metrics address, host:port; null disables it",
            "check": check_host_port,
            "expect": "host:port like '127.0.0.1:9091', or null to disable metrics",
        },
    )
    device: int | None = field(
        default=None,
        metadata={"help": "CUDA device index the daemon serves; null: host memory only", "check": check_non_negative},
    )
    lease_ttl: Duration = field(
        default=Duration(30.0),
        metadata={"help": "how long a query's hit blocks stay pinned if the engine never loads or releases them",
                  "check": check_positive},
    )
    node: str = field(
        default_factory=socket.gethostname,
        metadata={"help": "this machine's name in a cluster index and in metrics (default: the hostname)",
                  "check": check_non_empty},
    )
    state_dir: str = field(
        default="/dev/shm/pegaflow",
        metadata={"help": "where pool files and journals live, so a restarted daemon re-attaches its warm cache",
                  "check": check_non_empty},
    )
    local_socket: str | None = field(
        default="auto",
        metadata={
            "help": "Unix socket clients on this machine send Save/Query/Release/Health/Load to, bypassing gRPC: "
                    "'auto' (state_dir/rpc-<listen address>.sock), an absolute path, or null for none",
            "check": check_local_socket,
            "expect": "'auto', an absolute path like '/run/pegaflow/rpc.sock', or null for none",
        },
    )


@dataclass(frozen=True)
class ComponentConfig:
    """One configured backend: which class, with which validated options, from which key path."""

    role: str  # "tier", "index" or "transport" (the plugin registry's roles)
    kind: str
    name: str  # tiers: unique within the stack; index and transport: the kind
    cls: type
    options: Any  # an instance of cls.Options
    path: str  # where it came from, e.g. "tiers[0]", for errors raised when building it

    def build(self) -> Any:
        """Construct the backend. Errors here come from the backend itself (e.g. no memory)."""
        return self.cls(self.options)

    def option_items(self, *, brief: bool = False) -> list[tuple[str, str]]:
        """Options as readable text (sizes as ``30 GiB``), for summaries rather than for YAML.
        ``brief`` keeps what a person checks first: sizes, and options set away from their default."""
        hints = _hints(type(self.options))
        items = []
        for f in dataclasses.fields(self.options):
            if not f.init:
                continue
            value = getattr(self.options, f.name)
            if brief and not _mentions(hints[f.name], Size) and _is_default(f, value):
                continue
            items.append((f.name, _display(hints[f.name], value)))
        return items


@dataclass(frozen=True)
class DaemonConfig:
    """A whole, validated daemon config. ``source`` is the file it came from, or a marker such as
    ``<embedded default>``, so later errors can still say where a setting was made."""

    server: ServerConfig
    index: ComponentConfig
    tiers: tuple[ComponentConfig, ...]
    transport: ComponentConfig | None = None
    source: str = field(default=EMBEDDED_SOURCE, compare=False)  # equal settings are equal configs

    def with_server(self, *, source: str = FLAGS_SOURCE, **changes: Any) -> DaemonConfig:
        """A copy with server settings replaced (e.g. from command-line flags), validated like YAML;
        errors name ``source`` and the ``server.<key>`` path."""
        current = {f.name: getattr(self.server, f.name) for f in dataclasses.fields(ServerConfig)}
        server = options_from_mapping(ServerConfig, {**current, **changes}, file=source, path="server")
        return dataclasses.replace(self, server=server)

    def without_recovery(self) -> DaemonConfig:
        """A copy whose tiers start empty: every tier option named ``recover`` set to false
        (what ``pegaflow serve --cold`` does)."""
        tiers = []
        for tier in self.tiers:
            names = {f.name for f in dataclasses.fields(tier.options)}
            options = dataclasses.replace(tier.options, recover=False) if "recover" in names else tier.options
            tiers.append(dataclasses.replace(tier, options=options))
        return dataclasses.replace(self, tiers=tuple(tiers))

    def to_yaml(self, *, comments: bool = True) -> str:
        """The effective config as YAML that :func:`parse_config` reads back to an equal config.
        With ``comments``, each option carries its ``help`` text as a trailing comment."""
        lines = [f"# effective pegaflow config, from {self.source}"]
        lines.append("server:")
        lines += _mapping_lines(self.server, [], "  ", "  ", comments)
        lines.append("index:")
        lines += _component_lines(self.index, "  ", "  ", comments)
        lines.append("tiers:")
        for tier in self.tiers:
            lines += _component_lines(tier, "  - ", "    ", comments)
        if self.transport is None:
            lines.append("transport: null")
        else:
            lines.append("transport:")
            lines += _component_lines(self.transport, "  ", "  ", comments)
        return "\n".join(lines) + "\n"


# -- loading -------------------------------------------------------------------------------------

def load_config(path: str | os.PathLike[str] | None, *, registry: plugins.Registry | None = None) -> DaemonConfig:
    """Read and validate a config file; ``None`` gives the embedded default."""
    if path is None:
        return parse_config(_default_text(), EMBEDDED_SOURCE, registry=registry)
    file = os.fspath(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", file=file) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, expected a YAML file", file=file) from None
    except UnicodeDecodeError:
        raise ConfigError("expected UTF-8 text, the file is not", file=file) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", file=file) from None
    return parse_config(text, file, registry=registry)


def parse_config(text: str, source: str, *, registry: plugins.Registry | None = None) -> DaemonConfig:
    """Validate YAML ``text``; ``source`` names it in errors. Sections left out (``index``,
    ``tiers``) come from the embedded default; an empty document is the embedded default."""
    return _build(_load_yaml(text, source), source, registry)


def config_from_server_flags(
    addr: str,
    device: int | None,
    pool_size: str | int | None,
    *,
    registry: plugins.Registry | None = None,
) -> DaemonConfig:
    """The seed's ``pegaflow-server --addr --device --pool-size`` flags, as the embedded default
    with ``server.listen``, ``server.device`` and the DRAM tier's capacity replaced. ``pool_size``
    None keeps the default (``auto``). Errors name the flag."""
    try:
        check_host_port(addr)
    except ValueError as exc:
        raise ConfigError(str(exc), file=FLAGS_SOURCE, path="--addr") from None
    if device is not None and (not isinstance(device, int) or isinstance(device, bool) or device < 0):
        raise ConfigError(f"expected a CUDA device index >= 0, got {device!r}", file=FLAGS_SOURCE, path="--device")
    raw = copy.deepcopy(_default_raw())
    raw["server"] = {**(raw.get("server") or {}), "listen": addr, "device": device}
    if pool_size is not None:
        try:
            nbytes = parse_size(pool_size)
        except InvalidArgument as exc:
            raise ConfigError(str(exc), file=FLAGS_SOURCE, path="--pool-size") from None
        if nbytes == 0:
            raise ConfigError("expected a size above 0, got 0", file=FLAGS_SOURCE, path="--pool-size")
        dram = [tier for tier in raw["tiers"] if tier.get("kind") == "dram"]
        if not dram:
            raise ConfigError("the embedded default has no dram tier for --pool-size to size",
                              file=FLAGS_SOURCE, path="--pool-size")
        for tier in dram:
            tier["capacity"] = nbytes
    return _build(raw, FLAGS_SOURCE, registry)


def component_from_mapping(
    role: str, mapping: Any, *, file: str | None, path: str, registry: plugins.Registry | None = None
) -> ComponentConfig:
    """Validate one ``{kind: ..., <options>}`` mapping of ``role`` ("tier", "transport" or "index")
    exactly as a top-level component is validated (kind installed and available, every option), and
    return it unbuilt; ``.build()`` constructs it. ``name`` is not accepted: only the stack's tiers
    have names.

    This is for backends that wrap another backend: their ``Options.__post_init__`` calls it with
    ``file=None`` and a path relative to their own mapping (``path="inner"``), and
    :func:`options_from_mapping` re-anchors the resulting ConfigError under the wrapper's own file
    and path, so the user reads ``stack.yaml: tiers[0].inner.capacity: expected a size ...``.
    ``registry`` defaults to the one the config being loaded uses, else the process-wide one."""
    if role not in _COMPONENT_ROLES:
        raise InvalidArgument(f"role: expected one of {', '.join(map(repr, _COMPONENT_ROLES))}, got {role!r}")
    resolver = _Resolver(registry if registry is not None else _registry_in_use.get())
    return resolver.component(mapping, role=role, path=path, file=file, named=False)


def options_from_mapping(options_cls: type[T], mapping: Any, *, file: str | None, path: str) -> T:
    """Validate a YAML mapping against the fields of the frozen dataclass ``options_cls`` and build
    it. ``file`` and ``path`` (e.g. ``tiers[1]``) locate the mapping for error messages; a null
    mapping means "all defaults". Raises ConfigError for the user's mistakes and PluginError when
    the dataclass itself uses a field type the loader does not understand.

    A ConfigError raised by the dataclass's ``__post_init__`` without a file (a nested component
    validated with :func:`component_from_mapping`) names a path relative to this mapping; it is
    re-raised with ``file`` and with ``path`` prefixed."""
    if not (isinstance(options_cls, type) and dataclasses.is_dataclass(options_cls)):
        raise PluginError(f"{options_cls!r} is not a dataclass; backend Options must be a frozen dataclass")
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"expected a mapping of options, got {_show(mapping)}", file=file, path=path)
    hints = _hints(options_cls)
    fields = {f.name: f for f in dataclasses.fields(options_cls) if f.init}
    for name in fields:
        _expectation(hints[name], where=f"{options_cls.__qualname__}.{name}")
    _reject_unknown(mapping, list(fields), file, path)
    missing = [
        name for name, f in fields.items()
        if name not in mapping and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        listed = ", ".join(
            repr(name) + (f" ({fields[name].metadata['help']})" if "help" in fields[name].metadata else "")
            for name in missing
        )
        raise ConfigError(f"missing required key{'s' if len(missing) > 1 else ''} {listed}", file=file, path=path)
    values: dict[str, Any] = {}
    for key, raw in mapping.items():
        spec = fields[key]
        where = _join(path, key)
        try:
            value = _coerce(hints[key], raw, where)
        except _Mismatch as bad:
            expected = spec.metadata.get("expect", bad.expected) if bad.path == where else bad.expected
            raise ConfigError(f"expected {expected}, got {_show(bad.value)}", file=file, path=bad.path) from None
        check: Callable[[Any], None] | None = spec.metadata.get("check")
        if check is not None and value is not None:
            try:
                check(value)
            except ValueError as exc:
                raise ConfigError(str(exc), file=file, path=where) from None
        values[key] = value
    try:
        return options_cls(**values)
    except ConfigError as exc:
        if exc.file is not None:
            raise
        nested = f"{path}{exc.path}" if exc.path.startswith("[") else _join(path, exc.path)
        raise ConfigError(exc.reason, file=file, path=nested) from None
    except PluginError:  # a nested backend's own bug; not the user's to fix
        raise
    except (ValueError, PegaflowError) as exc:  # the dataclass's own __post_init__ checks
        raise ConfigError(str(exc), file=file, path=path) from None


def default_config_text() -> str:
    """The embedded default config file, as shipped (with its comments)."""
    return _default_text()


# -- YAML ----------------------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` except that a key written twice in one mapping is an error: silently
    keeping the last one would hide half of a tier's settings."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key; SafeLoader reports it below
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given at line {first.line + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "not valid YAML"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"invalid YAML{where}: {problem}", file=source) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=source) from None


@functools.lru_cache(maxsize=1)
def _default_text() -> str:
    return importlib.resources.files("pegaflow_core").joinpath("default.yaml").read_text(encoding="utf-8")


def _default_raw() -> dict[str, Any]:
    raw = _load_yaml(_default_text(), EMBEDDED_SOURCE)
    assert isinstance(raw, dict), "default.yaml must be a mapping"
    return raw


# -- building ------------------------------------------------------------------------------------

_COMPONENT_ROLES = ("tier", "transport", "index")

#: The registry of the config being loaded, so that components nested inside another component's
#: options (validated from its ``__post_init__``) resolve their kinds where the outer one did.
_registry_in_use: contextvars.ContextVar[plugins.Registry | None] = contextvars.ContextVar(
    "pegaflow_config_registry", default=None
)


def _build(data: Any, source: str, registry: plugins.Registry | None) -> DaemonConfig:
    token = _registry_in_use.set(registry)
    try:
        return _build_sections(data, source, registry)
    finally:
        _registry_in_use.reset(token)


def _build_sections(data: Any, source: str, registry: plugins.Registry | None) -> DaemonConfig:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"expected a mapping with the keys {', '.join(TOP_LEVEL_KEYS)} at the top level, got {_show(data)}",
            file=source,
        )
    _reject_unknown(data, list(TOP_LEVEL_KEYS), source, "")
    defaults = _default_raw()

    def section(key: str) -> tuple[Any, str]:
        return (data[key], source) if key in data else (defaults.get(key), EMBEDDED_SOURCE)

    resolve = _Resolver(registry)
    server = options_from_mapping(ServerConfig, data.get("server"), file=source, path="server")
    raw_index, index_file = section("index")
    index = resolve.component(raw_index, role="index", path="index", file=index_file, named=False)

    raw_tiers, tiers_file = section("tiers")
    if not isinstance(raw_tiers, list) or not raw_tiers:
        raise ConfigError(
            f"expected a non-empty list of tiers, each a mapping with a 'kind' key, got {_show(raw_tiers)}",
            file=tiers_file, path="tiers",
        )
    tiers: list[ComponentConfig] = []
    for i, raw_tier in enumerate(raw_tiers):
        tier = resolve.component(raw_tier, role="tier", path=f"tiers[{i}]", file=tiers_file, named=True)
        earlier = next((t for t in tiers if t.name == tier.name), None)
        if earlier is not None:
            explicit = isinstance(raw_tier, Mapping) and "name" in raw_tier
            if explicit:
                message = f"tier name {tier.name!r} is already used by {earlier.path}; tier names must be unique"
            else:
                message = (f"duplicate tier name {tier.name!r} ({earlier.path} is also named {tier.name!r}, "
                           f"the default being the kind); add `name:` to tell them apart")
            raise ConfigError(message, file=tiers_file, path=f"{tier.path}.name" if explicit else tier.path)
        tiers.append(tier)

    raw_transport, transport_file = section("transport")
    transport = None
    if raw_transport is not None:
        transport = resolve.component(raw_transport, role="transport", path="transport", file=transport_file, named=False)
    return DaemonConfig(server, index, tuple(tiers), transport, source)


class _Resolver:
    """Turns one ``{kind: ..., ...}`` mapping into a ComponentConfig; loads the plugin registry
    only when the first component needs it."""

    def __init__(self, registry: plugins.Registry | None) -> None:
        self._registry = registry

    @property
    def registry(self) -> plugins.Registry:
        if self._registry is None:
            self._registry = plugins.get_registry()
        return self._registry

    def component(self, raw: Any, *, role: str, path: str, file: str, named: bool) -> ComponentConfig:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"expected a mapping with a 'kind' key, got {_show(raw)}", file=file, path=path)
        if "kind" not in raw:
            installed = ", ".join(self.registry.kinds(role)) or "none"
            raise ConfigError(f"missing required key 'kind' (installed {role} kinds: {installed})", file=file, path=path)
        kind = raw["kind"]
        if not isinstance(kind, str):
            raise ConfigError(f"expected a {role} kind (a string), got {_show(kind)}", file=file, path=f"{path}.kind")
        try:
            cls = self.registry.get(role, kind)
        except PluginError as exc:
            raise ConfigError(str(exc), file=file, path=f"{path}.kind") from None
        availability = _availability(cls)
        if not availability.ok:
            raise ConfigError(
                f"backend {kind!r} is unavailable on this machine: {availability.detail or 'no reason given'}",
                file=file, path=path,
            )
        options_cls = getattr(cls, "Options", NoOptions)
        reserved = ["kind", "name"] if named else ["kind"]
        option_names = [f.name for f in dataclasses.fields(options_cls) if f.init] if dataclasses.is_dataclass(options_cls) else []
        clash = [name for name in option_names if name in reserved]
        if clash:
            raise PluginError(
                f"{cls.__qualname__}.Options declares {clash[0]!r}, which the config reserves for the "
                f"{role} itself; rename the option"
            )
        _reject_unknown(raw, reserved + option_names, file, path)
        name = kind
        if named and "name" in raw:
            name = raw["name"]
            if not isinstance(name, str) or not NAME_RE.match(name):
                raise ConfigError(
                    f"expected a name of letters, digits, '-', '_' or '.', got {_show(name)}",
                    file=file, path=f"{path}.name",
                )
        options = options_from_mapping(
            options_cls, {k: v for k, v in raw.items() if k not in reserved}, file=file, path=path
        )
        return ComponentConfig(role, kind, name, cls, options, path)


def _availability(cls: type) -> Availability:
    probe = getattr(cls, "availability", None)
    if probe is None:
        return Availability(True)
    try:
        result = probe()
    except Exception as exc:  # a probe must never take config loading down with a traceback
        return Availability(False, f"availability check raised {exc!r}")
    return result if isinstance(result, Availability) else Availability(bool(getattr(result, "ok", True)),
                                                                          str(getattr(result, "detail", "")))


def _reject_unknown(mapping: Mapping[Any, Any], valid: list[str], file: str | None, path: str) -> None:
    for key in mapping:
        if not isinstance(key, str):
            raise ConfigError(f"keys must be strings, got {_show(key)}", file=file, path=path)
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown key {key!r}{hint}; valid keys: {', '.join(valid) or 'none'}", file=file, path=path
            )


# -- types ---------------------------------------------------------------------------------------

class _Mismatch(Exception):
    """A value does not fit a type: where (key path), what was expected, what was there."""

    def __init__(self, path: str, expected: str, value: Any) -> None:
        super().__init__(path)
        self.path = path
        self.expected = expected
        self.value = value


_NONE_TYPE = type(None)
_SCALARS: dict[Any, str] = {
    Size: "a size like '30gb', '500mb' or a byte count",
    Duration: "a duration like '30s', '500ms', '2m' or seconds",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    _NONE_TYPE: "null",
    Any: "any value",
}


def _hints(options_cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(options_cls)
    except Exception as exc:
        raise PluginError(f"cannot read the option types of {options_cls.__qualname__}: {exc!r}") from None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _expectation(tp: Any, *, where: str = "") -> str:
    """What a value of ``tp`` looks like, in words; PluginError for types the loader cannot read."""
    if tp in _SCALARS:
        return _SCALARS[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        choices = ", ".join(repr(choice) for choice in args)
        return f"one of {choices}" if len(args) > 1 else choices
    if _is_union(tp):
        parts = [_expectation(arm, where=where) for arm in args]
        joiner = ", or " if any(" or " in part for part in parts) else " or "
        return joiner.join(parts)
    if origin in (list, tuple):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} items: " + ", ".join(_expectation(arm, where=where) for arm in args)
        return f"a list, each item {_expectation(args[0] if args else Any, where=where)}"
    if origin is dict and len(args) == 2 and args[0] is str:
        return "a mapping" if args[1] is Any else f"a mapping, each value {_expectation(args[1], where=where)}"
    raise PluginError(
        f"{where or 'option'}: unsupported option type {tp!r}; use int, float, bool, str, Size, Duration, "
        f"Literal[...], unions of those, tuple[X, ...], list[X] or dict[str, X]"
    )


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """``value`` as ``tp`` (sizes in bytes, durations in seconds, lists as tuples where declared)."""
    if tp is Any:
        return value
    if tp is Size or tp is Duration:
        parse: Callable[[Any], Any] = parse_size if tp is Size else parse_duration
        try:
            return parse(value)
        except InvalidArgument:
            raise _Mismatch(path, _SCALARS[tp], value) from None
    if tp is _NONE_TYPE:
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is Literal:
        for choice in typing.get_args(tp):
            if value == choice and type(value) is type(choice):
                return choice
    elif _is_union(tp):
        arms = typing.get_args(tp)
        if value is None and _NONE_TYPE in arms:
            return None
        deepest: _Mismatch | None = None
        for arm in arms:
            if arm is _NONE_TYPE:
                continue
            try:
                return _coerce(arm, value, path)
            except _Mismatch as bad:
                if bad.path != path:  # the value had the right shape but an item inside was wrong
                    deepest = bad
        if deepest is not None:
            raise deepest
    elif typing.get_origin(tp) in (list, tuple):
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if isinstance(value, list):
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                if len(value) == len(args):
                    return tuple(_coerce(arm, item, f"{path}[{i}]") for i, (arm, item) in enumerate(zip(args, value)))
            else:
                item_type = args[0] if args else Any
                items = [_coerce(item_type, item, f"{path}[{i}]") for i, item in enumerate(value)]
                return tuple(items) if origin is tuple else items
    elif typing.get_origin(tp) is dict:
        if isinstance(value, Mapping):
            value_type = typing.get_args(tp)[1]
            for key in value:
                if not isinstance(key, str):
                    raise _Mismatch(path, "a mapping with string keys", key)
            return {key: _coerce(value_type, item, _join(path, key)) for key, item in value.items()}
    raise _Mismatch(path, _expectation(tp), value)


def _mentions(tp: Any, target: Any) -> bool:
    return tp is target or (_is_union(tp) and target in typing.get_args(tp))


# -- presenting ----------------------------------------------------------------------------------

def _is_default(spec: dataclasses.Field[Any], value: Any) -> bool:
    if spec.default is not dataclasses.MISSING:
        return bool(value == spec.default)
    if spec.default_factory is not dataclasses.MISSING:
        return bool(value == spec.default_factory())
    return False


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, short enough for one error line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _exact_size(nbytes: int) -> str | int:
    """``30gb`` where that is exact, so the YAML reads like what people write; bytes otherwise."""
    for suffix, scale in (("tb", 1 << 40), ("gb", 1 << 30), ("mb", 1 << 20), ("kb", 1 << 10)):
        if nbytes and nbytes % scale == 0:
            return f"{nbytes // scale}{suffix}"
    return nbytes


def _plain(tp: Any, value: Any) -> Any:
    """An option value as YAML data that parses back to the same value."""
    if isinstance(value, Mapping):
        mapping_types = [arm for arm in (typing.get_args(tp) if _is_union(tp) else (tp,)) if typing.get_origin(arm) is dict]
        value_type = typing.get_args(mapping_types[0])[1] if mapping_types else Any
        return {key: _plain(value_type, item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        sequence_types = [arm for arm in (typing.get_args(tp) if _is_union(tp) else (tp,))
                          if typing.get_origin(arm) in (list, tuple)]
        args = typing.get_args(sequence_types[0]) if sequence_types else ()
        if (len(args) == 2 and args[1] is Ellipsis) or len(args) == 1:
            return [_plain(args[0], item) for item in value]
        return [_plain(args[i] if i < len(args) else Any, item) for i, item in enumerate(value)]
    if isinstance(value, int) and not isinstance(value, bool) and _mentions(tp, Size):
        return _exact_size(value)
    if isinstance(value, float) and _mentions(tp, Duration) and value.is_integer():
        return f"{int(value)}s"
    return value


def _display(tp: Any, value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and _mentions(tp, Size):
        return format_size(value)
    if isinstance(value, float) and _mentions(tp, Duration):
        return f"{value:g}s"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(str(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key}: {_display(Any, item)}" for key, item in value.items()) + "}"
    return str(value)


def _yaml_value(value: Any) -> str:
    """One value in YAML's syntax, on one line where possible (collections in flow style)."""
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False).strip()
    dumped = yaml.safe_dump({"k": value}, default_flow_style=False, width=1 << 20).rstrip("\n")
    return dumped[len("k: "):]


def _mapping_lines(options: Any, head: list[tuple[str, str]], first: str, rest: str, comments: bool) -> list[str]:
    """``key: value`` lines for ``head`` then every option field, the first line prefixed with
    ``first`` (``"  - "`` for a list item), the others with ``rest``; help as aligned comments."""
    entries = [(key, text, "") for key, text in head]
    hints = _hints(type(options))
    for f in dataclasses.fields(options):
        if f.init:
            text = _yaml_value(_plain(hints[f.name], getattr(options, f.name)))
            entries.append((f.name, text.replace("\n", "\n" + rest), str(f.metadata.get("help", ""))))
    if not entries:
        return []
    width = max(len(key) + 2 + len(text.splitlines()[-1]) for key, text, _ in entries)
    lines = []
    for i, (key, text, help_text) in enumerate(entries):
        line = f"{first if i == 0 else rest}{key}: {text}"
        if comments and help_text and "\n" not in text:
            line = f"{line.ljust(len(rest) + width)}  # {' '.join(help_text.split())}"
        lines.append(line)
    return lines


def _component_lines(component: ComponentConfig, first: str, rest: str, comments: bool) -> list[str]:
    head = [("kind", _yaml_value(component.kind))]
    if component.role == "tier" and component.name != component.kind:
        head.append(("name", _yaml_value(component.name)))
    return _mapping_lines(component.options, head, first, rest, comments)
