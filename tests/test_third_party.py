"""A third party's backend, built and installed the way any user would: its own pyproject with a
`pegaflow` entry point. `pegaflow backends` lists it, a YAML config can use it, and the
conformance suite runs against it without the author writing a single test."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PYPROJECT = """
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "pegaflow-example"
version = "0.3.0"
dependencies = ["pegaflow-core"]

[project.entry-points.pegaflow]
example = "pegaflow_example"
"""

MODULE = '''
"""A dict-backed tier: the smallest complete backend a third party could write."""
import threading
from dataclasses import dataclass

from pegaflow_core import BlockKey, ClosedError, InvalidArgument, Tier, TierUsage, byte_view, hookimpl


@dataclass(frozen=True)
class ExampleOptions:
    capacity: int = 1 << 20


class ExampleTier(Tier):
    kind = "example-memory"
    Options = ExampleOptions

    def __init__(self, options):
        self.capacity = options.capacity
        self.blocks = {}
        self.used = 0
        self.lock = threading.Lock()
        self.closed = False

    @classmethod
    def conformance_options(cls, tmp_path, capacity_bytes=None):
        return ExampleOptions(capacity=capacity_bytes or 1 << 20)

    def _check(self, keys):
        if self.closed:
            raise ClosedError("example tier is closed")
        for i, key in enumerate(keys):
            if not isinstance(key, BlockKey):
                raise InvalidArgument(f"keys[{i}]: expected a BlockKey, got {type(key).__name__}")

    def put(self, keys, blocks):
        self._check(keys)
        if len(keys) != len(blocks):
            raise InvalidArgument(f"{len(keys)} keys but {len(blocks)} blocks")
        data = [bytes(byte_view(b, what=f"blocks[{i}]")) for i, b in enumerate(blocks)]
        out = []
        with self.lock:
            for key, value in zip(keys, data):
                if key in self.blocks:
                    out.append(True)
                elif self.used + len(value) <= self.capacity:
                    self.blocks[key] = value
                    self.used += len(value)
                    out.append(True)
                else:
                    out.append(False)
        return out

    def get_into(self, keys, dests):
        self._check(keys)
        if len(keys) != len(dests):
            raise InvalidArgument(f"{len(keys)} keys but {len(dests)} destinations")
        views = [byte_view(d, writable=True, what=f"dests[{i}]") for i, d in enumerate(dests)]
        with self.lock:
            found = [self.blocks.get(k) for k in keys]
        for i, (value, view) in enumerate(zip(found, views)):
            if value is not None and len(value) != len(view):
                raise InvalidArgument(f"dests[{i}] has {len(view)} bytes, the block has {len(value)}")
        for value, view in zip(found, views):
            if value is not None:
                view[:] = value
        return [v is not None for v in found]

    def contains(self, keys):
        self._check(keys)
        with self.lock:
            return [k in self.blocks for k in keys]

    def evict(self, keys):
        self._check(keys)
        with self.lock:
            gone = [self.blocks.pop(k) for k in keys if k in self.blocks]
            self.used -= sum(len(v) for v in gone)
        return len(gone)

    def usage(self):
        if self.closed:
            raise ClosedError("example tier is closed")
        with self.lock:
            return TierUsage(self.capacity, self.used, len(self.blocks))

    def close(self):
        self.closed = True


@hookimpl
def register_tiers(register):
    register(ExampleTier)
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("pegaflow-example")
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "pegaflow_example").mkdir()
    (src / "pegaflow_example" / "__init__.py").write_text(MODULE)
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(src)],
        check=True,
    )
    return target


def run(site: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_backends_lists_the_installed_plugin(site):
    out = run(site, "-m", "pegaflow_core", "backends")
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if "example-memory" in l)
    assert "pegaflow-example" in line and "0.3.0" in line


def test_config_can_use_it(site, tmp_path):
    config = tmp_path / "stack.yaml"
    config.write_text("tiers:\n  - {kind: dram, capacity: 8mb}\n  - {kind: example-memory, capacity: 4194304}\n")
    out = run(site, "-m", "pegaflow_core", "config", "check", str(config))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "example-memory" in out.stdout
    config.write_text("tiers:\n  - {kind: example-memory, capacity: 4194304, colour: blue}\n")
    out = run(site, "-m", "pegaflow_core", "config", "check", str(config))
    assert out.returncode == 2 and "tiers[0]" in out.stderr and "colour" in out.stderr


def test_conformance_suite_runs_against_it(site, tmp_path):
    env_site = site
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--pegaflow-conformance", "-q", "-p", "no:cacheprovider", "-k", "example"],
        env=dict(os.environ, PYTHONPATH=str(env_site), PEGAFLOW_LOAD_PLUGINS="example"),
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
