"""The block checksum: one value whatever the CPU (pools and peers compare checksums made on
different machines), and sensitive to every byte and to the length."""

import numpy as np
import pytest

from pegaflow_core import checksum as cs


needs_native = pytest.mark.skipif(cs.ALGORITHM != b"pfhash2\0", reason="the native library is not built")


@needs_native
def test_vector_and_portable_paths_agree_on_every_length_and_alignment() -> None:
    data = np.random.default_rng(1).integers(0, 256, (2 << 20) + 64, dtype=np.uint8)
    lengths = list(range(0, 260)) + [1023, 1024, 1025, 1088, 4096, 65543, 2 << 20]
    for n in lengths:
        for offset in (0, 1, 7, 32):
            view = data[offset : offset + n]
            assert cs.checksum(view) == cs.checksum_portable(view), (n, offset)


def test_every_flipped_bit_and_every_length_changes_the_checksum() -> None:
    rng = np.random.default_rng(2)
    block = rng.integers(0, 256, 2 << 20, dtype=np.uint8)
    before = cs.checksum(block)
    for position in rng.integers(0, block.size, 300):
        bit = np.uint8(1 << int(rng.integers(0, 8)))
        block[position] ^= bit
        assert cs.checksum(block) != before, position
        block[position] ^= bit
    assert cs.checksum(block) == before
    zeros = np.zeros(4096, dtype=np.uint8)
    assert len({cs.checksum(zeros[:n]) for n in range(4097)}) == 4097  # a torn tail of zeros is caught


def test_swapped_stripes_change_the_checksum() -> None:
    """Lanes are position-dependent: two 64-byte stripes (or two 1 KiB rounds) swapped differ."""
    block = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8)
    for size in (64, 1024):
        swapped = block.copy()
        swapped[:size], swapped[size : 2 * size] = block[size : 2 * size], block[:size]
        assert cs.checksum(swapped) != cs.checksum(block)


def test_read_only_and_bytes_inputs() -> None:
    data = bytes(range(256)) * 5
    array = np.frombuffer(data, dtype=np.uint8)
    assert cs.checksum(data) == cs.checksum(array) == cs.checksum(memoryview(data))


def test_a_peer_names_its_algorithm_and_this_node_computes_it_if_it_can() -> None:
    data = np.random.default_rng(4).integers(0, 256, 70_000, dtype=np.uint8)
    assert cs.checksum_for(cs.algorithm_name())(data) == cs.checksum(data)
    xxh3 = cs.checksum_for("xxh3-64")
    assert xxh3 is not None and xxh3(data) == __import__("xxhash").xxh3_64_intdigest(data.tobytes())
    assert cs.checksum_for("pfhash64") is None and cs.checksum_for("") is None  # older daemons
    assert cs.algorithm_name() in ("pfhash2", "xxh3-64")


def test_an_owner_whose_algorithm_this_node_cannot_compute_is_named_once(caplog) -> None:
    """Its blocks are misses (tests/test_cluster.py shows the mixed case that works); the log says
    which node, which algorithm and what to do, once per owner rather than once per block."""
    from pegaflow_core.default_plugins.remote import RemoteTier

    tier = RemoteTier()
    with caplog.at_level("ERROR", logger="pegaflow.remote"):
        for _ in range(3):
            tier._cannot_verify("node-a", "pfhash64")
        tier._cannot_verify("node-b", "")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "node node-a checksums its blocks with 'pfhash64'" in messages[0]
    assert "run one pegaflow version on every node, or set `verify: false`" in messages[0]
    assert "'an unnamed algorithm'" in messages[1]
