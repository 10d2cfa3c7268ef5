"""Where the RDMA tests find verbs. Tests marked ``rdma`` need an active RDMA port: without one
they are skipped with the reason ``pegaflow backends`` gives, except when PEGAFLOW_RDMA_REQUIRE=1
(the soft-RoCE VM sets it), where a missing device is a failure, never a silent skip.

PEGAFLOW_RDMA_DEVICES and PEGAFLOW_RDMA_HOST choose the NICs and the address endpoints listen on
(the VM: two rxe devices and a veth address, so nothing goes over loopback)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from pegaflow_rdma import RdmaOptions, RdmaTransport

DEVICES = os.environ.get("PEGAFLOW_RDMA_DEVICES", "auto")
HOST = os.environ.get("PEGAFLOW_RDMA_HOST", "127.0.0.1")
PEER_HOST = os.environ.get("PEGAFLOW_RDMA_PEER_HOST", HOST)
REQUIRE = os.environ.get("PEGAFLOW_RDMA_REQUIRE") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rdma: needs an active RDMA port (real or soft-RoCE)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("rdma") is None:
        return
    availability = RdmaTransport.availability()
    if not availability.ok:
        if REQUIRE:
            pytest.fail(f"PEGAFLOW_RDMA_REQUIRE=1 but RDMA is unavailable: {availability.detail}")
        pytest.skip(availability.detail)


@pytest.fixture
def rdma_options() -> Callable[..., RdmaOptions]:
    """``rdma_options(**overrides)``: options for this machine's RDMA ports."""

    def make(**overrides: object) -> RdmaOptions:
        values: dict[str, object] = {"devices": DEVICES, "host": HOST, "timeout": 10.0}
        values.update(overrides)
        return RdmaOptions(**values)

    return make


@pytest.fixture
def rdma_site() -> dict[str, str]:
    """The NICs and the two addresses (this node, the peer node) the cluster tests use."""
    return {"devices": DEVICES, "host": HOST, "peer_host": PEER_HOST}
