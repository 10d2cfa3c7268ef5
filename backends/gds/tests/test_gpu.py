"""Device I/O on a GPU machine (skipped elsewhere with the reason): the Tier contract with every
block going through GPU memory, scattered segments, the shared format across both data paths,
corruption and restart, and bad GPU addresses. GPU memory comes from torch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from pegaflow_conformance import TierContract

from pegaflow_core import BlockKey, InvalidArgument, Tier, TierCapabilities, TierUsage, byte_view
from pegaflow_core.device_io import LoadRoute, load_route
from pegaflow_gds import GdsTier, gpu
from pegaflow_ssd import SsdOptions, SsdTier

from .conftest import KIB, blocks_of, keys_of, require_device_io

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device", allow_module_level=True)


@pytest.fixture(autouse=True)
def _device_io() -> None:
    require_device_io()


def to_gpu(blocks: Sequence[bytes]) -> Any:
    return ready(torch.tensor(np.frombuffer(b"".join(blocks), dtype=np.uint8), device="cuda"))


def ready(tensor: Any) -> Any:
    """The device calls' contract: the caller's GPU work on the memory is done before the call
    (kvikio copies on its own streams, which do not wait for torch's)."""
    torch.cuda.synchronize()
    return tensor


def halves(base: int, size: int, count: int) -> list[list[tuple[int, int]]]:
    """Each block as two segments, its second part first in memory (scattered on purpose): block
    bytes [0, h) live at base + size - h, bytes [h, size) at base."""
    half = size // 2
    return [[(base + i * size + size - half, half), (base + i * size, size - half)] for i in range(count)]


def swapped(view: memoryview) -> bytes:
    """A block's bytes laid out in memory the way ``halves`` addresses them."""
    half = len(view) // 2
    return bytes(view[half:]) + bytes(view[:half])


class DeviceRoutedTier(Tier):
    """A GdsTier whose put/get_into go through GPU memory (write_from_device / read_into_device),
    so the Tier contract exercises the device path. Host buffers are validated first, exactly as
    the tier does, so bad input fails the same way."""

    kind: ClassVar[str] = "gds-device-routed"
    capabilities: ClassVar[TierCapabilities] = GdsTier.capabilities

    def __init__(self, inner: GdsTier) -> None:
        self.inner = inner

    def put(self, keys: Sequence[BlockKey], blocks: Sequence[Any]) -> list[bool]:
        if len(keys) != len(blocks):
            return self.inner.put(keys, blocks)  # the host path raises the contract's error
        views = [byte_view(b, what=f"blocks[{i}]") for i, b in enumerate(blocks)]
        if not views:
            return self.inner.put(keys, views)
        staged = [torch.tensor(np.frombuffer(swapped(v), dtype=np.uint8), device="cuda") for v in views]
        ready(staged)
        segs = [halves(t.data_ptr(), len(v), 1)[0] if len(v) >= 2 else [(t.data_ptr(), len(v))]
                for t, v in zip(staged, views)]
        return self.inner.write_from_device(keys, segs)

    def get_into(self, keys: Sequence[BlockKey], dests: Sequence[Any]) -> list[bool]:
        if len(keys) != len(dests):
            return self.inner.get_into(keys, dests)
        targets = [byte_view(d, writable=True, what=f"dests[{i}]") for i, d in enumerate(dests)]
        if not targets:
            return self.inner.get_into(keys, targets)
        staged = ready([torch.full((len(t),), 0x5A, dtype=torch.uint8, device="cuda") for t in targets])
        hits = self.inner.read_into_device(keys, [[(s.data_ptr(), len(t))] for s, t in zip(staged, targets)])
        for hit, s, t in zip(hits, staged, targets):
            if hit:
                t[:] = s.cpu().numpy().tobytes()
        return hits

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        return self.inner.contains(keys)

    def evict(self, keys: Sequence[BlockKey]) -> int:
        return self.inner.evict(keys)

    def usage(self) -> TierUsage:
        return self.inner.usage()

    def recovered(self) -> list[tuple[BlockKey, int]]:
        return self.inner.recovered()

    def close(self) -> None:
        self.inner.close()


class TestGdsTierThroughGpuMemory(TierContract):
    @pytest.fixture
    def tier_factory(self, tmp_path: Path) -> Callable[[int], Tier]:
        def factory(capacity_bytes: int) -> Tier:
            return DeviceRoutedTier(GdsTier(GdsTier.conformance_options(tmp_path, capacity_bytes)))

        return factory


def test_scattered_segments_round_trip_and_misses(make_tier) -> None:
    tier = make_tier()
    keys, blocks = keys_of(5), blocks_of(5, 20 * KIB + 6)  # not page-sized: padding on disk
    src = to_gpu(blocks)
    assert tier.write_from_device(keys[:4], halves(src.data_ptr(), len(blocks[0]), 4)) == [True] * 4
    dst = ready(torch.zeros_like(src))
    hits = tier.read_into_device(keys, halves(dst.data_ptr(), len(blocks[0]), 5))
    assert hits == [True] * 4 + [False]
    got = dst.cpu().numpy().tobytes()
    size = len(blocks[0])
    assert [got[i * size : (i + 1) * size] for i in range(4)] == blocks[:4]
    assert got[4 * size :] == bytes(size), "a miss must leave its destination untouched"


def test_host_and_device_paths_read_each_other_and_the_ssd_tier_reads_both(tmp_path: Path, make_tier) -> None:
    tier = make_tier()
    keys, blocks = keys_of(4), blocks_of(4, 16 * KIB)
    assert tier.put(keys[:2], blocks[:2]) == [True, True]  # host path
    src = to_gpu(blocks[2:])
    assert tier.write_from_device(keys[2:], [[(src.data_ptr() + i * 16 * KIB, 16 * KIB)] for i in range(2)]) == [True, True]
    dst = ready(torch.zeros(4 * 16 * KIB, dtype=torch.uint8, device="cuda"))
    assert tier.read_into_device(keys, [[(dst.data_ptr() + i * 16 * KIB, 16 * KIB)] for i in range(4)]) == [True] * 4
    assert dst.cpu().numpy().tobytes() == b"".join(blocks)
    tier.close()
    ssd = SsdTier(SsdOptions(path=str(tmp_path / "gds"), capacity=1 << 20, segment_size=64 * KIB, fsync=False))
    try:
        dests = [bytearray(16 * KIB) for _ in keys]
        assert ssd.get_into(keys, dests) == [True] * 4 and [bytes(d) for d in dests] == blocks
    finally:
        ssd.close()


def test_corrupt_payload_is_a_counted_miss_on_the_device_path(tmp_path: Path, make_tier) -> None:
    tier = make_tier()
    keys, blocks = keys_of(2), blocks_of(2, 8 * KIB)
    assert tier.put(keys, blocks) == [True, True]
    tier.close()
    segment = sorted((tmp_path / "gds").glob("seg-*.dat"))[0]
    with open(segment, "r+b") as f:  # first record's payload starts after its 4 KiB header page
        f.seek(4096 + 100)
        byte = f.read(1)
        f.seek(4096 + 100)
        f.write(bytes([byte[0] ^ 0x40]))
    tier = make_tier()
    dst = ready(torch.zeros(2 * 8 * KIB, dtype=torch.uint8, device="cuda"))
    hits = tier.read_into_device(keys, [[(dst.data_ptr() + i * 8 * KIB, 8 * KIB)] for i in range(2)])
    assert sorted(hits) == [False, True] and tier.integrity_failures == 1
    assert tier.contains(keys).count(True) == 1, "the corrupt record leaves the index"


def test_restart_rebuilds_blocks_written_from_the_gpu(make_tier) -> None:
    tier = make_tier(fsync=True)
    keys, blocks = keys_of(6), blocks_of(6, 12 * KIB)
    src = to_gpu(blocks)
    assert tier.write_from_device(keys, [[(src.data_ptr() + i * 12 * KIB, 12 * KIB)] for i in range(6)]) == [True] * 6
    tier.close()
    again = make_tier(fsync=True)
    assert sorted(k for k, _ in again.recovered()) == sorted(keys)
    dst = ready(torch.zeros_like(src))
    assert again.read_into_device(keys, [[(dst.data_ptr() + i * 12 * KIB, 12 * KIB)] for i in range(6)]) == [True] * 6
    assert torch.equal(src, dst)


def test_bad_gpu_addresses_and_sizes_are_refused_before_any_io(make_tier) -> None:
    tier = make_tier()
    keys, blocks = keys_of(2), blocks_of(2, 8 * KIB)
    tier.put(keys, blocks)
    dst = ready(torch.full((2 * 8 * KIB,), 7, dtype=torch.uint8, device="cuda"))
    host = np.zeros(8 * KIB, dtype=np.uint8)
    with pytest.raises(InvalidArgument, match=r"dests\[1\]\[0\]: .* (host memory|not memory CUDA knows)"):
        tier.read_into_device(keys, [[(dst.data_ptr(), 8 * KIB)], [(host.ctypes.data, 8 * KIB)]])
    with pytest.raises(InvalidArgument, match=r"dests\[1\]: block .* is 8192 bytes, the destination is 4096 bytes"):
        tier.read_into_device(keys, [[(dst.data_ptr(), 8 * KIB)], [(dst.data_ptr() + 8 * KIB, 4 * KIB)]])
    assert bool((dst == 7).all()), "a refused batch writes no destination"
    # torch's caching allocator hands out pieces of larger cudaMalloc blocks: find the block's end.
    start = gpu._attribute("CU_POINTER_ATTRIBUTE_RANGE_START_ADDR", dst.data_ptr())
    end = start + gpu._attribute("CU_POINTER_ATTRIBUTE_RANGE_SIZE", dst.data_ptr())
    with pytest.raises(InvalidArgument, match=r"sources\[0\]\[0\]: 8192 bytes at .* run past the end of its GPU allocation"):
        tier.write_from_device(keys_of(1, "new"), [[(end - 4 * KIB, 8 * KIB)]])
    assert tier.contains(keys_of(1, "new")) == [False]


def test_direct_option_and_route(make_tier) -> None:
    always = make_tier(direct="always")
    assert always.direct_loads is True and load_route(always, True) is LoadRoute.DIRECT
    always.close()
    never = make_tier(direct="never")
    assert never.direct_loads is False and load_route(never, True) is LoadRoute.STAGED
    never.close()
    auto = make_tier(direct="auto")
    assert auto.direct_loads is auto.device_mode().gds
    print("device I/O:", auto.device_mode().detail)


def test_many_blocks_in_one_batch(make_tier) -> None:
    tier = make_tier(capacity=64 << 20, segment_size=8 << 20)
    count, size = 200, 64 * KIB
    src = ready(torch.randint(0, 256, (count * size,), dtype=torch.uint8, device="cuda"))
    keys = keys_of(count)
    segs = [[(src.data_ptr() + i * size, size)] for i in range(count)]
    assert tier.write_from_device(keys, segs) == [True] * count
    dst = ready(torch.zeros_like(src))
    assert tier.read_into_device(keys, [[(dst.data_ptr() + i * size, size)] for i in range(count)]) == [True] * count
    assert torch.equal(src, dst)
