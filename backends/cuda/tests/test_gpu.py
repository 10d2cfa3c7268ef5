"""The GPU data path against a real daemon process on a real GPU (skipped without one).

Run on the GPU machine with ``bash backends/cuda/gpu-test.sh``. Every test compares bytes: what a
load put into GPU blocks must equal what a save took from others.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

from pegaflow_core.client import ContextSpec, LoadHandle, PegaflowClient  # noqa: E402
from pegaflow_core.engine_copy import EngineLoad  # noqa: E402
from pegaflow_core.errors import InvalidArgument  # noqa: E402
from pegaflow_core.launcher import DaemonProcess  # noqa: E402
from pegaflow_core.layout import Plane  # noqa: E402
from pegaflow_core.regions import region_for_storage  # noqa: E402
from pegaflow_cuda.bench import GpuKVCache, Shape  # noqa: E402

SMALL = Shape("tiny-llama", layers=4, block_size=16, planes_per_layer=2, plane_elems=16 * 2 * 64)
MLA = Shape("tiny-mla", layers=3, block_size=64, planes_per_layer=1, plane_elems=64 * 576)


def config(pin: str = "always", capacity: str = "256mb") -> str:
    return f"index: {{kind: local}}\ntiers: [{{kind: dram, capacity: {capacity}, chunk: 8mb, pin: {pin}}}]\n"


@pytest.fixture
def daemon(tmp_path):
    with DaemonProcess(config(), workdir=tmp_path) as d:
        yield d


@pytest.fixture
def client(daemon):
    with PegaflowClient(daemon.endpoint, timeout_s=30) as c:
        c.wait_warm(60)
        yield c


def hashes(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{i}".encode().ljust(32, b".") for i in range(n)]


def filled(shape: Shape, blocks: int, seed: int) -> GpuKVCache:
    cache = GpuKVCache(shape, blocks, 0)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    cache.flat.copy_(torch.randn(cache.flat.shape, generator=generator, device="cuda").to(torch.bfloat16))
    torch.cuda.synchronize()
    return cache


def test_save_and_layerwise_load_of_scattered_blocks(client):
    cache = filled(SMALL, 64, seed=1)
    handle = client.register_context(cache.context_spec("a"))
    src, dst = [3, 17, 5, 60, 41, 0, 22], [9, 2, 63, 30, 11, 50, 7]
    keys = hashes("scatter", len(src))
    assert client.save(handle, src, keys).stored == len(src)
    hit = client.query(handle, keys)
    assert hit.hit_blocks == len(src)
    load = client.load(handle, hit.lease_id, dst, release_after=True)
    for layer in range(SMALL.layers):
        load.wait_layer(layer)  # layer-wise completion reaches the engine
        index_src = torch.tensor(src, device="cuda")
        index_dst = torch.tensor(dst, device="cuda")
        assert torch.equal(cache.layers[layer].index_select(1, index_src), cache.layers[layer].index_select(1, index_dst))
    assert not load.wait().failed_block_ids


def test_two_engines_share_blocks_and_mla_is_stored_once_for_every_rank(client):
    rank0, rank1 = filled(MLA, 16, seed=2), filled(MLA, 16, seed=3)
    spec0 = rank0.context_spec("mla-r0")
    spec1 = rank1.context_spec("mla-r1")
    assert spec0.namespace == spec1.namespace
    h0 = client.register_context(ContextSpec(**{**spec0.__dict__, "tp_rank": 0, "tp_size": 2}))
    h1 = client.register_context(ContextSpec(**{**spec1.__dict__, "tp_rank": 1, "tp_size": 2}))
    keys = hashes("mla", 5)
    assert client.save(h0, [0, 1, 2, 3, 4], keys).stored == 5
    assert client.save(h1, [5, 6, 7, 8, 9], keys).already_present == 5  # rank 1 stores nothing again
    hit = client.query(h1, keys)
    client.load(h1, hit.lease_id, [10, 11, 12, 13, 14], release_after=True).wait()
    assert torch.equal(rank0.blocks([0, 1, 2, 3, 4]), rank1.blocks([10, 11, 12, 13, 14]))


def loader_ready(handle, timeout_s: float = 60.0) -> None:
    """The engine-side loader maps the pool and registers it with CUDA in the background."""
    assert handle.engine_copy_ready(timeout_s), "the engine-side loader did not become ready"


def test_engine_side_load_lands_the_same_bytes_layer_by_layer_and_releases(client):
    cache = filled(SMALL, 64, seed=11)
    handle = client.register_context(cache.context_spec("engine-side"))
    loader_ready(handle)
    src, dst = [4, 40, 13, 61, 2, 33], [8, 19, 57, 1, 44, 26]
    keys = hashes("engine-side", len(src))
    assert client.save(handle, src, keys).stored == len(src)
    hit = client.query(handle, keys)
    load = client.load(handle, hit.lease_id, dst)
    assert isinstance(load, EngineLoad)
    index_src = torch.tensor(src, device="cuda")
    index_dst = torch.tensor(dst, device="cuda")
    for layer in range(SMALL.layers):
        load.wait_layer(layer)
        assert torch.equal(cache.layers[layer].index_select(1, index_src), cache.layers[layer].index_select(1, index_dst))
    assert not load.wait().failed_block_ids
    deadline = time.monotonic() + 10
    while client.stats().leases:  # the client releases the lease once its copy is done
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # the same request copied by the daemon, for comparison, lands the same bytes
    cache.layers[0].index_fill_(1, index_dst, 0)
    torch.cuda.synchronize()
    hit = client.query(handle, keys)
    load = client.load(handle, hit.lease_id, dst, engine_copy=False)
    assert isinstance(load, LoadHandle) and not load.wait().failed_block_ids
    assert torch.equal(cache.blocks(src), cache.blocks(dst))


def test_engine_side_load_into_another_rank_of_an_mla_model(client):
    rank0, rank1 = filled(MLA, 16, seed=12), filled(MLA, 16, seed=13)
    h0 = client.register_context(ContextSpec(**{**rank0.context_spec("mla-es-r0").__dict__, "tp_rank": 0, "tp_size": 2}))
    h1 = client.register_context(ContextSpec(**{**rank1.context_spec("mla-es-r1").__dict__, "tp_rank": 1, "tp_size": 2}))
    loader_ready(h1)
    keys = hashes("mla-es", 6)
    assert client.save(h0, [0, 1, 2, 3, 4, 5], keys).stored == 6
    hit = client.query(h1, keys)
    load = client.load(h1, hit.lease_id, [15, 9, 11, 7, 13, 6])
    assert isinstance(load, EngineLoad) and not load.wait().failed_block_ids
    assert torch.equal(rank0.blocks([0, 1, 2, 3, 4, 5]), rank1.blocks([15, 9, 11, 7, 13, 6]))


def test_one_region_per_layer_and_allocations_shared_by_several_regions(client):
    """Layers in separate allocations (several IPC handles), and two small tensors that torch's
    caching allocator put in one allocation (the same handle named twice)."""
    blocks, plane = 8, 16 * 2 * 64 * 2
    layers = [torch.randn(2, blocks, plane // 2, device="cuda").to(torch.bfloat16) for _ in range(3)]
    regions = [region_for_storage(t, "auto") for t in layers]
    planes = tuple(Plane(l, l, regions[l].base_offset + kv * blocks * plane, plane, plane) for l in range(3) for kv in range(2))
    spec = ContextSpec("per-layer@x", blocks, tuple(r.spec for r in regions), planes, instance_id="per-layer")
    handle = client.register_context(spec)
    keys = hashes("per-layer", 3)
    client.save(handle, [0, 1, 2], keys)
    hit = client.query(handle, keys)
    client.load(handle, hit.lease_id, [5, 6, 7], release_after=True).wait()
    for t in layers:
        assert torch.equal(t[:, [0, 1, 2]], t[:, [5, 6, 7]])
    client.unregister_context(handle)
    client.register_context(spec)  # opening the same handles again after closing them works


def test_an_allocation_registered_again_from_other_threads_of_the_daemon(client):
    """A second registration of an allocation that is open already takes the shared mapping; the
    daemon thread serving it must still make the GPU's context current before asking the driver
    about the pointer (seen as CUDA_ERROR_INVALID_CONTEXT when SGLang's two pools, in one torch
    allocation, re-registered with a restarted daemon)."""
    from concurrent.futures import ThreadPoolExecutor

    cache = filled(SMALL, 16, seed=8)
    first = client.register_context(cache.context_spec("shared-0"))
    specs = [ContextSpec(**{**cache.context_spec(f"shared-{i}").__dict__, "instance_id": f"shared-{i}"}) for i in range(1, 17)]
    with ThreadPoolExecutor(8) as pool:  # concurrent calls land on several of the daemon's threads
        handles = list(pool.map(client.register_context, specs))
    keys = hashes("shared", 2)
    client.save(handles[-1], [1, 2], keys)
    hit = client.query(first, keys)
    client.load(first, hit.lease_id, [10, 11], release_after=True).wait()
    assert torch.equal(cache.blocks([1, 2]), cache.blocks([10, 11]))


def test_pool_not_pinned_still_moves_correct_bytes(tmp_path):
    with DaemonProcess(config(pin="never"), workdir=tmp_path) as d, PegaflowClient(d.endpoint, timeout_s=30) as c:
        cache = filled(SMALL, 32, seed=4)
        handle = c.register_context(cache.context_spec("unpinned"))
        keys = hashes("unpinned", 4)
        c.save(handle, [1, 2, 3, 4], keys)
        hit = c.query(handle, keys)
        c.load(handle, hit.lease_id, [20, 21, 22, 23], release_after=True).wait()
        assert torch.equal(cache.blocks([1, 2, 3, 4]), cache.blocks([20, 21, 22, 23]))


def test_bad_handle_and_sizes_are_refused_clearly(client):
    cache = filled(SMALL, 8, seed=5)
    spec = cache.context_spec("bad")
    region = spec.regions[0]
    forged = ContextSpec(**{**spec.__dict__, "regions": (type(region)(**{**region.__dict__, "handle": os.urandom(64)}),)})
    with pytest.raises(InvalidArgument, match=r"regions\[0\]: cannot open the engine's CUDA IPC handle"):
        client.register_context(forged)
    short = ContextSpec(**{**spec.__dict__, "regions": (type(region)(**{**region.__dict__, "handle": b"x" * 10}),)})
    with pytest.raises(InvalidArgument, match="64 bytes"):
        client.register_context(short)
    too_big = ContextSpec(**{**spec.__dict__, "regions": (type(region)(**{**region.__dict__, "nbytes": region.nbytes + (1 << 40)}),)})
    with pytest.raises(InvalidArgument, match="allocation has"):
        client.register_context(too_big)
    assert client.health().status == "serving"


ENGINE = textwrap.dedent("""
    import sys, time, torch
    from pegaflow_core.client import PegaflowClient
    from pegaflow_cuda.bench import GpuKVCache, Shape
    shape = Shape("tiny-llama", 4, 16, 2, 16 * 2 * 64)
    cache = GpuKVCache(shape, 16, 0)
    cache.flat.copy_(torch.arange(cache.flat.numel(), device="cuda").remainder(251).to(torch.bfloat16))
    torch.cuda.synchronize()
    client = PegaflowClient(sys.argv[1], timeout_s=30)
    handle = client.register_context(cache.context_spec("doomed"))
    keys = [f"doomed-{i}".encode().ljust(32, b".") for i in range(4)]
    client.save(handle, [0, 1, 2, 3], keys)
    print("saved", flush=True)
    time.sleep(600)
""")


def test_engine_killed_after_saving_leaves_its_blocks_and_the_daemon_serving(client, daemon):
    engine = subprocess.Popen([sys.executable, "-c", ENGINE, daemon.endpoint], stdout=subprocess.PIPE, text=True)
    try:
        assert engine.stdout.readline().strip() == "saved"
    finally:
        engine.send_signal(signal.SIGKILL)
        engine.wait(30)
    survivor = GpuKVCache(SMALL, 16, 0)
    survivor.flat.zero_()
    handle = client.register_context(survivor.context_spec("survivor"))
    keys = [f"doomed-{i}".encode().ljust(32, b".") for i in range(4)]
    hit = client.query(handle, keys)
    assert hit.hit_blocks == 4
    client.load(handle, hit.lease_id, [8, 9, 10, 11], release_after=True).wait()
    expected = GpuKVCache(SMALL, 16, 0)
    expected.flat.copy_(torch.arange(expected.flat.numel(), device="cuda").remainder(251).to(torch.bfloat16))
    assert torch.equal(survivor.blocks([8, 9, 10, 11]), expected.blocks([0, 1, 2, 3]))
