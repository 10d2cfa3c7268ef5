"""The shared Transport contract over real verbs (two endpoints in this process)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pegaflow_conformance import TransportContract
from pegaflow_rdma import RdmaTransport

pytestmark = pytest.mark.rdma


class TestRdmaTransport(TransportContract):
    @pytest.fixture
    def transport_factory(self, rdma_options) -> Callable[[], RdmaTransport]:
        return lambda: RdmaTransport(rdma_options())
