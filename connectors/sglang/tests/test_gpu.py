"""GPU test of pegaflow-sglang (gpu-test.sh runs it on the GPU machine; elsewhere it skips).

SGLang cannot be installed there, so the connector's own code (``HostPageStore``, ``DeviceKV``:
they never import SGLang) runs against torch tensors shaped exactly like SGLang 0.5.23's pools:
a pinned host pool ``(2, size, layers, heads, dim)`` (page_first) with SGLang's get_data_page,
a layer_first one ``(2, layers, size, heads, dim)``, and the GPU KV pool as one
``[slots, heads, dim]`` CUDA tensor per layer for K and for V. Against a real daemon that serves
cuda_ipc regions it checks: GPU pages saved and loaded back layer by layer byte-exact over CUDA
IPC, GPU pages read by a HiCache layer_first host pool (shared namespace), the pinned page_first
host pool round trip, and a daemon killed with SIGKILL and restarted (misses, then hits again).
"""

from __future__ import annotations

import hashlib
import os
import time

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the GPU test runs on the GPU machine (connectors/sglang/gpu-test.sh)", allow_module_level=True)

from pegaflow_core.launcher import DaemonProcess  # noqa: E402

from pegaflow_sglang.device_kv import DeviceKV  # noqa: E402
from pegaflow_sglang.naming import Placement  # noqa: E402
from pegaflow_sglang.options import SglangOptions  # noqa: E402
from pegaflow_sglang.page_store import HostPageStore  # noqa: E402

PAGE, LAYERS, HEADS, DIM = 16, 4, 8, 128
SLOTS = 64 * PAGE + PAGE  # SGLang's device pool: size + one padding page
HOST_TOKENS = 48 * PAGE
DAEMON_CONFIG = os.environ.get("PEGAFLOW_GPU_DAEMON_CONFIG",
                               "index: {kind: local}\ntiers: [{kind: dram, capacity: 2gb}]\n")


class HostPool:
    """SGLang's MHATokenToKVPoolHost buffer and page accessor, nothing else."""

    def __init__(self, layout: str) -> None:
        self.layout, self.page_size, self.size, self.layer_num = layout, PAGE, HOST_TOKENS, LAYERS
        dims = (2, HOST_TOKENS, LAYERS, HEADS, DIM) if layout == "page_first" else (2, LAYERS, HOST_TOKENS, HEADS, DIM)
        self.kv_buffer = torch.zeros(dims, dtype=torch.bfloat16, pin_memory=True)

    def get_data_page(self, index: int, flat: bool = True):
        page = (self.kv_buffer[:, index: index + PAGE] if self.layout == "page_first"
                else self.kv_buffer[:, :, index: index + PAGE])
        return page.flatten() if flat else page


@pytest.fixture(scope="module")
def daemon():
    with DaemonProcess(DAEMON_CONFIG) as d:
        yield d


def options(daemon):
    return SglangOptions.from_mapping({"endpoint": daemon.endpoint, "timeout_s": 5, "retry_interval_s": 0.2}, "gpu-test")


def gpu_pool():
    k = [torch.zeros((SLOTS, HEADS, DIM), dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)]
    v = [torch.zeros((SLOTS, HEADS, DIM), dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)]
    return k, v


