"""The daemon's per-hit load route (device_io.py) with a real daemon process, on CPU.

The direct route reads a lower tier's blocks straight into an engine's GPU memory (pegaflow-gds).
Its GPU half runs on the GPU machine (backends/gds/gpu-test.sh); the daemon's choice of route runs
here, with a plugin installed the way any third party's is (a distribution with a ``pegaflow``
entry point, found on PYTHONPATH): a memory kind that declares its regions device memory while
they are really a shared-memory file, and a lower tier with device I/O that writes through those
addresses. A hit held only by that tier must skip promotion at Query ("not loading"), arrive at
Load through ``read_into_device`` into exactly the engine blocks asked for, and a block the tier
cannot deliver directly must fall back to the staged path, never to wrong bytes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import textwrap

import pytest

from daemon_helpers import SMALL
from pegaflow_core.client import PegaflowClient
from pegaflow_core.launcher import DaemonProcess
from pegaflow_core.sim_engine import SimulatedEngine, block_hashes, block_matches

PLUGIN = '''
"""Test plugin: device-I/O routing without a GPU."""
import ctypes
import threading
from dataclasses import dataclass

from pegaflow_core import Tier, TierUsage, byte_view, hookimpl
from pegaflow_core.default_plugins.host_memory import SharedFileMemory
from pegaflow_core.tier import TierCapabilities


class DeviceLikeShm(SharedFileMemory):
    kind = "shm-as-device"
    device_memory = True


@dataclass(frozen=True)
class HostIoOptions:
    capacity: int = 64 << 20
    refuse_every: int = 0  # read_into_device reports False for every n-th block (0: never)


class HostIoTier(Tier):
    """A lower tier with device I/O whose 'device addresses' are host addresses."""
    kind = "host-io"
    Options = HostIoOptions
    capabilities = TierCapabilities(host_views=False, device_io=True)
    direct_loads = True

    def __init__(self, options):
        self.options, self.blocks, self.lock, self.direct_reads = options, {}, threading.Lock(), 0

    def put(self, keys, blocks):
        with self.lock:
            for key, block in zip(keys, blocks):
                self.blocks.setdefault(key, bytes(byte_view(block)))
        return [True] * len(keys)

    def get_into(self, keys, dests):
        with self.lock:
            found = [self.blocks.get(k) for k in keys]
        for value, dest in zip(found, dests):
            if value is not None:
                byte_view(dest, writable=True)[:] = value
        return [v is not None for v in found]

    def read_into_device(self, keys, dests):
        out = []
        for n, (key, segments) in enumerate(zip(keys, dests)):
            with self.lock:
                value = self.blocks.get(key)
            if value is None or (self.options.refuse_every and n % self.options.refuse_every == 0):
                out.append(False)
                continue
            at = 0
            for address, nbytes in segments:
                ctypes.memmove(address, value[at:at + nbytes], nbytes)
                at += nbytes
            assert at == len(value), (at, len(value))
            self.direct_reads += 1
            out.append(True)
        return out

    def contains(self, keys):
        with self.lock:
            return [k in self.blocks for k in keys]

    def evict(self, keys):
        with self.lock:
            return sum(self.blocks.pop(k, None) is not None for k in keys)

    def usage(self):
        with self.lock:
            used = sum(map(len, self.blocks.values()))
            return TierUsage(self.options.capacity, used, len(self.blocks))

    def close(self):
        pass


@hookimpl
def register_tiers(register):
    register(HostIoTier)


@hookimpl
def register_memory_kinds(register):
    register(DeviceLikeShm)
'''


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    root = tmp_path / "site"
    (root / "pegaflow_devtest-0.1.dist-info").mkdir(parents=True)
    (root / "pegaflow_devtest-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: pegaflow-devtest\nVersion: 0.1\n")
    (root / "pegaflow_devtest-0.1.dist-info" / "entry_points.txt").write_text("[pegaflow]\ndevtest = pegaflow_devtest\n")
    (root / "pegaflow_devtest.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return root


def config(refuse_every: int = 0) -> str:
    # top tier of 8 blocks: after a 12-block prompt and an 8-block one, the first prompt is only
    # in the host-io tier, and the top tier has room to stage what the direct route refuses
    return f"""
index: {{kind: local}}
tiers:
  - {{kind: dram, capacity: {8 * SMALL.block_bytes}, chunk: {SMALL.block_bytes}}}
  - {{kind: host-io, refuse_every: {refuse_every}}}
"""


def device_like(engine: SimulatedEngine) -> None:
    """Register the engine's shm KV cache again as the device-memory kind."""
    spec = engine.cache.context_spec(engine.namespace, instance_id="dev")
    regions = tuple(dataclasses.replace(r, kind="shm-as-device") for r in spec.regions)
    engine.handle = engine.client.register_context(dataclasses.replace(spec, regions=regions))


def prompt(seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(16 * 12)]


@pytest.mark.parametrize("refuse_every", [0, 3], ids=["all-direct", "some-fall-back-to-staged"])
def test_hits_in_a_device_io_tier_load_straight_into_device_memory(plugin_path, refuse_every):
    with DaemonProcess(config(refuse_every)) as daemon, PegaflowClient(daemon.endpoint) as client:
        saver = SimulatedEngine(client, SMALL, model="direct", instance_id="saver")
        tokens = prompt(1)
        for blocks in (4, 8, 12):  # 4 new blocks a step: the top tier spills the older ones down
            assert saver.prefill(tokens[: 16 * blocks]).saved_blocks == 4
        other = prompt(2)
        for blocks in (4, 8):
            saver.prefill(other[: 16 * blocks])
        assert client.stats().tiers[0].blocks == 8  # the other prompt; the first is only lower down
        hashes = block_hashes(tokens, 16)
        loader = SimulatedEngine(client, SMALL, model="direct", instance_id="loader", fill=False)
        device_like(loader)
        hit = client.query(loader.handle, hashes)
        assert hit.hit_blocks == 12 and not hit.loading  # nothing promoted for a direct-route engine
        ids = loader.allocate(12)
        result = client.load(loader.handle, hit.lease_id, ids).wait()
        assert not result.failed_block_ids
        assert all(block_matches(loader.cache, b, h) for b, h in zip(ids, hashes))  # exact bytes, right blocks
        counters = client.stats().counters
        direct = counters.get("bytes_total{direction=load_direct,tier=host-io}", 0)
        promoted = counters.get("bytes_total{direction=promote,tier=host-io}", 0)
        if refuse_every:  # blocks 0, 3, 6, 9 refused: staged (promoted, then copied), the rest direct
            assert (direct, promoted) == (8 * SMALL.block_bytes, 4 * SMALL.block_bytes)
        else:
            assert (direct, promoted) == (12 * SMALL.block_bytes, 0)
        # a host-memory engine (shm) never gets the direct route: its hits are promoted, staged
        # through the small top tier (what does not fit there is recomputed, never wrong)
        plain = SimulatedEngine(client, SMALL, model="direct", instance_id="plain", fill=False)
        plain.prefill(tokens, verify=True)
        after = client.stats().counters
        assert after.get("bytes_total{direction=load_direct,tier=host-io}", 0) == direct
        assert after.get("bytes_total{direction=promote,tier=host-io}", 0) > promoted
        for engine in (saver, loader, plain):
            engine.close()
