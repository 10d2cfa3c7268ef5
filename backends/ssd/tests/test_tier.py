"""SsdTier beyond the shared contract: options and directory errors, both I/O paths, reopen."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pegaflow_core import CapacityError, ClosedError, InvalidArgument
from pegaflow_core.config import options_from_mapping
from pegaflow_core.errors import ConfigError
from pegaflow_ssd import SsdOptions, SsdTier
from pegaflow_ssd import segments as segfiles
from pegaflow_ssd.format import PAGE

from .conftest import KIB, MIB, blocks_of, keys_of, read_back


def test_round_trip_and_reopen_on_each_io_path(make_tier, io_mode: str) -> None:
    tier = make_tier(io=io_mode)
    assert tier.io_detail.startswith(io_mode)
    keys = keys_of(12)
    blocks = blocks_of(12, 20 * KIB + 3)  # not a multiple of 4096: padding must be handled
    assert tier.put(keys, blocks) == [True] * 12
    assert read_back(tier, keys, len(blocks[0])) == ([True] * 12, blocks)
    tier.close()
    again = make_tier(io=io_mode)
    assert read_back(again, keys, len(blocks[0])) == ([True] * 12, blocks)
    assert again.integrity_failures == 0


def test_blocks_larger_than_the_write_piece_and_the_staging_arena(make_tier, io_mode: str) -> None:
    # 5 MiB blocks span several 2 MiB write pieces and exceed a queue_depth=1 arena (4 MiB).
    tier = make_tier(io=io_mode, capacity=32 * MIB, segment_size=8 * MIB, queue_depth=1)
    keys = keys_of(3)
    blocks = blocks_of(3, 5 * MIB + 100)
    assert tier.put(keys, blocks) == [True] * 3
    assert read_back(tier, keys, len(blocks[0])) == ([True] * 3, blocks)


def test_options_are_validated_with_field_names() -> None:
    with pytest.raises(InvalidArgument, match=r"capacity: .* fewer than two segments"):
        SsdOptions(path="/x", capacity=MIB, segment_size=MIB)
    with pytest.raises(InvalidArgument, match=r"segment_size: expected a multiple of 4096"):
        SsdOptions(path="/x", capacity=MIB, segment_size=5000)
    with pytest.raises(InvalidArgument, match=r"queue_depth"):
        SsdOptions(path="/x", capacity=MIB, queue_depth=0)


def test_config_loader_accepts_human_sizes_and_names_bad_keys() -> None:
    opts = options_from_mapping(SsdOptions, {"path": "/var/cache/pf", "capacity": "2gb", "segment_size": "64mb"},
                                file="stack.yaml", path="tiers[1]")
    assert opts.capacity == 2 << 30 and opts.segment_size == 64 << 20 and opts.fsync and not opts.write_through
    with pytest.raises(ConfigError, match=r"tiers\[1\]\.io"):
        options_from_mapping(SsdOptions, {"path": "/p", "capacity": "2gb", "io": "aio"}, file="stack.yaml", path="tiers[1]")
    with pytest.raises(ConfigError, match=r"missing required key 'capacity'"):
        options_from_mapping(SsdOptions, {"path": "/p"}, file="stack.yaml", path="tiers[1]")


def test_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(InvalidArgument, match=r"path: .* exists and is not a directory"):
        SsdTier(SsdOptions(path=str(target), capacity=MIB, segment_size=64 * KIB))


def test_unwritable_directory_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions, so this cannot be provoked as root")
    target = tmp_path / "ro"
    target.mkdir(mode=0o500)
    with pytest.raises(InvalidArgument, match="not writable"):
        SsdTier(SsdOptions(path=str(target), capacity=MIB, segment_size=64 * KIB))


def test_file_system_without_o_direct_is_refused() -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm here")
    try:
        fd = os.open(shm / f"odirect-{os.getpid()}", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        pass
    else:
        os.close(fd)
        os.unlink(shm / f"odirect-{os.getpid()}")
        pytest.skip("this kernel's tmpfs accepts O_DIRECT")
    with pytest.raises(InvalidArgument, match="does not support O_DIRECT"):
        SsdTier(SsdOptions(path=f"/dev/shm/pegaflow-ssd-test-{os.getpid()}", capacity=MIB, segment_size=64 * KIB))


def test_second_tier_on_the_same_directory_is_refused(make_tier) -> None:
    make_tier()
    with pytest.raises(InvalidArgument, match="in use by another ssd tier"):
        make_tier()


def test_reopen_with_another_segment_size_is_refused(make_tier) -> None:
    make_tier().close()
    with pytest.raises(InvalidArgument, match=r"segment_size: .* holds segments of 65536 bytes"):
        make_tier(segment_size=128 * KIB)


def test_block_larger_than_a_segment_is_a_capacity_error(make_tier) -> None:
    tier = make_tier()
    with pytest.raises(CapacityError, match=r"blocks\[1\]: .* larger than segment_size 65536"):
        tier.put(keys_of(2), [b"x" * 10, b"y" * (64 * KIB)])
    assert tier.usage().blocks == 0


def _no_space(fd: int, size: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_at_construction_is_a_capacity_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # fallocate is what meets a full disk; filling the real (shared) disk in a test is not an option.
    monkeypatch.setattr(segfiles, "allocate", _no_space)
    with pytest.raises(CapacityError, match=r"cannot create a first segment .* file system is full"):
        SsdTier(SsdOptions(path=str(tmp_path / "ssd"), capacity=MIB, segment_size=64 * KIB))
    assert not list((tmp_path / "ssd").glob("seg-*")), "a segment that could not be allocated must be removed"


def test_full_disk_at_run_time_makes_put_answer_false(make_tier, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = make_tier()
    keys = keys_of(40)
    blocks = blocks_of(40, 12 * KIB)  # 16 KiB records: 4 per 64 KiB segment
    assert tier.put(keys[:4], blocks[:4]) == [True] * 4  # fills the first segment
    monkeypatch.setattr(segfiles, "allocate", _no_space)
    assert tier.put(keys[4:8], blocks[4:8]) == [False] * 4
    monkeypatch.undo()
    assert tier.put(keys[4:8], blocks[4:8]) == [True] * 4, "puts work again once the disk has room"
    assert read_back(tier, keys[:8], 12 * KIB) == ([True] * 8, blocks[:8])


def test_availability_says_which_io_path() -> None:
    info = SsdTier.availability()
    assert info.ok and ("io_uring" in info.detail or "thread-pool" in info.detail)


def test_usage_and_closed_errors(make_tier) -> None:
    tier = make_tier()
    tier.put(keys_of(2), blocks_of(2, 5000))
    usage = tier.usage()
    assert usage.blocks == 2 and usage.used_bytes == 2 * 3 * PAGE and usage.capacity_bytes == MIB
    tier.close()
    with pytest.raises(ClosedError, match="closed"):
        tier.usage()


def test_background_load_misses_reads_and_holds_writes_until_loaded(make_tier, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    tier = make_tier()
    keys, blocks = keys_of(6), blocks_of(6, 5000)
    tier.put(keys, blocks)
    tier.close()
    gate = threading.Event()
    real_scan = segfiles.scan_segments

    def slow_scan(*args, **kwargs):
        assert gate.wait(10), "test gate never opened"
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(segfiles, "scan_segments", slow_scan)
    again = make_tier(background_load=True)
    assert again.loading
    assert again.contains(keys) == [False] * 6
    assert read_back(again, keys, 5000)[0] == [False] * 6
    assert again.usage().blocks == 0
    answers: list[list[bool]] = []
    new_keys, new_blocks = keys_of(2, "new"), blocks_of(2, 5000)
    writer = threading.Thread(target=lambda: answers.append(again.put(new_keys, new_blocks)))
    writer.start()
    time.sleep(0.2)
    assert not answers, "a put must wait for the index (it needs the next sequence number)"
    gate.set()
    assert again.wait_loaded(10) and not again.loading
    writer.join(10)
    assert answers == [[True, True]]
    assert read_back(again, keys + new_keys, 5000) == ([True] * 8, blocks + new_blocks)


def test_stored_keys_lists_sizes_and_the_payload_xxhash64(make_tier) -> None:
    import xxhash

    tier = make_tier()
    keys, blocks = keys_of(3), blocks_of(3, 7000)
    tier.put(keys, blocks)
    tier.evict(keys[:1])
    tier.close()
    again = make_tier()
    assert sorted(again.stored_keys()) == sorted((k, 7000, xxhash.xxh64_intdigest(b)) for k, b in zip(keys[1:], blocks[1:]))
