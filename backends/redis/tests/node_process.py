"""A daemon stand-in for the crash tests, run as ``python node_process.py URL PREFIX NODE``.

It joins the cluster as NODE (fast heartbeats), registers an address, publishes NODE_KEYS on its
dram tier, leases the NODE_KEYS published by node "b" for NODE_LEASE_TTL seconds, prints ``ready`` and
waits to be killed (SIGKILL: no clean close, exactly like a crashed daemon).
"""

from __future__ import annotations

import sys
import time

from pegaflow_redis.testing import FAST, NODE_LEASE_TTL, node_keys

from pegaflow_core.index import Location
from pegaflow_redis import RedisIndex, RedisIndexOptions


def main(url: str, prefix: str, node: str) -> None:
    index = RedisIndex(RedisIndexOptions(url=url, node=node, key_prefix=prefix, **FAST))
    index.register_node(node, f"127.0.0.1:1{len(node)}", {"loopback": f"{node}-pool".encode()})
    index.insert([(key, Location("dram", "", 4096, checksum=i)) for i, key in enumerate(node_keys(node))])
    lease = index.acquire(node_keys("b"), ttl_s=NODE_LEASE_TTL, owner="engine-1")
    print(f"ready {lease.hits}", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main(*sys.argv[1:4])
