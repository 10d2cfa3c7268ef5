"""The shared Tier contract, run against SsdTier (persistent: reopening keeps the blocks)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pegaflow_conformance import TierContract

from pegaflow_ssd import SsdTier


class TestSsdTier(TierContract):
    @pytest.fixture
    def tier_factory(self, tmp_path: Path) -> Callable[[int], SsdTier]:
        def factory(capacity_bytes: int) -> SsdTier:
            return SsdTier(SsdTier.conformance_options(tmp_path, capacity_bytes))

        return factory
