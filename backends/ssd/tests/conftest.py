"""Fixtures for the ssd tier tests: every tier lives under pytest's tmp_path (a disk file system,
since O_DIRECT does not work on tmpfs) with small segments so tests can fill it quickly."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pegaflow_core import BlockKey
from pegaflow_ssd import SsdOptions, SsdTier
from pegaflow_ssd.segments import probe_uring

KIB = 1 << 10
MIB = 1 << 20

IO_MODES = ["threads", "io_uring"]


def require_uring() -> None:
    usable, why = probe_uring()
    if not usable:
        pytest.skip(f"io_uring is not usable here: {why}")


@pytest.fixture(params=IO_MODES)
def io_mode(request: pytest.FixtureRequest) -> str:
    """Run a test once per I/O path; the io_uring run skips (with the reason) where it cannot work."""
    if request.param == "io_uring":
        require_uring()
    return str(request.param)


@pytest.fixture
def make_tier(tmp_path: Path) -> Iterator[Callable[..., SsdTier]]:
    """Build SsdTiers in tmp_path/ssd (64 KiB segments, 1 MiB capacity); closed at teardown."""
    built: list[SsdTier] = []

    def make(**overrides: Any) -> SsdTier:
        fields: dict[str, Any] = {"path": str(tmp_path / "ssd"), "capacity": MIB, "segment_size": 64 * KIB,
                                  "queue_depth": 8, "fsync": False}
        fields.update(overrides)
        tier = SsdTier(SsdOptions(**fields))
        built.append(tier)
        return tier

    yield make
    for tier in built:
        tier.close()


def keys_of(count: int, salt: str = "k") -> list[BlockKey]:
    return [BlockKey("test/ssd", f"{salt}-{i}".encode(), 0) for i in range(count)]


def blocks_of(count: int, size: int) -> list[bytes]:
    return [os.urandom(size) for _ in range(count)]


def read_back(tier: SsdTier, keys: list[BlockKey], size: int) -> tuple[list[bool], list[bytes]]:
    dests = [bytearray(size) for _ in keys]
    hits = tier.get_into(keys, dests)
    return hits, [bytes(d) for d in dests]
