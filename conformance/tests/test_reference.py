"""The contracts pass against small, correct in-memory backends."""

from __future__ import annotations

import pytest
from reference_backends import DictIndex, DictTier, DictTierOptions, InProcessTransport, PersistentDictTier

from pegaflow_conformance import IndexContract, TierContract, TransportContract


class TestDictTier(TierContract):
    @pytest.fixture
    def tier_factory(self, tmp_path):
        return lambda capacity_bytes: DictTier(DictTierOptions(capacity_bytes))


class TestPersistentDictTier(TierContract):
    block_sizes = (4096,)

    @pytest.fixture
    def tier_factory(self, tmp_path):
        return lambda capacity_bytes: PersistentDictTier(DictTierOptions(capacity_bytes, store=str(tmp_path)))


class TestDictIndex(IndexContract):
    @pytest.fixture
    def index_factory(self):
        return DictIndex


class TestInProcessTransport(TransportContract):
    @pytest.fixture
    def transport_factory(self):
        return InProcessTransport


class TestUnoverriddenFixture(TierContract):
    """The default fixture explains what to override (checked by test_missing_fixture_message)."""

    __test__ = False
