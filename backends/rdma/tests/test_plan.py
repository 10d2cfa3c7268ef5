"""Cutting batches into work requests: adjacent ops share a request, chunk and size limits hold,
and executing the requests moves exactly the bytes the ops describe (checked by simulation)."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from pegaflow_rdma.plan import OpSpan, WorkRequest, plan_work
from pegaflow_rdma.protocol import RemoteDescriptor


@dataclass(eq=False)
class Local:
    chunk: int
    data: bytearray


def remote(nbytes: int, chunk: int, region_id: int = 1) -> RemoteDescriptor:
    chunks = -(-nbytes // chunk)
    return RemoteDescriptor(1, region_id, nbytes, 0, chunk, (tuple(range(chunks)),))


def test_adjacent_blocks_become_one_request_with_merged_sges() -> None:
    local, peer = Local(1 << 30, bytearray(64)), remote(1 << 20, 1 << 30)
    spans = [OpSpan(i, local, i * 8, peer, i * 8, 8) for i in range(4)]  # contiguous on both sides
    [wr] = plan_work(spans, wr_size=1 << 20, max_sge=4)
    assert (wr.index, wr.remote_offset, wr.length) == (0, 0, 32)
    assert wr.sges == [[local, 0, 32]]


def test_a_gather_uses_one_sge_per_block_up_to_max_sge() -> None:
    local, peer = Local(1 << 30, bytearray(64)), remote(1 << 20, 1 << 30)
    # remote contiguous, local reversed: one request per max_sge blocks
    spans = [OpSpan(i, local, (7 - i) * 8, peer, i * 8, 8) for i in range(8)]
    wrs = plan_work(spans, wr_size=1 << 20, max_sge=3)
    assert [len(w.sges) for w in wrs] == [3, 3, 2]
    assert [w.remote_offset for w in wrs] == [0, 24, 48] and [w.index for w in wrs] == [0, 3, 6]


def test_requests_respect_wr_size_and_chunks_on_both_sides() -> None:
    local, peer = Local(4096, bytearray(1 << 16)), remote(1 << 16, 8192)
    wrs = plan_work([OpSpan(0, local, 100, peer, 3000, 20000)], wr_size=5000, max_sge=16)
    assert sum(w.length for w in wrs) == 20000
    for w in wrs:
        assert w.length <= 5000
        assert w.remote_offset // 8192 == (w.remote_offset + w.length - 1) // 8192, "crosses a remote chunk"
        for _, offset, length in w.sges:
            assert offset // 4096 == (offset + length - 1) // 4096, "crosses a local chunk"


def test_separate_remote_regions_and_gaps_split_requests() -> None:
    local = Local(1 << 30, bytearray(64))
    a, b = remote(64, 1 << 30, 1), remote(64, 1 << 30, 2)
    wrs = plan_work([OpSpan(0, local, 0, a, 0, 8), OpSpan(1, local, 8, b, 8, 8), OpSpan(2, local, 16, b, 24, 8),
                     OpSpan(3, local, 24, b, 32, 0)], wr_size=1 << 20, max_sge=16)
    assert [(w.remote.region_id, w.remote_offset, w.length) for w in wrs] == [(1, 0, 8), (2, 8, 8), (2, 24, 8)]


def execute(wrs: list[WorkRequest], remote_bytes: bytearray) -> None:
    """What the NIC does for an RDMA READ: the remote range scattered over the SGEs in order."""
    for wr in wrs:
        data = remote_bytes[wr.remote_offset : wr.remote_offset + wr.length]
        assert sum(s[2] for s in wr.sges) == wr.length
        pos = 0
        for local, offset, length in wr.sges:
            local.data[offset : offset + length] = data[pos : pos + length]
            pos += length


@settings(max_examples=150, deadline=None)
@given(
    blocks=st.lists(st.tuples(st.integers(0, 15), st.integers(0, 15), st.integers(0, 3)), max_size=24),
    block=st.sampled_from([1, 7, 64]),
    chunk_blocks=st.integers(1, 5),
    wr_blocks=st.integers(1, 6),
    max_sge=st.integers(1, 4),
)
def test_executing_the_requests_equals_executing_the_ops(blocks, block, chunk_blocks, wr_blocks, max_sge) -> None:
    size = 20 * block
    source = bytearray((i * 37 + 11) % 251 for i in range(size))
    peer = remote(size, chunk_blocks * block + 3)
    planned, direct = Local(chunk_blocks * block + 1, bytearray(size)), bytearray(size)
    spans = []
    for i, (lo, ro, n) in enumerate(blocks):
        length = min(n * block, size - lo * block, size - ro * block)
        spans.append(OpSpan(i, planned, lo * block, peer, ro * block, length))
        direct[lo * block : lo * block + length] = source[ro * block : ro * block + length]
    wrs = plan_work(spans, wr_size=max(4, wr_blocks * block), max_sge=max_sge)
    assert all(len(w.sges) <= max_sge and w.length <= max(4, wr_blocks * block) for w in wrs)
    execute(wrs, source)
    assert planned.data == direct
