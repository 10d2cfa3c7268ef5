"""What pegaflow-cuda does on a machine without a GPU (CI): it installs, says plainly why it cannot
serve, and a daemon refuses cuda_ipc registrations with that reason while serving everything else."""

from __future__ import annotations

import numpy as np
import pytest

from pegaflow_core import pinned
from pegaflow_core.client import ContextSpec, PegaflowClient, RegionSpec
from pegaflow_core.errors import InvalidArgument
from pegaflow_core.launcher import DaemonProcess
from pegaflow_core.layout import Plane
from pegaflow_core.plugins import get_registry
from pegaflow_cuda import driver
from pegaflow_cuda.memory import CudaIpcMemory

try:
    driver.device_count()
    HAVE_GPU = True
except driver.CudaError:
    HAVE_GPU = False

cpu_only = pytest.mark.skipif(HAVE_GPU, reason="this machine has a GPU: tests/test_gpu.py covers it")


def test_memory_kind_is_registered():
    assert get_registry().get("memory", "cuda_ipc") is CudaIpcMemory


@cpu_only
def test_unavailable_without_a_gpu_says_why():
    found = CudaIpcMemory.availability()
    assert not found.ok
    assert "NVIDIA" in found.detail or "cuInit" in found.detail or "cuda-bindings" in found.detail


@cpu_only
def test_daemon_refuses_cuda_ipc_with_the_reason_and_keeps_serving(tmp_path):
    config = "index: {kind: local}\ntiers: [{kind: dram, capacity: 16mb, chunk: 1mb}]\n"
    with DaemonProcess(config, workdir=tmp_path) as daemon, PegaflowClient(daemon.endpoint, timeout_s=10) as client:
        gpu = ContextSpec("ns", 1, (RegionSpec(nbytes=1024, kind="cuda_ipc", handle=b"\0" * 64, device=0),),
                          (Plane(0, 0, 0, 1024, 1024),))
        with pytest.raises(InvalidArgument, match=r"regions\[0\]\.kind 'cuda_ipc' cannot be served on this machine: .*"):
            client.register_context(gpu)
        assert client.health().status == "serving"


@pytest.mark.parametrize("text", ["GPU-618df060-1333-a140-5f34-49e595ae936c", "618DF060-1333-A140-5F34-49E595AE936C",
                                  bytes.fromhex("618df0601333a1405f3449e595ae936c")])
def test_uuid_forms_compare_equal(text):
    assert driver.normalise_uuid(text) == "618df0601333a1405f3449e595ae936c"


def test_pinned_ranges_cover_only_whole_segments():
    base = 1 << 40
    pinned.add(base, 4096)
    try:
        got = pinned.covered(np.array([base, base + 4000, base - 1, base + 4096], dtype=np.uint64),
                             np.array([4096, 96, 10, 1], dtype=np.uint64))
        assert got.tolist() == [True, True, False, False]
    finally:
        pinned.remove(base)
    assert not pinned.covered(np.array([base], dtype=np.uint64), np.array([1], dtype=np.uint64)).any()


def test_runs_merge_adjacent_planes_and_pack_them_in_staging():
    """A load group's planes as contiguous runs of the stored block (one DMA piece each) and each
    plane's place in the packed staging piece: SGLang's K-then-V order gives two runs per layer
    group, vLLM's layer-major order one."""
    from pegaflow_cuda.lanes import _Runs

    length = np.full(8, 100, dtype=np.uint64)  # 4 layers x (K, V), stored K0..K3 then V0..V3
    offset = np.arange(8, dtype=np.uint64) * np.uint64(100)
    runs = _Runs.of(np.array([0, 4, 1, 5]), offset, length)  # layers 0 and 1: K0, V0, K1, V1
    assert runs.offset.tolist() == [0, 400] and runs.length.tolist() == [200, 200]
    assert runs.stage.tolist() == [0, 200] and runs.piece == 400
    assert runs.rel.tolist() == [0, 200, 100, 300]  # K0, V0, K1, V1 inside the staging piece
    whole = _Runs.of(np.arange(8), offset, length)
    assert whole.offset.tolist() == [0] and whole.length.tolist() == [800] and whole.rel.tolist() == offset.tolist()


def test_copies_that_continue_each_other_on_both_sides_are_joined():
    from pegaflow_cuda.lanes import _joined

    def u(*values: int) -> np.ndarray:
        return np.array(values, dtype=np.uint64)

    one_range = np.zeros(6, dtype=np.int64)
    dst, src, size = _joined(u(1000, 1100, 1200, 5000, 5100, 5200), u(0, 100, 200, 300, 400, 900),
                             u(100, 100, 50, 100, 100, 10), one_range)
    # 1000..1250 is one piece; 5000 jumps on the destination side; 5200 follows 5100 there but
    # not on the source side (900, not 500): its own piece
    assert dst.tolist() == [1000, 5000, 5200] and src.tolist() == [0, 300, 900]
    assert size.tolist() == [250, 200, 10] and size.dtype == np.uint64
    scattered = (u(0, 300), u(0, 100), u(100, 100))
    assert [a.tolist() for a in _joined(*scattered, one_range[:2])] == [a.tolist() for a in scattered]


def test_copies_are_not_joined_across_the_edge_of_a_pinned_chunk():
    from pegaflow_cuda.lanes import _joined

    contiguous = (np.array([0, 100, 200, 300], dtype=np.uint64), np.array([0, 100, 200, 300], dtype=np.uint64),
                  np.full(4, 100, dtype=np.uint64))
    dst, src, size = _joined(*contiguous, np.array([3, 3, 4, 4]))  # the pool's second chunk starts at 200
    assert dst.tolist() == [0, 200] and size.tolist() == [200, 200]


def test_layer_groups_reach_the_minimum_dma_piece():
    from pegaflow_cuda.lanes import MIN_PIECE, _layer_groups

    per_layer = [[2 * l, 2 * l + 1] for l in range(10)]
    length = np.full(20, MIN_PIECE // 8, dtype=np.uint64)  # a layer is a quarter of the minimum
    groups = _layer_groups(per_layer, length)
    assert [layers for _, layers in groups] == [4, 4, 2]  # the last group takes what is left
    assert groups[1][0].tolist() == list(range(8, 16))


def test_a_bad_staging_size_names_the_variable(monkeypatch):
    from pegaflow_cuda.lanes import staging_from_env

    monkeypatch.delenv("PEGAFLOW_CUDA_STAGING", raising=False)
    assert staging_from_env(32 << 20) == 32 << 20
    monkeypatch.setenv("PEGAFLOW_CUDA_STAGING", "64mb")
    assert staging_from_env(32 << 20) == 64 << 20
    for bad in ("lots", "0"):
        monkeypatch.setenv("PEGAFLOW_CUDA_STAGING", bad)
        with pytest.raises(InvalidArgument, match="PEGAFLOW_CUDA_STAGING"):
            staging_from_env(32 << 20)
