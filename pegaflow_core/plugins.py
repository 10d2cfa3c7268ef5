"""The plugin host: loads the ``pegaflow`` entry-point group once, lazily, and keeps a registry of
backend classes by role and kind.

A plugin that fails to import is recorded with its error instead of taking the process down; it
only becomes fatal when a config asks for one of its kinds. ``PEGAFLOW_LOAD_PLUGINS`` (a
comma-separated list of entry-point names, possibly empty) restricts which installed plugins load;
``PEGAFLOW_TRACE_PLUGINS=1`` logs every hook call.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError

log = logging.getLogger("pegaflow.plugins")

ENTRY_POINT_GROUP = "pegaflow"
ROLES = ("tier", "transport", "index", "memory", "connector", "benchmark")
_HOOKS = {
    "tier": "register_tiers",
    "transport": "register_transports",
    "index": "register_indexes",
    "memory": "register_memory_kinds",
    "connector": "register_connectors",
    "benchmark": "register_benchmarks",
}
BUILTIN_PLUGINS = (
    "pegaflow_core.default_plugins.local_index",
    "pegaflow_core.default_plugins.loopback",
    "pegaflow_core.default_plugins.benchmarks",
    "pegaflow_core.default_plugins.remote",
    "pegaflow_core.default_plugins.faulty",
    "pegaflow_core.default_plugins.host_memory",
)


@dataclass(frozen=True)
class PluginRecord:
    """One registered backend class and where it came from."""

    role: str
    kind: str
    cls: type
    plugin: str
    distribution: str
    version: str

    def availability(self) -> Any:
        probe = getattr(self.cls, "availability", None)
        if probe is None:
            from .backend import Availability

            return Availability(True)
        try:
            return probe()
        except Exception as exc:  # a probe must never take the listing down
            from .backend import Availability

            return Availability(False, f"availability check raised {exc!r}")


@dataclass(frozen=True)
class BrokenPlugin:
    plugin: str
    distribution: str
    error: str


class Registry:
    """Backends by role and kind, plus the plugins that could not be loaded."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], PluginRecord] = {}
        self.broken: list[BrokenPlugin] = []

    def add(self, record: PluginRecord) -> None:
        key = (record.role, record.kind)
        earlier = self._records.get(key)
        if earlier is not None and earlier.cls is not record.cls:
            self.broken.append(
                BrokenPlugin(
                    record.plugin,
                    record.distribution,
                    f"{record.role} kind {record.kind!r} is already registered by plugin "
                    f"{earlier.plugin!r} ({earlier.distribution}); this one is ignored",
                )
            )
            return
        self._records[key] = record

    def kinds(self, role: str) -> list[str]:
        return sorted(kind for r, kind in self._records if r == role)

    def records(self) -> list[PluginRecord]:
        return sorted(self._records.values(), key=lambda r: (ROLES.index(r.role), r.kind))

    def get(self, role: str, kind: str) -> type:
        """The class registered for ``kind``; PluginError lists what is installed otherwise."""
        record = self._records.get((role, kind))
        if record is None:
            installed = ", ".join(self.kinds(role)) or "none"
            hint = "".join(f"; plugin {b.plugin!r} failed to load: {b.error}" for b in self.broken)
            raise PluginError(f"unknown {role} kind {kind!r}; installed: {installed}{hint}")
        return record.cls


def _plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("pegaflow")
    pm.add_hookspecs(hookspecs)
    if os.environ.get("PEGAFLOW_TRACE_PLUGINS"):
        pm.trace.root.setwriter(lambda message: log.warning("%s", message.rstrip()))
        pm.enable_tracing()
    return pm


def _load(pm: pluggy.PluginManager, registry: Registry) -> dict[str, tuple[str, str]]:
    """Register built-ins and entry points; return plugin name -> (distribution, version)."""
    origin: dict[str, tuple[str, str]] = {}
    core_version = _dist_version("pegaflow-core")
    for module_name in BUILTIN_PLUGINS:
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name)
        origin[module_name] = ("pegaflow-core", core_version)

    allowed = os.environ.get("PEGAFLOW_LOAD_PLUGINS")
    allow = None if allowed is None else {name.strip() for name in allowed.split(",") if name.strip()}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allow is not None and ep.name not in allow:
            continue
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:
            log.warning("pegaflow plugin %r (%s) failed to load: %r", ep.name, dist, exc)
            registry.broken.append(BrokenPlugin(ep.name, dist, f"{type(exc).__name__}: {exc}"))
            continue
        origin[ep.name] = (dist, version)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"a pegaflow plugin implements an unknown hook: {exc}") from exc
    return origin


def _collect(pm: pluggy.PluginManager, registry: Registry, origin: dict[str, tuple[str, str]]) -> None:
    for role, hook_name in _HOOKS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            dist, version = origin.get(impl.plugin_name, ("?", "?"))

            def register(cls: type, *, _role: str = role, _impl: Any = impl, _d: str = dist, _v: str = version) -> None:
                kind = getattr(cls, "kind", None)
                if not isinstance(kind, str) or not kind:
                    raise PluginError(f"plugin {_impl.plugin_name!r} registered {cls!r} without a 'kind' string")
                registry.add(PluginRecord(_role, kind, cls, _impl.plugin_name, _d, _v))

            try:
                impl.function(register=register)
            except Exception as exc:
                registry.broken.append(BrokenPlugin(impl.plugin_name, dist, f"{hook_name} raised {exc!r}"))


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry(reload: bool = False) -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    with _lock:
        if _registry is None or reload:
            pm = _plugin_manager()
            registry = Registry()
            origin = _load(pm, registry)
            _collect(pm, registry, origin)
            _registry = registry
        return _registry
