"""The shared Tier contract on GdsTier's host path (put/get_into), which runs on any machine:
the same log as the ssd tier, reached through the subclass. test_gpu.py runs it again with every
block going through GPU memory (read_into_device / write_from_device)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pegaflow_conformance import TierContract

from pegaflow_gds import GdsTier


class TestGdsTierHostPath(TierContract):
    @pytest.fixture
    def tier_factory(self, tmp_path: Path) -> Callable[[int], GdsTier]:
        def factory(capacity_bytes: int) -> GdsTier:
            return GdsTier(GdsTier.conformance_options(tmp_path, capacity_bytes))

        return factory
