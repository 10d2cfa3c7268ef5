"""The ``pegaflow`` and ``pegaflow-server`` commands: output people read, exit statuses scripts
check, and errors as one line instead of a traceback."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from pegaflow_core import cli, plugins
from pegaflow_core.backend import Availability, Backend
from pegaflow_core.config import DaemonConfig, parse_config
from pegaflow_core.errors import NotFound
from pegaflow_core.sizes import Size

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class TierOptions:
    capacity: Size | Literal["auto"] = field(default="auto", metadata={"help": "bytes the tier may hold"})
    numa: int | None = None
    pool_name: str | None = None  # the embedded default names its pool


class TestTier(Backend):
    __test__ = False  # a backend, not a pytest class
    kind = "dram"
    Options = TierOptions


class TestIndex(Backend):
    __test__ = False
    kind = "local"


class TestRdma(Backend):
    __test__ = False
    kind = "rdma"

    @classmethod
    def availability(cls) -> Availability:
        return Availability(False, "no RDMA device found")


@pytest.fixture(autouse=True)
def registry(monkeypatch: pytest.MonkeyPatch) -> plugins.Registry:
    registry = plugins.Registry()
    registry.add(plugins.PluginRecord("tier", "dram", TestTier, "dram", "pegaflow-dram", "0.1.0"))
    registry.add(plugins.PluginRecord("index", "local", TestIndex, "builtin", "pegaflow-core", "0.1.0"))
    registry.add(plugins.PluginRecord("transport", "rdma", TestRdma, "rdma", "pegaflow-rdma", "2.0.1"))
    registry.broken.append(plugins.BrokenPlugin("ucx", "pegaflow-ucx", "ImportError: No module named 'ucxx'"))
    monkeypatch.setattr(plugins, "get_registry", lambda reload=False: registry)
    return registry


@pytest.fixture(autouse=True)
def restore_logging() -> Any:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# -- pegaflow backends -------------------------------------------------------------------------------

def test_backends_table(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "backends")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["ROLE", "KIND", "DISTRIBUTION", "VERSION", "AVAILABILITY"]
    assert lines[1].split() == ["tier", "dram", "pegaflow-dram", "0.1.0", "ok"]
    assert lines[2].split()[:4] == ["transport", "rdma", "pegaflow-rdma", "2.0.1"]
    assert lines[2].endswith("unavailable: no RDMA device found")
    assert lines[3].split() == ["index", "local", "pegaflow-core", "0.1.0", "ok"]
    # columns line up: every row's KIND starts where the header's does
    assert {line.index(kind) for line, kind in zip(lines[:4], ["KIND", "dram", "rdma", "local"])} == {11}
    assert "plugins that failed to load" in out
    broken = next(line for line in lines if line.startswith("ucx"))
    assert "pegaflow-ucx" in broken and broken.endswith("ImportError: No module named 'ucxx'")


def test_backends_json(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "backends", "--json")
    assert status == 0
    report = json.loads(out)
    rdma = next(b for b in report["backends"] if b["kind"] == "rdma")
    assert rdma == {"role": "transport", "kind": "rdma", "plugin": "rdma", "distribution": "pegaflow-rdma",
                    "version": "2.0.1", "available": False, "detail": "no RDMA device found"}
    assert report["broken"] == [{"plugin": "ucx", "distribution": "pegaflow-ucx",
                                 "error": "ImportError: No module named 'ucxx'"}]


def test_backends_when_nothing_is_registered(capsys: pytest.CaptureFixture[str], registry: plugins.Registry) -> None:
    registry._records.clear()
    registry.broken.clear()
    assert run(capsys, "backends")[1] == "no backends registered\n"


# -- pegaflow config ---------------------------------------------------------------------------------

def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "stack.yaml"
    path.write_text(text)
    return str(path)


def test_config_check_valid(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, "server: {metrics: null, device: 0}\n"
                           "tiers:\n  - {kind: dram, capacity: 30gb}\n  - {kind: dram, name: spare, capacity: 1536mb, numa: 1}\n")
    status, out, err = run(capsys, "config", "check", path)
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"{path}: valid"
    assert "listen 127.0.0.1:50055, metrics off, device 0, lease_ttl 30s" in lines[1]
    assert lines[2] == "index      local" and lines[3] == "transport  none"
    assert lines[4] == "tiers      2, top to bottom:"
    assert lines[5].split() == ["#", "NAME", "KIND", "OPTIONS"]
    assert lines[6].split() == ["0", "dram", "dram", "capacity", "30", "GiB"]
    assert lines[7].split() == ["1", "spare", "dram", "capacity", "1.5", "GiB,", "numa", "1"]


def test_config_check_invalid_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, "tiers:\n  - {kind: dram, capacity: lots}\n")
    status, out, err = run(capsys, "config", "check", path)
    assert status == 2 and out == ""
    assert err == (f"pegaflow: error: {path}: tiers[0].capacity: expected a size like '30gb', '500mb' or a byte count, "
                   f"or 'auto', got 'lots'\n")


def test_config_check_unknown_kind_and_unavailable_backend(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, "tiers: [{kind: ssd}]\n")
    status, _, err = run(capsys, "config", "check", path)
    assert status == 2 and "tiers[0].kind: unknown tier kind 'ssd'; installed: dram; plugin 'ucx' failed to load" in err
    path = write(tmp_path, "transport: {kind: rdma}\n")
    status, _, err = run(capsys, "config", "check", path)
    assert status == 2 and err.endswith("transport: backend 'rdma' is unavailable on this machine: no RDMA device found\n")


def test_config_check_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, _, err = run(capsys, "config", "check", str(tmp_path / "nope.yaml"))
    assert status == 2 and err == f"pegaflow: error: {tmp_path / 'nope.yaml'}: no such file\n"


def test_config_show_default_round_trips(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "config", "show")
    assert status == 0
    assert out.startswith("# effective pegaflow config, from <embedded default>\nserver:\n  listen: 127.0.0.1:50055")
    assert "capacity: auto      # bytes the tier may hold" in out
    assert parse_config(out, "shown.yaml") == cli_default()


def test_config_show_file_without_comments(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, "tiers: [{kind: dram, capacity: 8gb}]\n")
    status, out, _ = run(capsys, "config", "show", "--no-comments", path)
    assert status == 0
    body = out.split("\n", 1)[1]
    assert "#" not in body and "  - kind: dram\n    capacity: 8gb\n    numa: null\n    pool_name: null\n" in body
    assert yaml.safe_load(out)["tiers"] == [{"kind": "dram", "capacity": "8gb", "numa": None, "pool_name": None}]


def test_config_without_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "config")
    assert status == 2 and "usage: pegaflow config" in out


def cli_default() -> DaemonConfig:
    from pegaflow_core.config import load_config

    return load_config(None)


# -- the shell -----------------------------------------------------------------------------------

def test_no_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys)
    assert status == 2 and out == "" and err.startswith("usage: pegaflow")
    for command in ("backends", "config"):
        assert command in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("pegaflow 0.")


def test_missing_command_modules_are_skipped(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("not_written_yet", "backends", "config"))
    assert [m.__name__.rsplit(".", 1)[1] for m in cli.command_modules()] == ["backends", "config"]
    assert run(capsys, "backends")[0] == 0


def test_pegaflow_errors_become_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from pegaflow_core.commands import backends

    def boom() -> dict[str, Any]:
        raise NotFound("lease 'abc' does not exist")

    monkeypatch.setattr(backends, "collect", boom)
    status, out, err = run(capsys, "backends")
    assert (status, out, err) == (2, "", "pegaflow: error: lease 'abc' does not exist\n")
    status, _, err = run(capsys, "-vv", "backends")
    assert status == 2 and "Traceback" in err and err.endswith("pegaflow: error: lease 'abc' does not exist\n")


def test_verbose_sets_the_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    logging.getLogger().setLevel(logging.WARNING)
    run(capsys, "backends")
    assert logging.getLogger().level == logging.WARNING  # untouched without -v: `serve` sets its own
    run(capsys, "-v", "backends")
    assert logging.getLogger().level == logging.INFO
    run(capsys, "-vv", "backends")
    assert logging.getLogger().level == logging.DEBUG


# -- pegaflow-server -------------------------------------------------------------------------------

@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[DaemonConfig]:
    """What the daemon would have been started with, instead of starting it."""
    configs: list[DaemonConfig] = []
    monkeypatch.setattr(cli, "_daemon_entry", lambda: configs.append)
    return configs


def test_server_seed_flags(served: list[DaemonConfig]) -> None:
    assert cli.server_main(["--addr", "0.0.0.0:50055", "--device", "0", "--pool-size", "30gb"]) == 0
    [config] = served
    assert (config.server.listen, config.server.device, config.tiers[0].options.capacity) == ("0.0.0.0:50055", 0, 30 << 30)
    assert cli.server_main([]) == 0
    assert served[1].server.listen == "127.0.0.1:50055" and served[1].tiers[0].options.capacity == "auto"


def test_server_config_file_with_overrides(served: list[DaemonConfig], tmp_path: Path) -> None:
    path = write(tmp_path, "server: {listen: 127.0.0.1:7000, device: 1}\ntiers: [{kind: dram, capacity: 2gb}]\n")
    assert cli.server_main(["--config", path]) == 0
    assert (served[0].server.listen, served[0].server.device, served[0].source) == ("127.0.0.1:7000", 1, path)
    assert cli.server_main(["-c", path, "--addr", "127.0.0.1:7001", "--device", "3"]) == 0
    assert (served[1].server.listen, served[1].server.device) == ("127.0.0.1:7001", 3)
    assert served[1].tiers[0].options.capacity == 2 << 30


def test_server_flag_errors(served: list[DaemonConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "tiers: [{kind: dram}]\n")
    assert cli.server_main(["--config", path, "--pool-size", "1gb"]) == 2
    assert capsys.readouterr().err == ("pegaflow-server: error: <command line>: --pool-size: cannot be combined with "
                                       "--config; set the dram tier's capacity in the file\n")
    assert cli.server_main(["--pool-size", "lots"]) == 2
    assert "--pool-size: expected a size like '30gb'" in capsys.readouterr().err
    assert cli.server_main(["--addr", "nowhere"]) == 2
    assert "<command line>: --addr: expected host:port" in capsys.readouterr().err
    assert cli.server_main(["-c", path, "--addr", "nowhere"]) == 2
    assert "<command line>: server.listen: expected host:port" in capsys.readouterr().err
    assert served == []


def test_server_without_a_daemon_module(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "DAEMON_MODULE", "pegaflow_core.no_such_daemon")
    assert cli.server_main(["--pool-size", "1gb"]) == 2
    assert capsys.readouterr().err == ("pegaflow-server: error: this installation has no daemon "
                                       "(pegaflow_core.no_such_daemon is missing); reinstall pegaflow-core\n")


# -- the real console scripts, with whatever is installed ------------------------------------------

def test_console_script_backends() -> None:
    out = subprocess.run([str(BIN / "pegaflow"), "backends"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split() == ["ROLE", "KIND", "DISTRIBUTION", "VERSION", "AVAILABILITY"]
    local = next(line for line in out.stdout.splitlines() if line.startswith("index "))
    assert local.split()[1:3] == ["local", "pegaflow-core"]


def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "tiers: [{kind: no-such-kind}]\n")
    out = subprocess.run([str(BIN / "pegaflow"), "config", "check", path], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"pegaflow: error: {path}: tiers[0].kind: unknown tier kind 'no-such-kind'; installed: ")
    assert "Traceback" not in out.stderr
