"""pytest plugin of pegaflow-conformance (loaded through the ``pytest11`` entry point).

It registers the suite's markers and adds ``--pegaflow-conformance``: with it, pytest collects
``pegaflow_conformance.installed``, a module that builds one ``Test<Kind><Role>`` class per installed
tier, index and transport, so a third party can check a backend without writing a test file.
Paths given on the command line are still collected; paths that came from ``testpaths`` or the
current directory are replaced, so the flag works from any directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

OPTION = "--pegaflow-conformance"
active_config: pytest.Config | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pegaflow", "pegaflow conformance")
    group.addoption(
        OPTION,
        action="store_true",
        default=False,
        help="run the pegaflow contracts against every installed tier, index and transport plugin",
    )
    group.addoption(
        "--pegaflow-backend",
        action="append",
        default=[],
        metavar="[ROLE:]KIND",
        help="with --pegaflow-conformance, only check these backends (repeatable), e.g. tier:dram",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "pegaflow_conformance: a contract test from pegaflow-conformance")
    config.addinivalue_line("markers", "pegaflow_stateful: a hypothesis state machine run by a contract")
    if not config.getoption(OPTION):
        return
    global active_config
    active_config = config  # read by installed.py when pytest imports it
    module_path = str(Path(__file__).with_name("installed.py"))
    if config.args_source == pytest.Config.ArgsSource.ARGS:
        config.args.append(module_path)
    else:
        config.args[:] = [module_path]


def pytest_unconfigure(config: pytest.Config) -> None:
    global active_config
    if active_config is config:
        active_config = None


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    if not config.getoption(OPTION):
        return None
    from .installed import selected_records

    records, error = selected_records(config.getoption("--pegaflow-backend"))
    if error:
        return [f"pegaflow conformance: plugin registry failed to load: {error}"]
    names = ", ".join(f"{r.role}:{r.kind} ({r.distribution} {r.version})" for r in records) or "none"
    return [f"pegaflow conformance backends: {names}"]
