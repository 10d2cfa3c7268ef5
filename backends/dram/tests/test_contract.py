"""The shared Tier contract, run against DramTier."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
from pegaflow_conformance import TierContract

from pegaflow_dram import DramTier


class TestDramTier(TierContract):
    @pytest.fixture
    def tier_factory(self, tmp_path: Path) -> Callable[[int], DramTier]:
        def factory(capacity_bytes: int) -> DramTier:
            return DramTier(DramTier.conformance_options(tmp_path, capacity_bytes))

        return factory


class TestNamedDramTier(TierContract):
    """A named pool is persistent: closed and opened again, it serves what it held."""

    @pytest.fixture
    def tier_factory(self, tmp_path: Path) -> Callable[[int], DramTier]:
        def factory(capacity_bytes: int) -> DramTier:
            options = dataclasses.replace(DramTier.conformance_options(tmp_path, capacity_bytes), pool_name="contract")
            return DramTier(options)

        return factory
