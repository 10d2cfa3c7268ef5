"""The daemon end to end: a real `pegaflow serve` process, real gRPC, real shared memory."""

from __future__ import annotations

import dataclasses
import os
import random
import urllib.request

import grpc
import pytest

from pegaflow_core._proto import pegaflow_pb2 as pb
from pegaflow_core.client import ContextSpec, PegaflowClient, RegionSpec
from pegaflow_core.errors import InvalidArgument, NotFound
from pegaflow_core.host_kv import HostKVCache
from pegaflow_core.launcher import DaemonProcess
from pegaflow_core.layout import Plane
from pegaflow_core.sim_engine import block_hashes, block_matches

from daemon_helpers import SMALL, dram_config


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32_000) for _ in range(n)]


def test_health_and_stats(client):
    health = client.health()
    assert health.status == "serving" and health.daemon_id
    stats = client.stats()
    assert stats.tiers[0].kind == "dram" and stats.tiers[0].capacity_bytes == 16 << 20


@pytest.mark.parametrize("memory", ["shm", "cma"])
def test_cold_miss_then_warm_hit_with_exact_bytes(make_engine, memory):
    engine = make_engine(model=f"roundtrip-{memory}", memory=memory)
    prompt = tokens(16 * 20 + 5, seed=1)  # 20 full blocks and a partial one
    cold = engine.prefill(prompt)
    assert (cold.blocks, cold.hit_blocks, cold.saved_blocks) == (20, 0, 20)
    warm = engine.prefill(prompt, verify=True)  # verify: every loaded block holds its exact bytes
    assert warm.hit_blocks == 20 and warm.failed_blocks == 0
    assert warm.loaded_bytes == 20 * SMALL.block_bytes


def test_shared_prefix_hits_exactly_the_prefix(make_engine):
    engine = make_engine(model="prefix")
    system = tokens(16 * 8, seed=2)
    engine.prefill(system + tokens(16 * 4, seed=3))
    other = engine.prefill(system + tokens(16 * 4, seed=4), verify=True)
    assert other.hit_blocks == 8


def test_load_streams_progress_per_layer(client, make_engine):
    engine = make_engine(model="layers", num_layers=6)
    prompt = tokens(16 * 10, seed=5)
    engine.prefill(prompt)
    hit = client.query(engine.handle, block_hashes(prompt, 16))
    handle = client.load(engine.handle, hit.lease_id, engine.allocate(10))
    seen = []
    for layer in range(6):
        handle.wait_layer(layer)
        seen.append(handle.layers_done)
    result = handle.wait()
    assert seen == sorted(seen) and seen[-1] == 6 and result.failed_block_ids == ()


def test_identical_blocks_from_two_instances_are_stored_once(client, make_engine):
    a = make_engine(model="shared", instance_id="a")
    b = make_engine(model="shared", instance_id="b")
    prompt = tokens(16 * 6, seed=6)
    a.prefill(prompt)
    used = client.stats().tiers[0].used_bytes
    hashes = block_hashes(prompt, 16)
    result = client.save(b.handle, b.allocate(6), hashes)
    assert (result.stored, result.already_present) == (0, 6)
    assert client.stats().tiers[0].used_bytes == used
    assert b.prefill(prompt, verify=True).hit_blocks == 6  # b loads what a computed


def test_namespaces_are_isolated(make_engine):
    a = make_engine(model="model-a")
    b = make_engine(model="model-b")
    prompt = tokens(16 * 4, seed=7)
    a.prefill(prompt)
    assert b.prefill(prompt).hit_blocks == 0


