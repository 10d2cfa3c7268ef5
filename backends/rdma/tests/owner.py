"""A region owner in its own process, for test_verbs.py's two-process tests.

``python owner.py NBYTES SEED``: builds an RdmaTransport on the same NICs as the tests (the
PEGAFLOW_RDMA_* variables, listening on PEGAFLOW_RDMA_PEER_HOST), registers a numpy region of
``default_rng(SEED)`` bytes, prints one JSON line (address, descriptor in hex) and serves until
stdin closes or it is killed.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from pegaflow_rdma import RdmaOptions, RdmaTransport


def main() -> None:
    nbytes, seed = int(sys.argv[1]), int(sys.argv[2])
    region_buffer = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    options = RdmaOptions(devices=os.environ.get("PEGAFLOW_RDMA_DEVICES", "auto"),
                          host=os.environ.get("PEGAFLOW_RDMA_PEER_HOST", "127.0.0.1"))
    with RdmaTransport(options) as transport:
        region = transport.register(region_buffer)
        print(json.dumps({"address": transport.address, "descriptor": region.descriptor.hex()}), flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
