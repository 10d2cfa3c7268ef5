"""Contract classes for every installed backend, built when ``--pegaflow-conformance`` is given.

pytest collects this module only through the plugin (``pytest_plugin.py`` adds it to the
collection arguments). For each tier, index and transport in ``pegaflow_core.plugins.get_registry()``
it defines ``Test<Kind><Role>`` subclassing the matching contract, whose factory builds the backend
with ``cls(cls.conformance_options(tmp_path, capacity_bytes))``. A backend that is unavailable here,
or whose ``conformance_options`` returns None, has its tests skipped with the reason; a plugin that
failed to load gets a failing test that shows its error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from .index import IndexContract
from .tier import TierContract
from .transport import TransportContract

CONTRACTS: dict[str, type] = {"tier": TierContract, "index": IndexContract, "transport": TransportContract}


def selected_records(wanted: list[str]) -> tuple[list[Any], str | None]:
    """Registry records of the roles we have contracts for, filtered by ``[role:]kind`` strings."""
    try:
        from pegaflow_core.plugins import get_registry

        registry = get_registry()
    except Exception as exc:  # reported as a failing test below, never a collection crash
        return [], f"{type(exc).__name__}: {exc}"
    records = [r for r in registry.records() if r.role in CONTRACTS]
    if wanted:
        records = [r for r in records if r.kind in wanted or f"{r.role}:{r.kind}" in wanted]
    return records, None


def _class_name(role: str, kind: str) -> str:
    words = re.split(r"[^0-9A-Za-z]+", kind)
    return "Test" + "".join(w[:1].upper() + w[1:] for w in words if w) + role.capitalize()


def _options(record: Any, tmp_path: Any, capacity_bytes: int | None) -> Any:
    availability = record.availability()
    if not availability.ok:
        pytest.skip(f"{record.role} {record.kind!r} is not available here: {availability.detail or 'no detail'}")
    options = record.cls.conformance_options(tmp_path, capacity_bytes)
    if options is None:
        pytest.skip(
            f"{record.role} {record.kind!r} ({record.distribution}) returns no conformance_options(): "
            "it cannot be built without outside help; test it with its own tests/test_contract.py"
        )
    return options


def _tier_fixture(record: Any) -> Callable:
    @pytest.fixture
    def tier_factory(self, tmp_path):
        _options(record, tmp_path, TierContract.roomy_capacity)  # skip before the test body when not buildable
        return lambda capacity_bytes: record.cls(_options(record, tmp_path, capacity_bytes))

    return tier_factory


def _index_fixture(record: Any) -> Callable:
    @pytest.fixture
    def index_factory(self, tmp_path_factory):
        path = tmp_path_factory.mktemp(record.kind)
        _options(record, path, None)  # skips early when the backend cannot be built here
        # fresh options per index: a shared server (Redis) must not see another test's state
        return lambda: record.cls(_options(record, path, None))

    return index_factory


def _transport_fixture(record: Any) -> Callable:
    @pytest.fixture
    def transport_factory(self, tmp_path_factory):
        path = tmp_path_factory.mktemp(record.kind)
        options = _options(record, path, None)
        return lambda: record.cls(options)

    return transport_factory


_FIXTURES = {"tier": ("tier_factory", _tier_fixture), "index": ("index_factory", _index_fixture), "transport": ("transport_factory", _transport_fixture)}


def _build(config: pytest.Config | None) -> dict[str, type]:
    wanted = config.getoption("--pegaflow-backend") if config is not None else []
    records, error = selected_records(wanted)
    classes: dict[str, type] = {}
    if error is not None:
        def test_registry_loads(self) -> None:
            pytest.fail(f"pegaflow plugin registry failed to load: {error}")

        classes["TestPluginRegistry"] = type("TestPluginRegistry", (), {"test_registry_loads": test_registry_loads, "__module__": __name__})
        return classes
    for record in records:
        fixture_name, make_fixture = _FIXTURES[record.role]
        name = _class_name(record.role, record.kind)
        classes[name] = type(
            name,
            (CONTRACTS[record.role],),
            {fixture_name: make_fixture(record), "__module__": __name__, "__doc__": f"{record.role} {record.kind!r} from {record.distribution} {record.version}"},
        )
    try:
        from pegaflow_core.plugins import get_registry

        broken = get_registry().broken
    except Exception:
        broken = []
    if wanted:  # a filtered run reports only the broken plugins it names
        broken = [b for b in broken if b.plugin in wanted or b.distribution in wanted]
    for plugin in broken:
        def test_plugin_loads(self, _plugin: Any = plugin) -> None:
            pytest.fail(f"pegaflow plugin {_plugin.plugin!r} ({_plugin.distribution}) failed to load: {_plugin.error}")

        name = _class_name("plugin", plugin.plugin)
        classes[name] = type(name, (), {"test_plugin_loads": test_plugin_loads, "__module__": __name__})
    if not classes:
        def test_backends_installed(self) -> None:
            pytest.skip("no pegaflow tier, index or transport plugin matched")

        classes["TestNoBackends"] = type("TestNoBackends", (), {"test_backends_installed": test_backends_installed, "__module__": __name__})
    return classes


def _current_config() -> pytest.Config | None:
    import sys

    plugin = sys.modules.get("pegaflow_conformance.pytest_plugin")
    return getattr(plugin, "active_config", None)


globals().update(_build(_current_config()))