def test_bad_requests_get_precise_status_codes(client, make_engine):
    engine = make_engine(model="bad")
    h = engine.handle
    with pytest.raises(InvalidArgument, match=r"block_ids\[1\] = 64 is out of range \[0, 64\)"):
        client.save(h, [0, 64], [b"x" * 32, b"y" * 32])
    with pytest.raises(InvalidArgument, match="block_ids has 1 entries but block_hashes has 2"):
        client.save(h, [0], [b"x" * 32, b"y" * 32])
    with pytest.raises(InvalidArgument, match="block_hash"):
        client.save(h, [0], [b""])
    with pytest.raises(NotFound, match="unknown or expired lease"):
        client.load(h, "no-such-lease", [0]).wait()
    with pytest.raises(NotFound, match="unknown context"):
        client._call("Save", pb.SaveRequest(context_id="ctx-nope"), "save")


def test_wrong_block_size_for_a_namespace_is_refused(client, make_engine):
    first = make_engine(model="sized")
    other = HostKVCache(dataclasses.replace(SMALL, head_size=64))
    try:  # an engine that claims the same namespace with another layout
        with pytest.raises(InvalidArgument, match=r"stores blocks of 16384 bytes, but this layout gives 32768"):
            client.register_context(other.context_spec(first.namespace, instance_id="e1"))
    finally:
        other.close()
    assert first.prefill(tokens(32, seed=30)).saved_blocks == 2  # the first one is still served


def test_bad_registrations(client, make_engine):
    engine = make_engine(model="reg")
    spec = engine.cache.context_spec(engine.namespace, instance_id="e0")
    with pytest.raises(InvalidArgument, match="already registered in this session"):
        client.register_context(spec)
    missing = ContextSpec("ns", 4, (RegionSpec(nbytes=4096, path="/dev/shm/pegaflow-kv-0-missing"),), (Plane(0, 0, 0, 1024, 1024),))
    with pytest.raises(InvalidArgument, match="does not exist"):
        client.register_context(missing)
    too_small = ContextSpec("ns", 8, (RegionSpec(nbytes=engine.cache.region.nbytes, path=str(engine.cache.region.path)),),
                            (Plane(0, 0, 0, 1 << 20, 1 << 20),))
    with pytest.raises(InvalidArgument, match="past the end of region 0"):
        client.register_context(too_small)
    gpu = ContextSpec("ns", 1, (RegionSpec(nbytes=1024, kind="cuda_ipc", handle=b"\0" * 64, device=0),), (Plane(0, 0, 0, 1024, 1024),))
    with pytest.raises(InvalidArgument, match="cuda_ipc"):
        client.register_context(gpu)


def test_engines_with_shared_memory_and_private_memory_share_blocks(make_engine):
    shm = make_engine(model="mixed", instance_id="shm", memory="shm")
    private = make_engine(model="mixed", instance_id="cma", memory="cma")
    prompt = tokens(16 * 9, seed=31)
    private.prefill(prompt)
    assert shm.prefill(prompt, verify=True).hit_blocks == 9
    assert private.prefill(prompt, verify=True).hit_blocks == 9


def test_bad_cma_registrations(client):
    plane = (Plane(0, 0, 0, 4096, 4096),)
    gone = ContextSpec("ns", 1, (RegionSpec(nbytes=4096, kind="cma", pid=2**22 - 3, address=0x10000),), plane)
    with pytest.raises(InvalidArgument, match=r"regions\[0\]: cannot access 4096 bytes .* No such process"):
        client.register_context(gone)
    unmapped = ContextSpec("ns", 1, (RegionSpec(nbytes=4096, kind="cma", pid=os.getpid(), address=0x10000),), plane)
    with pytest.raises(InvalidArgument, match="Bad address"):
        client.register_context(unmapped)


def test_lease_of_another_shard_cannot_be_loaded(client, make_engine):
    rank0 = make_engine(model="tp", instance_id="r0")
    rank1 = make_engine(model="tp", instance_id="r1")
    client.unregister_context(rank1.handle)
    rank1.handle = client.register_context(rank1.cache.context_spec(rank1.namespace, instance_id="r1", shard=1, tp_rank=1, tp_size=2))
    prompt = tokens(16 * 3, seed=8)
    rank0.prefill(prompt)
    hit = client.query(rank0.handle, block_hashes(prompt, 16))
    with pytest.raises(InvalidArgument, match="not of this context"):
        client.load(rank1.handle, hit.lease_id, [0, 1, 2]).wait()
    assert client.query(rank1.handle, block_hashes(prompt, 16)).hit_blocks == 0


