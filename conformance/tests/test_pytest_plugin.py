"""``pytest --pegaflow-conformance`` builds and runs contract classes for registered backends."""

from __future__ import annotations

import textwrap

import pytest

from pegaflow_core.plugins import PluginRecord, get_registry

REGISTER = """
import reference_backends as ref
from pegaflow_core.plugins import PluginRecord, get_registry

registry = get_registry(reload=True)
for role, cls in {classes}:
    registry.add(PluginRecord(role, cls.kind, cls, "reference", "pegaflow-conformance-tests", "0"))
"""

FAST = ("-p", "no:randomly", "-p", "no:cacheprovider", "-m", "not pegaflow_stateful")


@pytest.fixture(autouse=True)
def fresh_registry():
    yield
    get_registry(reload=True)  # drop the records a child session added


def _only(*kinds: str) -> list[str]:
    return [f"--pegaflow-backend={kind}" for kind in kinds]


def test_runs_contracts_for_registered_backends(pytester: pytest.Pytester) -> None:
    classes = '[("tier", ref.DictTier), ("tier", ref.PersistentDictTier), ("tier", ref.NeedsHelpTier), ("index", ref.DictIndex), ("transport", ref.InProcessTransport)]'
    pytester.makeconftest(REGISTER.format(classes=classes))
    kinds = _only("tier:ref-dict", "ref-persistent", "ref-needs-help", "index:ref-index", "transport:ref-inproc")
    result = pytester.runpytest_inprocess("--pegaflow-conformance", "-rs", "-v", *kinds, *FAST)
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines_random(
        [
            "*TestRefDictTier::test_round_trip_each_block_size PASSED*",
            "*TestRefPersistentTier::test_persistent_tier_survives_reopen PASSED*",
            "*TestRefIndexIndex::test_acquire_longest_prefix_stops_at_first_miss PASSED*",
            "*TestRefInprocTransport::test_read_batch PASSED*",
            "*TestRefNeedsHelpTier::test_contains SKIPPED*",
            "*tier 'ref-needs-help' (pegaflow-conformance-tests) returns no conformance_options()*",
        ]
    )
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] > 60 and "failed" not in outcomes


def test_broken_registered_backend_fails(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        textwrap.dedent(
            """
            import reference_backends as ref

            class LosesBlocks(ref.DictTier):
                kind = "ref-loses-blocks"

                def contains(self, keys):
                    return [False] * len(super().contains(keys))
            """
        )
        + REGISTER.format(classes='[("tier", LosesBlocks)]')
    )
    result = pytester.runpytest_inprocess("--pegaflow-conformance", *_only("ref-loses-blocks"), *FAST)
    result.stdout.fnmatch_lines(["FAILED *TestRefLosesBlocksTier::test_contains*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_explicit_paths_are_still_collected(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(REGISTER.format(classes='[("index", ref.DictIndex)]'))
    pytester.makepyfile(test_mine="def test_mine():\n    pass\n")
    result = pytester.runpytest_inprocess("--pegaflow-conformance", "test_mine.py", *_only("ref-index"), "-k", "mine or insert_and_lookup", *FAST)
    result.assert_outcomes(passed=2)


def test_without_the_flag_nothing_is_added(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_mine="def test_mine():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(passed=1)


def test_no_matching_backend_is_a_skip(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--pegaflow-conformance", *_only("no-such-kind"), "-rs", "-p", "no:randomly")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no pegaflow tier, index or transport plugin matched*"])


def test_load_plugins_env_restricts_entry_points(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    entry_point_tiers = [r for r in get_registry(reload=True).records() if r.role == "tier" and r.plugin != "reference"]
    monkeypatch.setenv("PEGAFLOW_LOAD_PLUGINS", "")
    get_registry(reload=True)
    result = pytester.runpytest_inprocess("--pegaflow-conformance", "--collect-only", "-q", "-p", "no:randomly")
    out = result.stdout.str()
    for record in entry_point_tiers:
        if not record.distribution.startswith("pegaflow-core"):
            assert f"{record.kind.capitalize()}Tier" not in out, out
    assert "Test" in out


def test_markers_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--markers")
    result.stdout.fnmatch_lines(["*pegaflow_conformance:*", "*pegaflow_stateful:*"])


def test_registry_record_shape() -> None:
    # The generated module relies on these fields; fail here first if core changes them.
    fields = set(PluginRecord.__dataclass_fields__)
    assert {"role", "kind", "cls", "distribution", "version"} <= fields
