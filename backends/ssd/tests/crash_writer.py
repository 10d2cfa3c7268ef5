"""Child process of test_crash.py: put blocks in a loop and print each acknowledged key index.

Block ``i`` is a pure function of ``i`` (seeded random bytes), so the parent can check what it
reads back after a kill -9 without being told the bytes.
"""

from __future__ import annotations

import sys

import numpy as np

from pegaflow_core import BlockKey
from pegaflow_ssd import SsdOptions, SsdTier

BLOCK = 24 * 1024 + 100


def block(i: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, BLOCK, dtype=np.uint8).tobytes()


def key(i: int) -> BlockKey:
    return BlockKey("crash/test", i.to_bytes(8, "little"), 0)


def main(path: str, io: str, start: int) -> None:
    tier = SsdTier(SsdOptions(path=path, capacity=64 << 20, segment_size=1 << 20, io=io, fsync=False, queue_depth=8))
    i = start
    while True:
        batch = list(range(i, i + 7))
        answers = tier.put([key(j) for j in batch], [block(j) for j in batch])
        print(" ".join(str(j) for j, ok in zip(batch, answers) if ok), flush=True)
        if i % 21 == 0:
            tier.evict([key(i - 3)])  # some dead marks in flight too
            print(f"evicted {i - 3}", flush=True)
        i += 7


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
