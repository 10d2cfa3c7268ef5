"""Fixtures of the gds tier tests. The tier opens anywhere (its files and host path are the ssd
tier's); device I/O needs a GPU, a driver and kvikio, and the tests that use it skip elsewhere
with the probe's reason."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pegaflow_core import BlockKey
from pegaflow_gds import GdsOptions, GdsTier

KIB = 1 << 10
MIB = 1 << 20


def require_device_io() -> None:
    available = GdsTier.availability()
    if not available.ok:
        pytest.skip(f"GPU file I/O is not available here: {available.detail}")


@pytest.fixture
def make_tier(tmp_path: Path) -> Iterator[Callable[..., GdsTier]]:
    """Build GdsTiers in tmp_path/gds (64 KiB segments, 1 MiB capacity); closed at teardown."""
    built: list[GdsTier] = []

    def make(**overrides: Any) -> GdsTier:
        fields: dict[str, Any] = {"path": str(tmp_path / "gds"), "capacity": MIB, "segment_size": 64 * KIB,
                                  "queue_depth": 8, "fsync": False, "threads": 4}
        fields.update(overrides)
        tier = GdsTier(GdsOptions(**fields))
        built.append(tier)
        return tier

    yield make
    for tier in built:
        tier.close()


def keys_of(count: int, salt: str = "k") -> list[BlockKey]:
    return [BlockKey("test/gds", f"{salt}-{i}".encode(), 0) for i in range(count)]


def blocks_of(count: int, size: int) -> list[bytes]:
    return [os.urandom(size) for _ in range(count)]
