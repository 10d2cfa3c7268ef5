"""Fixtures for the DRAM tier tests: every pool lives in pytest's tmp_path, never in /dev/shm."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pegaflow_dram import DramOptions, DramTier

MIB = 1 << 20


@pytest.fixture
def make_tier(tmp_path: Path) -> Iterator[Callable[..., DramTier]]:
    """Build DramTiers in tmp_path (small chunks, no NUMA binding); all are closed afterwards."""
    built: list[DramTier] = []

    def make(**overrides: Any) -> DramTier:
        fields: dict[str, Any] = {"capacity": 8 * MIB, "chunk": MIB, "shm_dir": str(tmp_path), "numa": None}
        fields.update(overrides)
        tier = DramTier(DramOptions(**fields))
        built.append(tier)
        return tier

    yield make
    for tier in built:
        tier.close()
