"""Shared fixtures for cross-package tests: real daemon processes and small engines."""

from __future__ import annotations

import dataclasses

import pytest

from pegaflow_core.client import PegaflowClient
from daemon_helpers import SMALL, dram_config
from pegaflow_core.host_kv import KVShape
from pegaflow_core.launcher import DaemonProcess
from pegaflow_core.sim_engine import SimulatedEngine


@pytest.fixture(scope="module")
def daemon():
    with DaemonProcess(dram_config()) as d:
        yield d


@pytest.fixture
def client(daemon):
    with PegaflowClient(daemon.endpoint, timeout_s=10) as c:
        yield c


@pytest.fixture
def grpc_client(daemon):
    """A client that never uses the daemon's local socket: one on another machine, or facing a
    daemon without one."""
    with PegaflowClient(daemon.endpoint, timeout_s=10, local=False) as c:
        yield c


@pytest.fixture
def make_engine(client):
    engines = []

    def make(shape: KVShape = SMALL, model: str = "tiny", instance_id: str = "e0", on: PegaflowClient | None = None,
             memory: str = "shm", **changes):
        engine = SimulatedEngine(on or client, dataclasses.replace(shape, **changes), model=model, instance_id=instance_id, memory=memory)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()
