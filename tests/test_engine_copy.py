"""The engine-side load (engine_copy.py) against real daemon processes: a cma engine maps the
daemon's pool and copies its hits itself; what the daemon must handle first (a block recovered
from the journal and not verified yet) still goes through the daemon's Load."""

from __future__ import annotations

import dataclasses
import random

import pytest

from daemon_helpers import SMALL, dram_config, wait_for
from pegaflow_core._proto import pegaflow_pb2 as pb
from pegaflow_core.client import LoadHandle, PegaflowClient
from pegaflow_core.engine_copy import EngineLoad
from pegaflow_core.errors import NotFound
from pegaflow_core.launcher import DaemonProcess, free_port
from pegaflow_core.sim_engine import SimulatedEngine, block_hashes, block_matches


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32_000) for _ in range(n)]


@pytest.fixture(scope="module")
def daemon():
    with DaemonProcess(dram_config()) as d:
        yield d


def load(engine: SimulatedEngine, prompt: list[int], blocks: int):
    """Query the prompt's blocks (``blocks`` hits expected) and start loading them."""
    hashes = block_hashes(prompt, SMALL.block_size)
    hit = engine.client.query(engine.handle, hashes)
    assert hit.hit_blocks == blocks
    ids = engine.allocate(blocks)
    return engine.client.load(engine.handle, hit.lease_id, ids), ids, hashes


def saved_then_loaded(engine: SimulatedEngine, seed: int, blocks: int, by: type) -> None:
    """Compute and save a prompt, load it back: by ``by`` (EngineLoad or LoadHandle), exact bytes."""
    prompt = tokens(16 * blocks, seed)
    engine.prefill(prompt)
    handle, ids, hashes = load(engine, prompt, blocks)
    assert isinstance(handle, by) and handle.wait().failed_block_ids == ()
    assert all(block_matches(engine.cache, b, h) for b, h in zip(ids, hashes))


def test_cma_engine_copies_its_hits_from_the_mapped_pool_layer_by_layer(daemon):
    with PegaflowClient(daemon.endpoint, timeout_s=10) as client:
        engine = SimulatedEngine(client, dataclasses.replace(SMALL, num_layers=6), model="engine-copy", memory="cma")
        try:
            assert engine.handle.engine_copy_ready(10)  # opened off the registration's path
            prompt = tokens(16 * 12, seed=1)
            engine.prefill(prompt)
            handle, ids, hashes = load(engine, prompt, 12)
            assert isinstance(handle, EngineLoad)
            seen = []
            for layer in range(6):
                handle.wait_layer(layer)
                seen.append(handle.layers_done)
            result = handle.wait()
            assert seen == sorted(seen) and seen[-1] == 6
            assert result.failed_block_ids == () and result.bytes == 12 * engine.shape.block_bytes
            assert all(block_matches(engine.cache, b, h) for b, h in zip(ids, hashes))
            wait_for(lambda: client.stats().leases == 0)  # released after the copy, by the client
            assert client.stats().counters["blocks_total{direction=located,tier=dram}"] >= 12
        finally:
            engine.close()


def test_without_engine_copy_the_daemon_loads_the_same_bytes(daemon):
    with PegaflowClient(daemon.endpoint, timeout_s=10, engine_copy=False) as client:
        engine = SimulatedEngine(client, SMALL, model="daemon-copy", memory="cma")
        try:
            assert not engine.handle.engine_copy_ready(10) and engine.handle.loader is None
            saved_then_loaded(engine, seed=2, blocks=8, by=LoadHandle)
        finally:
            engine.close()


def test_shm_engines_and_remote_clients_leave_loads_to_the_daemon(daemon):
    with PegaflowClient(daemon.endpoint, timeout_s=10) as local, \
            PegaflowClient(daemon.endpoint, timeout_s=10, local=False) as remote:
        shm = SimulatedEngine(local, SMALL, model="shm-copy", memory="shm")
        far = SimulatedEngine(remote, SMALL, model="far-copy", memory="cma")
        try:
            # shm: the daemon maps the engine's file (no copy kind of its own here); a client that
            # does not reach the daemon's local socket may be on another machine, where the pool's
            # path means nothing.
            assert not shm.handle.engine_copy_ready(10) and not far.handle.engine_copy_ready(10)
            prompt = tokens(16 * 4, seed=3)
            far.prefill(prompt)
            assert far.prefill(prompt, verify=True).hit_blocks == 4
        finally:
            shm.close()
            far.close()