def fill(buffers, pages, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for buf in buffers:
        for p in pages:
            view = buf[p * PAGE:(p + 1) * PAGE].view(torch.int16)
            view.copy_(torch.randint(-30000, 30000, view.shape, generator=gen, device="cuda", dtype=torch.int16))
    torch.cuda.synchronize()


def same(a, b) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def keys(n, tag):
    return [hashlib.sha256(f"{tag}/{i}".encode()).hexdigest() for i in range(n)]


def test_gpu_pages_round_trip_layer_by_layer_over_cuda_ipc(daemon):
    (ka, va), (kb, vb) = gpu_pool(), gpu_pool()
    saver = DeviceKV(options(daemon), Placement("gpu-model"), False, "gpu-a")
    loader = DeviceKV(options(daemon), Placement("gpu-model"), False, "gpu-b")
    try:
        spec = saver.attach(ka, va, PAGE)
        assert {r.kind for r in spec.regions} == {"cuda_ipc"}
        loader.attach(kb, vb, PAGE)
        src, dst = [1, 2, 3, 40, 63], [5, 9, 17, 30, 2]
        fill(ka + va, src, seed=1)
        names = keys(5, "rt")
        assert saver.save(src, names).result(60) is True
        hit = loader.lookup(names)
        assert hit.pages == 5
        load = loader.start_load(hit, dst)
        for layer in range(LAYERS):
            loader.waiter.wait_until(layer)
            for s, d in zip(src, dst):
                assert same(kb[layer][d * PAGE:(d + 1) * PAGE], ka[layer][s * PAGE:(s + 1) * PAGE])
                assert same(vb[layer][d * PAGE:(d + 1) * PAGE], va[layer][s * PAGE:(s + 1) * PAGE])
        assert load.finish()
    finally:
        saver.close()
        loader.close()


def test_gpu_pages_are_read_by_a_layer_first_host_pool(daemon):
    k, v = gpu_pool()
    kv = DeviceKV(options(daemon), Placement("gpu-model"), False, "gpu-share")
    host = HostPool("layer_first")
    store = HostPageStore(options(daemon), Placement("gpu-model"), False, "host-share")
    try:
        kv.attach(k, v, PAGE)
        store.attach(host)
        assert store.namespace == kv.namespace
        fill(k + v, [4, 5], seed=2)
        names = keys(2, "share")
        assert kv.save([4, 5], names).result(60)
        host_idx = torch.arange(10 * PAGE, 12 * PAGE)
        assert store.get_pages(names, host_idx) == [True, True]
        for layer in range(LAYERS):
            assert same(host.kv_buffer[0, layer, 10 * PAGE:12 * PAGE], k[layer][4 * PAGE:6 * PAGE].cpu())
            assert same(host.kv_buffer[1, layer, 10 * PAGE:12 * PAGE], v[layer][4 * PAGE:6 * PAGE].cpu())
    finally:
        kv.close()
        store.close()


def test_pinned_page_first_host_pool_round_trip(daemon):
    host = HostPool("page_first")
    store = HostPageStore(options(daemon), Placement("gpu-model"), False, "host-pf")
    try:
        store.attach(host)
        host.kv_buffer.view(torch.int16).copy_(torch.randint(-30000, 30000, host.kv_buffer.shape, dtype=torch.int16))
        names = keys(8, "pf")
        src = torch.arange(0, 8 * PAGE)
        dst = torch.arange(20 * PAGE, 28 * PAGE)
        assert store.set_pages(names, src) == [True] * 8
        assert store.count_prefix(names) == 8
        assert store.get_pages(names, dst) == [True] * 8
        assert same(host.kv_buffer[:, 20 * PAGE:28 * PAGE], host.kv_buffer[:, 0:8 * PAGE])
    finally:
        store.close()


def test_daemon_killed_and_restarted_misses_then_hits(daemon):
    (ka, va), (kb, vb) = gpu_pool(), gpu_pool()
    saver = DeviceKV(options(daemon), Placement("gpu-model"), False, "gpu-restart-a")
    loader = DeviceKV(options(daemon), Placement("gpu-model"), False, "gpu-restart-b")
    try:
        saver.attach(ka, va, PAGE)
        loader.attach(kb, vb, PAGE)
        fill(ka + va, [7], seed=3)
        names = keys(1, "restart")
        daemon.kill()
        try:
            assert loader.lookup(names).pages == 0
            assert saver.save([7], names).result(60) is False
        finally:
            daemon.start()
        deadline = time.monotonic() + 20
        while not saver.save([7], names).result(60):  # the context is registered again (CUDA IPC anew)
            assert time.monotonic() < deadline, "never reached the restarted daemon"
            time.sleep(0.3)
        hit = loader.lookup(names)
        assert hit.pages == 1
        assert loader.start_load(hit, [11], layerwise=False).finish()
        assert same(kb[2][11 * PAGE:12 * PAGE], ka[2][7 * PAGE:8 * PAGE])
    finally:
        saver.close()
        loader.close()
