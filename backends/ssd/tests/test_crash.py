"""kill -9 while writing loses no acknowledged block: a child puts blocks in a loop and prints
every key whose put returned True; it is killed at a random moment; the tier reopened here must
return every acknowledged block byte for byte (and nothing for evicted ones)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .conftest import read_back
from .crash_writer import BLOCK, block, key


def _run_and_kill(path: Path, io: str, start: int, seconds: float) -> tuple[set[int], set[int]]:
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.crash_writer", str(path), io, str(start)],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    acked: set[int] = set()
    evicted: set[int] = set()
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    deadline = time.monotonic() + 20
    while not lines and time.monotonic() < deadline and child.poll() is None:  # wait until writing began
        time.sleep(0.02)
    assert lines, f"the writer never acknowledged a put: {child.stderr.read() if child.poll() is not None else ''}"
    time.sleep(seconds)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    reader.join(timeout=10)
    for line in lines:
        if not line.endswith("\n"):
            continue  # the kill cut this line: its keys may or may not be acknowledged
        if line.startswith("evicted "):
            evicted.add(int(line.split()[1]))
        else:
            acked.update(int(word) for word in line.split())
    return acked, evicted


def test_kill_minus_9_loses_no_acknowledged_block(tmp_path: Path, io_mode: str) -> None:
    from pegaflow_ssd import SsdOptions, SsdTier

    path = tmp_path / "ssd"
    rng = random.Random(os.getpid())
    all_acked: set[int] = set()
    all_evicted: set[int] = set()
    for round_ in range(2):  # the second round writes on top of a crashed log
        acked, evicted = _run_and_kill(path, io_mode, 1_000_000 * (round_ + 1), rng.uniform(0.2, 0.8))
        all_acked |= acked
        all_evicted |= evicted
        live = sorted(all_acked - all_evicted)
        assert live, "the writer acknowledged nothing before it was killed"
        tier = SsdTier(SsdOptions(path=str(path), capacity=64 << 20, segment_size=1 << 20, io=io_mode, fsync=False))
        try:
            hits, got = read_back(tier, [key(i) for i in live], BLOCK)
            lost = [i for i, hit in zip(live, hits) if not hit]
            assert not lost, f"acknowledged blocks lost after kill -9: {lost[:10]} ({len(lost)} of {len(live)})"
            wrong = [i for i, data in zip(live, got) if data != block(i)]
            assert not wrong, f"blocks read back with wrong bytes: {wrong[:10]}"
            gone = sorted(all_evicted & all_acked)
            assert tier.contains([key(i) for i in gone]) == [False] * len(gone), "an evicted block came back"
        finally:
            tier.close()
