"""The daemon's direct route on a GPU machine: hits held only by the gds tier go from the file
straight into an engine's GPU blocks (opened over CUDA IPC by pegaflow-cuda), without the DRAM
pool. Skipped without a GPU, kvikio's device I/O or pegaflow-cuda. The routing itself is tested
on CPU by tests/test_direct_route.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import require_device_io

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device", allow_module_level=True)
pytest.importorskip("pegaflow_cuda", reason="the direct route needs pegaflow-cuda for cuda_ipc engine memory")

from pegaflow_core.client import PegaflowClient  # noqa: E402
from pegaflow_core.launcher import DaemonProcess  # noqa: E402
from pegaflow_cuda.bench import GpuKVCache, Shape  # noqa: E402

SHAPE = Shape("tiny-llama-gds", layers=4, block_size=16, planes_per_layer=2, plane_elems=16 * 2 * 64)
BLOCK = SHAPE.layers * SHAPE.planes_per_layer * SHAPE.plane_bytes  # 32 KiB


@pytest.fixture(autouse=True)
def _device_io() -> None:
    require_device_io()


def hashes(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{i}".encode().ljust(32, b".") for i in range(n)]


@pytest.mark.parametrize("direct", ["always", "never"])
def test_hits_only_on_the_gds_tier_load_straight_into_gpu_blocks(tmp_path: Path, direct: str) -> None:
    config = f"""
index: {{kind: local}}
tiers:
  - {{kind: dram, capacity: {8 * BLOCK}, chunk: {BLOCK}}}
  - {{kind: gds, path: '{tmp_path / "gds"}', capacity: 16mb, segment_size: 1mb, fsync: false, direct: {direct}}}
"""
    with DaemonProcess(config, workdir=tmp_path) as daemon, PegaflowClient(daemon.endpoint, timeout_s=60) as client:
        cache = GpuKVCache(SHAPE, 64, 0)
        generator = torch.Generator(device="cuda").manual_seed(11)
        cache.flat.copy_(torch.randn(cache.flat.shape, generator=generator, device="cuda").to(torch.bfloat16))
        torch.cuda.synchronize()
        handle = client.register_context(cache.context_spec("gds-direct"))
        first, other = hashes("first", 8), hashes("other", 8)
        client.save(handle, list(range(0, 8)), first)
        client.save(handle, list(range(8, 16)), other)  # pushes the first 8 down into the gds tier
        assert client.stats().tiers[1].blocks >= 8
        hit = client.query(handle, first)
        assert hit.hit_blocks == 8 and hit.loading is (direct == "never")  # direct hits are not promoted
        dst = list(range(40, 48))
        assert not client.load(handle, hit.lease_id, dst, release_after=True).wait().failed_block_ids
        torch.cuda.synchronize()
        assert torch.equal(cache.blocks(list(range(8))), cache.blocks(dst))
        counters = client.stats().counters
        direct_bytes = counters.get("bytes_total{direction=load_direct,tier=gds}", 0)
        assert direct_bytes == (8 * BLOCK if direct == "always" else 0)
