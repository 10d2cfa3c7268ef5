"""Every CPU benchmark runs end to end at a small size and reports finite, positive ratios against
its baseline, so a benchmark cannot rot between the sessions that record its figures. (Figures
are never asserted: speed lives in the benchmarks, not in tests.)"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys

import pytest

CASES = {
    "daemon": (["--tokens", "2000", "--iterations", "1", "--control-rounds", "50"], []),
    "remote": (["--blocks", "4", "--rounds", "2"], ["redis-server"]),
    "redis-index": (["--keys", "50", "--rounds", "10"], ["redis-server"]),
    "ssd": (["--size", "64mb", "--repeat", "1"], ["fio"]),
    "ucx": (["--batch", "16mb", "--iterations", "1"], ["ucx_perftest", "ucxx"]),
}


@pytest.mark.parametrize("bench", sorted(CASES))
def test_benchmark_runs_and_reports_finite_ratios(bench: str, tmp_path) -> None:
    args, needs = CASES[bench]
    for need in needs:
        if shutil.which(need) is None and importlib.util.find_spec(need) is None:
            pytest.skip(f"pegaflow bench {bench} needs {need}")
    if bench == "ssd":
        args = [*args, "--dir", str(tmp_path)]
    run = subprocess.run([sys.executable, "-m", "pegaflow_core", "bench", bench, *args, "--json"],
                         capture_output=True, text=True, timeout=300)
    if "invalid choice" in run.stderr:
        pytest.skip(f"the plugin that provides `bench {bench}` is not installed")
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["bench"] == bench and report["figures"] and report["baseline"] and report["ratios"]
    for name, value in report["ratios"].items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
