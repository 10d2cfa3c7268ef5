"""`pegaflow bench engine MODE` end to end on CPU with tiny shapes (the CI smoke test of every mode),
and its errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")


def bench(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pegaflow_core", "bench", "engine", *args, "--json",
                           "--out", str(tmp_path), "--ssd-dir", str(tmp_path / "ssd")],
                          capture_output=True, text=True, timeout=600)


def report(tmp_path, *args: str) -> dict:
    done = bench(tmp_path, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| ratio | value |" in done.stderr or "ratios" in done.stderr  # the readable table
    return json.loads(done.stdout)


def test_ttft(tmp_path):
    r = report(tmp_path, "ttft", "--prompts", "2")
    f = r["figures"]
    assert f["cold"]["hit_fraction"] == 0 and f["cold"]["n"] == 2
    assert f["warm_dram"]["hit_fraction"] == f["warm_ssd"]["hit_fraction"] == 0.9  # all but the last block of 160
    assert f["warm_ssd"]["promote_wait_ms_mean"] > 0  # the blocks really came back from the SSD tier
    assert [p["cached_tokens"] for p in f["sweep"]] == sorted(p["cached_tokens"] for p in f["sweep"])
    assert f["sweep"][-1]["cached_tokens"] == 144
    assert set(r["ratios"]) >= {"cold / warm_dram (mean)", "cold / warm_dram (p99)", "cold / warm_ssd (mean)"}
    assert (tmp_path / "ttft-vs-prefix.csv").exists() or (tmp_path / "ttft-vs-prefix.png").exists()


def test_share(tmp_path):
    r = report(tmp_path, "share")
    shared, private = r["figures"]["shared"], r["figures"]["private"]
    assert shared["requests"] == private["requests"] == 8
    assert shared["servers"] == 1 and private["servers"] == 2
    assert shared["hit_rate"] > 0 and shared["prefill_tokens_per_s"] > 0
    assert "prefill tokens/s, shared / private" in r["ratios"]


def test_restart(tmp_path):
    r = report(tmp_path, "restart")
    f = r["figures"]
    assert f["pegaflow"]["after_restart_hit_tokens"] == 144
    assert f["daemon restarted too"]["after_restart_hit_tokens"] == 144
    assert f["no pegaflow"]["after_restart_hit_tokens"] == 0
    assert f["pegaflow"]["restart_to_ready_s"] > 0


def test_transfer(tmp_path):
    """The KV backend alone: every round's load is checked byte for byte inside the mode."""
    done = bench(tmp_path, "transfer", "--prompts", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| direction | median GB/s | best GB/s |" in done.stderr
    f = json.loads(done.stdout)["figures"]
    assert f["blocks"] == 10 and f["save_gbps"] > 0 and f["load_gbps"] > 0


def test_mla(tmp_path):
    r = report(tmp_path, "mla", "--prompts", "2")
    f = r["figures"]
    assert f["stored_once"] and f["daemon_blocks"] == 2 * (160 // 16)
    assert [rank["saved_blocks"] for rank in f["ranks"]] == [20, 0]  # only rank 0 saves
    assert all(rank["warm_hit_fraction"] == 0.9 for rank in f["ranks"])  # every rank loads
    assert r["ratios"]["blocks stored / (blocks x TP ranks)"] == 0.5


@pytest.mark.parametrize("args, message", [
    (("ttft", "--prompt-tokens", "8"), "--prompt-tokens must be at least two blocks (32), got 8"),
    (("ttft", "--pool-size", "lots"), "--pool-size: expected a size like"),
    (("ttft", "--backend", "reference"), "--backend reference runs on a GPU"),
    (("mla", "--backend", "reference"), "--backend reference runs on a GPU (pegaflow-llm registers CUDA IPC handles only) and for modes ttft, restart and transfer"),
    (("ttft", "--q-heads", "3"), "model shape: q_heads (3) must be a multiple of kv_heads"),
    (("mla", "--tp", "0"), "--tp must be > 0, got 0"),
    (("ttft", "--device", "tpu"), "--device must be cpu, cuda, cuda:N or auto, got 'tpu'"),
])
def test_bad_input_is_refused_with_what_was_wrong(tmp_path, args, message):
    done = bench(tmp_path, *args)
    assert done.returncode == 2
    assert f"pegaflow: error: {message}" in done.stderr, done.stderr[-2000:]