def test_metrics_endpoint_and_status_command(tmp_path, capsys):
    from pegaflow_core.cli import main
    from pegaflow_core.launcher import free_port

    port = free_port()
    config = dram_config() + f"server: {{metrics: '127.0.0.1:{port}'}}\n"
    with DaemonProcess(config) as d, PegaflowClient(d.endpoint) as c:
        from pegaflow_core.sim_engine import SimulatedEngine

        engine = SimulatedEngine(c, SMALL, model="metrics")
        prompt = tokens(16 * 4, seed=9)
        engine.prefill(prompt)
        engine.prefill(prompt)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'pegaflow_query_blocks_total{result="hit"} 4.0' in text
        assert 'pegaflow_bytes_total{direction="save",tier="dram"}' in text
        assert "pegaflow_rpc_seconds_bucket" in text and "pegaflow_tier_used_bytes" in text
        assert main(["status", "--endpoint", d.endpoint]) == 0
        out = capsys.readouterr().out
        assert "query hit rate 50.0%" in out and "tier dram" in out
        engine.close()


def test_eviction_spares_pinned_blocks():
    # 1 MiB pool = 64 blocks of 16 KiB
    with DaemonProcess(dram_config("1mb", "256kb")) as d, PegaflowClient(d.endpoint) as c:
        from pegaflow_core.sim_engine import SimulatedEngine

        engine = SimulatedEngine(c, SMALL, model="evict")
        first = tokens(16 * 30, seed=10)
        engine.prefill(first)
        lease = c.query(engine.handle, block_hashes(first, 16))
        assert lease.hit_blocks == 30
        for seed in range(11, 15):  # 4 x 30 more blocks: far past capacity
            engine.prefill(tokens(16 * 30, seed=seed))
        stats = c.stats()
        assert stats.counters["evictions_total{tier=dram}"] > 0
        result = c.load(engine.handle, lease.lease_id, engine.allocate(30)).wait()
        assert result.failed_block_ids == ()
        engine.close()


def test_dead_daemon_means_misses_not_errors():
    d = DaemonProcess(dram_config()).start()
    c = PegaflowClient(d.endpoint, timeout_s=1)
    from pegaflow_core.sim_engine import SimulatedEngine

    engine = SimulatedEngine(c, SMALL, model="down")
    d.kill()
    stats = engine.prefill(tokens(16 * 4, seed=20))
    assert stats.daemon_down and stats.hit_blocks == 0
    engine.cache.close()
    c.close()
    d.close()


def test_a_query_only_context_queries_but_cannot_save_or_load(client, make_engine):
    engine = make_engine(model="scheduler")
    prompt = tokens(16 * 6, seed=40)
    engine.prefill(prompt)
    scheduler = client.register_context(ContextSpec.query_only(engine.namespace, SMALL.block_bytes, "sched"))
    hit = client.query(scheduler, block_hashes(prompt, 16))
    assert hit.hit_blocks == 6
    client.release([hit.lease_id])
    with pytest.raises(InvalidArgument, match="registered for queries only"):
        client.save(scheduler, [0], [b"x" * 32])
    with pytest.raises(InvalidArgument, match="registered for queries only"):
        client.load(scheduler, client.query(scheduler, block_hashes(prompt, 16)).lease_id, [0]).wait()
    with pytest.raises(InvalidArgument, match="stores blocks of 16384 bytes, but this layout gives 8192"):
        client.register_context(ContextSpec.query_only(engine.namespace, 8192, "wrong"))
    with pytest.raises(InvalidArgument, match="or block_bytes > 0 for a query-only context"):
        client.register_context(ContextSpec.query_only(engine.namespace, 0, "none"))
