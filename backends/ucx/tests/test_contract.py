"""The shared Transport contract, run against UcxTransport (two endpoints in this process)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pegaflow_conformance import TransportContract

from pegaflow_ucx import UcxTransport

pytestmark = pytest.mark.skipif(not UcxTransport.availability().ok, reason=UcxTransport.availability().detail)


class TestUcxTransport(TransportContract):
    @pytest.fixture
    def transport_factory(self, tmp_path) -> Callable[[], UcxTransport]:
        def factory() -> UcxTransport:
            return UcxTransport(UcxTransport.conformance_options(tmp_path))

        return factory
