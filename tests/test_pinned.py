"""The record of pinned host ranges the GPU lanes consult before queueing DMA."""

from __future__ import annotations

import numpy as np
import pytest

from pegaflow_core import pinned

BASE = 1 << 44  # far from anything this process maps: the record is only numbers


@pytest.fixture
def two_touching_chunks():
    """A pool pinned in two chunks back to back, as the DRAM tier's background pinning leaves it."""
    pinned.add(BASE, 1000)
    pinned.add(BASE + 1000, 1000)
    yield
    pinned.remove(BASE)
    pinned.remove(BASE + 1000)


def test_a_range_is_covered_only_inside_one_chunk(two_touching_chunks):
    addresses = np.array([BASE, BASE + 900, BASE + 1500, BASE + 1990, BASE - 10], dtype=np.uint64)
    lengths = np.array([1000, 200, 500, 20, 5], dtype=np.uint64)
    # BASE+900..1100 and BASE+1990..2010 cross an edge: the second into memory nobody pinned
    assert pinned.covered(addresses, lengths).tolist() == [True, False, True, False, False]


def test_range_index_tells_touching_chunks_apart(two_touching_chunks):
    addresses = np.array([BASE - 1, BASE, BASE + 999, BASE + 1000, BASE + 1999, BASE + 2000], dtype=np.uint64)
    index = pinned.range_index(addresses)
    first = int(index[1])
    assert index.tolist() == [-1, first, first, first + 1, first + 1, -1]


def test_nothing_pinned_covers_nothing():
    addresses = np.array([7, 8], dtype=np.uint64)
    assert pinned.covered(addresses, np.ones(2, dtype=np.uint64)).tolist() == [False, False]
    assert pinned.range_index(addresses).tolist() == [-1, -1]
