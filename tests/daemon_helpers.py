"""Shapes and configs shared by the daemon tests (importable: `tests/` is on pytest's pythonpath)."""

from __future__ import annotations

import time
from collections.abc import Callable

from pegaflow_core.host_kv import KVShape

# 4 layers x (K, V) x 16 tokens x 2 heads x 32 dims x 2 bytes = 16 KiB per block
SMALL = KVShape(num_layers=4, num_blocks=64, block_size=16, num_kv_heads=2, head_size=32, dtype="float16")
# 4 layers x (K, V) x 16 tokens x 8 heads x 256 dims x 2 bytes = 512 KiB per block
WIDE = KVShape(num_layers=4, num_blocks=48, block_size=16, num_kv_heads=8, head_size=256, dtype="float16")


def dram_config(capacity: str = "16mb", chunk: str = "1mb") -> str:
    return f"index: {{kind: local}}\ntiers: [{{kind: dram, capacity: {capacity}, chunk: {chunk}}}]\n"


def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