def test_locate_checks_the_lease_like_load(daemon):
    with PegaflowClient(daemon.endpoint, timeout_s=10) as client:
        engine = SimulatedEngine(client, SMALL, model="locate-checks", memory="cma")
        try:
            with pytest.raises(NotFound, match="unknown or expired lease"):
                client._call("Locate", pb.LoadRequest(context_id=engine.handle.context_id, lease_id="nope",
                                                      block_ids=[0]), "locate")
            # the same request through load(): Locate fails, the daemon's Load reports why
            handle = client.load(engine.handle, "nope", [0])
            assert isinstance(handle, LoadHandle)
            with pytest.raises(NotFound, match="unknown or expired lease"):
                handle.wait()
        finally:
            engine.close()


def test_blocks_recovered_after_a_restart_are_verified_by_the_daemon_first(tmp_path):
    config = (f"server: {{listen: '127.0.0.1:{free_port()}'}}\n"
              f"tiers: [{{kind: dram, capacity: 16mb, chunk: 1mb, pool_name: copy, shm_dir: '{tmp_path}'}}]\n")
    prompt = tokens(16 * 6, seed=4)
    first = DaemonProcess(config, workdir=tmp_path).start()
    try:
        with PegaflowClient(first.endpoint, timeout_s=10) as client:
            engine = SimulatedEngine(client, SMALL, model="recovered", memory="cma")
            engine.prefill(prompt)
            engine.close()
    finally:
        first.close()  # a clean stop seals every block: the next daemon re-attaches the pool
    second = DaemonProcess(config, workdir=tmp_path).start()
    try:
        with PegaflowClient(second.endpoint, timeout_s=10) as client:
            engine = SimulatedEngine(client, SMALL, model="recovered", memory="cma")
            try:
                assert engine.handle.engine_copy_ready(10)
                handle, ids, hashes = load(engine, prompt, 6)
                assert isinstance(handle, LoadHandle)  # not verified since the restart: the daemon checks them
                assert handle.wait().failed_block_ids == ()
                handle, ids, hashes = load(engine, prompt, 6)
                assert isinstance(handle, EngineLoad)  # verified now: the engine copies them
                assert handle.wait().failed_block_ids == ()
                assert all(block_matches(engine.cache, b, h) for b, h in zip(ids, hashes))
            finally:
                engine.close()
    finally:
        second.close()


def test_a_restarted_daemon_gets_its_new_pool_mapped(tmp_path):
    config = f"server: {{listen: '127.0.0.1:{free_port()}'}}\n" + dram_config().split("\n", 1)[1]
    first = DaemonProcess(config, workdir=tmp_path).start()
    second = None
    with PegaflowClient(first.endpoint, timeout_s=10) as client:
        engine = SimulatedEngine(client, SMALL, model="remap", memory="cma")
        try:
            assert engine.handle.engine_copy_ready(10)
            old = engine.handle.loader
            before = tokens(16 * 3, seed=6)
            engine.prefill(before)
            stale = client.query(engine.handle, block_hashes(before, SMALL.block_size))  # offsets kept for its load
            assert stale.hit_blocks == 3
            first.close()
            second = DaemonProcess(config, workdir=tmp_path).start()
            wait_for(lambda: engine.handle.loader is not None and engine.handle.loader is not old)
            assert engine.handle.engine_copy_ready(10)
            assert engine.handle.pool[1] != old.pool.pool.path  # an unnamed pool: a new file
            # the old daemon's lease and offsets are not used against the new pool: its Load refuses
            handle = client.load(engine.handle, stale.lease_id, engine.allocate(3))
            assert isinstance(handle, LoadHandle)
            with pytest.raises(NotFound, match="unknown or expired lease"):
                handle.wait()
            saved_then_loaded(engine, seed=5, blocks=5, by=EngineLoad)
        finally:
            engine.close()
            if second is not None:
                second.close()
