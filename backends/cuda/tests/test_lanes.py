"""The staged lanes in-process on a real GPU (skipped without one): byte-exact saves and loads
through small staging buffers (many tiles), blocks reported landed only once they are whole, and
pool rows that are not pinned (the driver's path) in the same request, and a pool pinned in two
registrations that touch (the DRAM tier pins chunk by chunk), which no single copy may span."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

from pegaflow_core import pinned  # noqa: E402
from pegaflow_cuda import driver  # noqa: E402
from pegaflow_cuda.driver import Device, check  # noqa: E402
from pegaflow_cuda.lanes import Blocks, Lane  # noqa: E402

LAYERS, KV, PLANE, NUM_BLOCKS, BLOCKS = 4, 2, 64 << 10, 96, 48
BLOCK = LAYERS * KV * PLANE
STAGING = 1 << 20  # two blocks per save tile: 24 tiles
CHUNK_EDGE = 25 * BLOCK  # odd: a save tile of consecutive slots (blocks 24 and 25) straddles it


@pytest.fixture(scope="module")
def device():
    torch.empty(1, device="cuda")  # torch's primary context, shared with the lanes
    dev = Device(0)
    dev.enter()
    yield dev


@pytest.fixture(scope="module")
def pool(device):
    """The pool's address: anonymous memory registered with CUDA in two chunks that touch."""
    memory = mmap.mmap(-1, BLOCKS * BLOCK)
    address = np.frombuffer(memory, dtype=np.uint8).ctypes.data
    chunks = [(address, CHUNK_EDGE), (address + CHUNK_EDGE, BLOCKS * BLOCK - CHUNK_EDGE)]
    for start, nbytes in chunks:
        check(driver.cu.cuMemHostRegister(start, nbytes, 0), "cuMemHostRegister")
        pinned.add(start, nbytes)
    yield address
    for start, _ in chunks:
        pinned.remove(start)
        driver.cu.cuMemHostUnregister(start)


class Engine:
    """A GPU KV cache with one region per (layer, K/V) plane and the request's address arrays."""

    def __init__(self, seed: int, plane_order: str = "layer") -> None:
        rng = np.random.default_rng(seed)
        generator = torch.Generator(device="cuda").manual_seed(seed)
        self.memory = torch.randint(0, 255, (LAYERS * KV * NUM_BLOCKS * PLANE,), dtype=torch.uint8, device="cuda",
                                    generator=generator)
        order = [(l, k) for l in range(LAYERS) for k in range(KV)] if plane_order == "layer" else \
            [(l, k) for k in range(KV) for l in range(LAYERS)]  # SGLang-like: every K, then every V
        base = np.array([self.memory.data_ptr() + (l * KV + k) * NUM_BLOCKS * PLANE for l, k in order], dtype=np.uint64)
        self.ids = rng.choice(NUM_BLOCKS, BLOCKS, replace=False).astype(np.uint64)
        self.engine = base[None, :] + self.ids[:, None] * np.uint64(PLANE)
        self.length = np.full(LAYERS * KV, PLANE, dtype=np.uint64)
        self.offset = (np.arange(LAYERS * KV, dtype=np.uint64) * np.uint64(PLANE))
        self.layer_planes = [[i for i, (l, _) in enumerate(order) if l == layer] for layer in range(LAYERS)]

    def blocks(self, stored: np.ndarray) -> Blocks:
        return Blocks(self.engine, stored, self.offset, self.length)

    def plane(self, row: int, p: int) -> np.ndarray:
        start = int(self.engine[row, p]) - self.memory.data_ptr()
        return self.memory[start : start + PLANE].cpu().numpy()


def stored_rows(pool: int, order: str = "scattered") -> np.ndarray:
    """Pool slots of the request's blocks: scattered (a busy pool), or consecutive (a fresh chunk),
    whose DMA pieces the lane joins into one per tile (but not across ``CHUNK_EDGE``)."""
    slots = np.arange(BLOCKS) if order == "consecutive" else np.random.default_rng(1).permutation(BLOCKS)
    return np.uint64(pool) + slots.astype(np.uint64) * np.uint64(BLOCK)


def host_bytes(address: int, nbytes: int) -> np.ndarray:
    return np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * nbytes).from_address(address)).copy()


def check_block(engine: Engine, row: int, address: int) -> None:
    for p in range(LAYERS * KV):
        got = host_bytes(address + int(engine.offset[p]), PLANE)
        assert np.array_equal(got, engine.plane(row, p)), f"block row {row} plane {p} differs in the pool"


@pytest.mark.parametrize("split", [(), (1, 5)], ids=["one-batch", "batches-1-5-rest"])
@pytest.mark.parametrize("order", ["scattered", "consecutive"])
@pytest.mark.parametrize("unpinned", [0, 5], ids=["pinned", "some-rows-unpinned"])
def test_save_reports_each_block_once_and_only_when_whole(device, pool, unpinned, order, split):
    engine = Engine(seed=2)
    stored = stored_rows(pool, order)
    loose = np.zeros(unpinned * BLOCK, dtype=np.uint8)  # pool memory the driver must copy (not pinned)
    stored[:unpinned] = loose.ctypes.data + np.arange(unpinned, dtype=np.uint64) * np.uint64(BLOCK)
    lane = Lane(device, "save", staging_bytes=STAGING)
    reports: list[np.ndarray] = []

    def landed(rows: np.ndarray) -> None:
        for row in rows[:3]:  # bytes are in the pool when reported, not later
            check_block(engine, int(row), int(stored[row]))
        reports.append(np.array(rows))

    blocks = engine.blocks(stored)
    edges = np.cumsum((0,) + split).tolist() + [BLOCKS]
    batches = [blocks.take(np.arange(lo, hi)) for lo, hi in zip(edges, edges[1:])]  # rows count on across them
    try:
        lane.save_batches(iter(batches), landed) if split else lane.save(blocks, landed)
    finally:
        lane.close()
    every = np.concatenate(reports)
    assert sorted(every.tolist()) == list(range(BLOCKS))  # each block reported exactly once
    assert len(reports) > 10  # tile by tile, not once at the end
    for row in range(BLOCKS):
        check_block(engine, row, int(stored[row]))


@pytest.mark.parametrize("order", ["scattered", "consecutive"])
@pytest.mark.parametrize("plane_order", ["layer", "k-then-v"])
def test_load_moves_exact_bytes_and_reports_layers_in_order(device, pool, plane_order, order):
    source = Engine(seed=3, plane_order=plane_order)
    stored = stored_rows(pool, order)
    save, load = Lane(device, "save", staging_bytes=STAGING), Lane(device, "load", staging_bytes=STAGING)
    try:
        save.save(source.blocks(stored))
        before = source.memory.clone()
        source.memory.zero_()
        torch.cuda.synchronize()
        layers: list[int] = []
        load.load(source.blocks(stored), source.layer_planes, layers.append)
        torch.cuda.synchronize()
    finally:
        save.close()
        load.close()
    assert layers == list(range(1, LAYERS + 1))
    mask = torch.zeros_like(before, dtype=torch.bool)
    for row in range(BLOCKS):
        for p in range(LAYERS * KV):
            start = int(source.engine[row, p]) - source.memory.data_ptr()
            mask[start : start + PLANE] = True
    assert torch.equal(source.memory[mask], before[mask])
    assert int(source.memory[~mask].count_nonzero()) == 0  # nothing outside the blocks was written
