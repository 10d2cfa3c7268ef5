"""Fixtures of the connector tests: a real daemon, a tiny model folder, and engines built by
vllm_harness.Engine (vLLM's real Scheduler + this connector on both sides)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make vllm_harness importable

from vllm_harness import DAEMON_CONFIG, TINY_LLAMA, need_vllm  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return path


@pytest.fixture(scope="module")
def daemon():
    from pegaflow_core.launcher import DaemonProcess

    with DaemonProcess(DAEMON_CONFIG) as d:
        yield d


@pytest.fixture
def daemon_client(daemon):
    from pegaflow_core.client import PegaflowClient

    with PegaflowClient(daemon.endpoint, timeout_s=10) as c:
        yield c


@pytest.fixture
def make_engine(model_dir):
    need_vllm()
    from vllm_harness import Engine

    engines: list[Engine] = []

    def make(endpoint: str, **kwargs: Any) -> Engine:
        engine = Engine(model_dir, endpoint, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()
