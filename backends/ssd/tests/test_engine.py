"""The I/O engines on their own: the staging ring never hands out overlapping memory, both
engines move bytes exactly, report errors per request, and drain in-flight I/O when a callback
raises."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from pegaflow_ssd.engine import IORequest, ThreadEngine, UringEngine, _Ring
from pegaflow_ssd.format import PAGE

from .conftest import require_uring


def test_ring_spans_never_overlap_under_random_use() -> None:
    rng = random.Random(3)
    ring = _Ring(64 * PAGE)
    live: dict[int, tuple[int, int]] = {}
    for _ in range(20_000):
        if live and (rng.random() < 0.5 or len(live) > 20):
            span = rng.choice(list(live))
            del live[span]
            ring.free(span)
            continue
        n = rng.choice([1, 2, 3, 8, 17, 33]) * PAGE
        got = ring.alloc(n)
        if got is None:
            continue
        span, start = got
        assert 0 <= start and start + n <= ring.size
        for other_start, other_n in live.values():
            assert start + n <= other_start or other_start + other_n <= start, "two live spans overlap"
        live[span] = (start, n)


def test_ring_full_when_head_meets_the_oldest_span() -> None:
    ring = _Ring(4 * PAGE)
    a = ring.alloc(2 * PAGE)
    b = ring.alloc(2 * PAGE)
    assert a is not None and b is not None
    ring.free(a[0])
    c = ring.alloc(2 * PAGE)
    assert c is not None and c[1] == 0
    assert ring.alloc(PAGE) is None, "head == tail with spans in use means full, not empty"


def _engine(kind: str, queue_depth: int, arena: int):
    if kind == "io_uring":
        require_uring()
        return UringEngine(queue_depth, arena)
    return ThreadEngine(queue_depth, arena)


@pytest.fixture(params=["threads", "io_uring"])
def engine_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_engine_moves_bytes_exactly_through_a_small_arena(tmp_path: Path, engine_kind: str) -> None:
    engine = _engine(engine_kind, 4, 8 * PAGE)  # requests of 3 pages: the ring wraps constantly
    if isinstance(engine, UringEngine) and engine.registered:
        assert engine.fixed, f"registered arena but no fixed-buffer requests: {engine.detail}"
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        chunks = [os.urandom(3 * PAGE) for _ in range(40)]

        def filler(data: bytes):
            def fill(buf: memoryview) -> None:
                buf[:] = data

            return fill

        errors: list[OSError | None] = []
        engine.run(IORequest(fd, i * 3 * PAGE, 3 * PAGE, True, lambda b, e: errors.append(e), filler(c))
                   for i, c in enumerate(chunks))
        assert errors == [None] * 40
        got: dict[int, bytes] = {}

        def keep(i: int):
            def done(buf: memoryview, error: OSError | None) -> None:
                assert error is None
                got[i] = bytes(buf)

            return done

        engine.run(IORequest(fd, i * 3 * PAGE, 3 * PAGE, False, keep(i)) for i in range(40))
        assert [got[i] for i in range(40)] == chunks
        big = os.urandom(16 * PAGE)  # larger than the arena: a private buffer
        engine.run([IORequest(fd, 0, 16 * PAGE, True, lambda b, e: None, filler(big))])
        engine.run([IORequest(fd, 0, 16 * PAGE, False, keep(99))])
        assert got[99] == big
    finally:
        os.close(fd)
        engine.close()


def test_short_read_past_end_of_file_is_an_error(tmp_path: Path, engine_kind: str) -> None:
    engine = _engine(engine_kind, 2, 8 * PAGE)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    os.posix_fallocate(fd, 0, PAGE)
    try:
        seen: list[OSError | None] = []
        engine.run([IORequest(fd, 0, 2 * PAGE, False, lambda b, e: seen.append(e))])
        assert len(seen) == 1 and isinstance(seen[0], OSError) and "short read" in str(seen[0])
    finally:
        os.close(fd)
        engine.close()


def test_failing_callback_drains_and_propagates(tmp_path: Path, engine_kind: str) -> None:
    engine = _engine(engine_kind, 8, 16 * PAGE)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    os.posix_fallocate(fd, 0, 64 * PAGE)
    calls = []

    def done(buf: memoryview, error: OSError | None) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    try:
        with pytest.raises(RuntimeError, match="boom"):
            engine.run(IORequest(fd, i * PAGE, PAGE, False, done) for i in range(64))
        assert len(calls) < 64
        ok: list[bool] = []
        engine.run([IORequest(fd, 0, PAGE, False, lambda b, e: ok.append(e is None))])
        assert ok == [True], "the engine is usable after a failed batch"
    finally:
        os.close(fd)
        engine.close()
