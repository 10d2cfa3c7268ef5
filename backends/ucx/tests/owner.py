"""A region owner in its own process, for test_two_process.py and the benchmark's idea of a peer.

Run as ``python owner.py NBYTES [SEED]``: builds a UcxTransport, registers a numpy region filled
with ``numpy.random.default_rng(SEED)`` bytes, prints one JSON line (address, descriptor in hex,
nbytes) and serves until stdin closes or the process is killed.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from pegaflow_ucx import UcxTransport


def pattern(nbytes: int, seed: int) -> np.ndarray:
    """The bytes the owner serves; the test recomputes them to check what it read."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def main() -> None:
    nbytes = int(sys.argv[1])
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    region_buffer = pattern(nbytes, seed)
    with UcxTransport() as transport:
        region = transport.register(region_buffer)
        print(json.dumps({"address": transport.address, "descriptor": region.descriptor.hex(), "nbytes": nbytes}),
              flush=True)
        sys.stdin.read()  # serve until the test closes our stdin (or kills us)


if __name__ == "__main__":
    main()
