"""Deliberately broken backends make the contracts fail (run in a child session with pytester).

Each case subclasses a correct reference backend, breaks one thing, and checks that the named
contract tests fail while the suite as a whole still runs.
"""

from __future__ import annotations

import textwrap

import pytest

HEADER = """
import pytest
from reference_backends import *
from pegaflow_conformance import IndexContract, TierContract, TransportContract
from pegaflow_core.errors import InvalidArgument
"""

CASES = {
    "tier_get_into_wrong_bytes": (
        """
        class Broken(DictTier):
            def get_into(self, keys, dests):
                hits = super().get_into(keys, dests)
                for dest, hit in zip(dests, hits):
                    if hit:
                        memoryview(dest).cast("B")[0] ^= 0xFF
                return hits

        class TestBroken(TierContract):
            @pytest.fixture
            def tier_factory(self, tmp_path):
                return lambda capacity_bytes: Broken(DictTierOptions(capacity_bytes))
        """,
        ["test_round_trip_each_block_size", "test_get_into_numpy_and_bytearray_destinations", "test_partial_hits_are_a_mask", "test_stateful"],
    ),
    "tier_put_overwrites": (
        """
        class Broken(DictTier):
            def put(self, keys, blocks):
                self.evict([k for k in keys if isinstance(k, BlockKey)])
                return super().put(keys, blocks)

        class TestBroken(TierContract):
            @pytest.fixture
            def tier_factory(self, tmp_path):
                return lambda capacity_bytes: Broken(DictTierOptions(capacity_bytes))
        """,
        ["test_put_existing_key_answers_true_and_keeps_bytes"],
    ),
    "tier_ignores_capacity": (
        """
        class Broken(DictTier):
            def __init__(self, options):
                super().__init__(DictTierOptions(10**12))

        class TestBroken(TierContract):
            @pytest.fixture
            def tier_factory(self, tmp_path):
                return lambda capacity_bytes: Broken(DictTierOptions(capacity_bytes))
        """,
        ["test_capacity_put_answers_false_when_full", "test_evict_frees_room"],
    ),
    "tier_partial_batch_on_bad_input": (
        """
        class Broken(DictTier):
            def put(self, keys, blocks):
                good = [(k, b) for k, b in zip(keys, blocks) if isinstance(k, BlockKey)]
                super().put([k for k, _ in good], [b for _, b in good])
                return super().put(keys, blocks)

            def get_into(self, keys, dests):
                out = []
                for k, d in zip(keys, dests):
                    out += super().get_into([k], [d])
                return out

        class TestBroken(TierContract):
            @pytest.fixture
            def tier_factory(self, tmp_path):
                return lambda capacity_bytes: Broken(DictTierOptions(capacity_bytes))
        """,
        ["test_put_non_blockkey_stores_nothing", "test_wrong_size_destination_is_left_untouched"],
    ),
    "tier_reserve_visible_early": (
        """
        class Broken(DictTier):
            def reserve(self, keys, nbytes):
                views = super().reserve(keys, nbytes)
                for k in keys:
                    self._blocks[k] = self._reserved[k]
                return views

        class TestBroken(TierContract):
            @pytest.fixture
            def tier_factory(self, tmp_path):
                return lambda capacity_bytes: Broken(DictTierOptions(capacity_bytes))
        """,
        ["test_host_views_reserve_commit"],
    ),
    "tier_forgets_on_reopen": (
        """
        class Broken(PersistentDictTier):
            def close(self):
                self._blocks.clear()
                super().close()

        class TestBroken(TierContract):
            @pytest.fixture
            def tier_factory(self, tmp_path):
                return lambda capacity_bytes: Broken(DictTierOptions(capacity_bytes, store=str(tmp_path)))
        """,
        ["test_persistent_tier_survives_reopen"],
    ),
    "index_acquire_ignores_misses": (
        """
        class Broken(DictIndex):
            def acquire(self, keys, ttl_s, owner=""):
                present = [k for k in keys if isinstance(k, BlockKey) and self.lookup([k])[0]]
                return super().acquire(present or keys, ttl_s, owner)

        class TestBroken(IndexContract):
            @pytest.fixture
            def index_factory(self):
                return Broken
        """,
        ["test_acquire_longest_prefix_stops_at_first_miss", "test_acquire_with_no_hit_is_valid", "test_stateful"],
    ),
    "index_victims_ignore_pins_and_order": (
        """
        class Broken(DictIndex):
            def victims(self, tier, count, node=""):
                return sorted((k for k in self._locs if (tier, node) in self._locs[k]), key=lambda k: k.block_hash, reverse=True)[:count]

        class TestBroken(IndexContract):
            @pytest.fixture
            def index_factory(self):
                return Broken
        """,
        ["test_pinned_keys_are_never_victims", "test_victims_lru_order", "test_acquire_and_insert_make_keys_recent"],
    ),
    "index_release_twice": (
        """
        class Broken(DictIndex):
            def release(self, lease_id):
                super().release(lease_id)
                return True

        class TestBroken(IndexContract):
            @pytest.fixture
            def index_factory(self):
                return Broken
        """,
        ["test_pinned_keys_are_never_victims", "test_release_unknown_lease", "test_expire_by_deadline"],
    ),
    "transport_partial_write_then_error": (
        """
        class Broken(InProcessTransport):
            def _transfer(self, ops, write):
                for op in ops:  # copies the good ops before noticing the bad one
                    self._transfer([op], write)
                return super()._transfer(ops, write)

        class TestBroken(TransportContract):
            @pytest.fixture
            def transport_factory(self):
                return Broken
        """,
        ["test_out_of_bounds_op_writes_nothing"],
    ),
    "transport_drops_ops": (
        """
        class Broken(InProcessTransport):
            def read(self, ops, timeout_s=30.0):
                return super().read(list(ops)[:-1], timeout_s)

        class TestBroken(TransportContract):
            @pytest.fixture
            def transport_factory(self):
                return Broken
        """,
        ["test_read_batch", "test_many_ops_in_one_batch"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_backend_fails_the_suite(pytester: pytest.Pytester, case: str) -> None:
    body, must_fail = CASES[case]
    pytester.makepyfile(test_broken=HEADER + textwrap.dedent(body))
    # Shrinking a failing state machine takes long and proves nothing more here.
    pytester.makeconftest(
        """
        import pegaflow_conformance.stateful as stateful
        from hypothesis import Phase, settings
        stateful.SETTINGS = settings(stateful.SETTINGS, phases=[Phase.explicit, Phase.generate], database=None)
        """
    )
    selection = [] if "test_stateful" in must_fail else ["-m", "not pegaflow_stateful"]
    result = pytester.runpytest_inprocess("-q", "-p", "no:randomly", "-p", "no:cacheprovider", *selection)
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= len(must_fail), result.stdout.str()
    for name in must_fail:
        result.stdout.fnmatch_lines([f"FAILED *TestBroken::{name}*"])


def test_missing_fixture_says_what_to_override(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_forgot=HEADER
        + textwrap.dedent(
            """
            class TestForgot(IndexContract):
                pass
            """
        )
    )
    result = pytester.runpytest_inprocess("-q", "-p", "no:randomly", "-k", "test_insert_and_lookup")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*must override the 'index_factory' fixture*"])


def test_missing_capability_skips_with_a_reason(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain=HEADER
        + textwrap.dedent(
            """
            class TestPlain(TierContract):
                @pytest.fixture
                def tier_factory(self, tmp_path):
                    return lambda capacity_bytes: PersistentDictTier(DictTierOptions(capacity_bytes, store=str(tmp_path)))
            """
        )
    )
    result = pytester.runpytest_inprocess("-q", "-rs", "-p", "no:randomly", "-k", "host_views", "-m", "pegaflow_conformance")
    result.assert_outcomes(skipped=4)
    result.stdout.fnmatch_lines(["*PersistentDictTier does not declare capabilities.host_views*"])
