"""Space reclaim: all-dead segments are reused, otherwise the segment with the least live data is
compacted; one segment is always kept free so compaction can make progress; results survive reopen."""

from __future__ import annotations

from .conftest import KIB, MIB, blocks_of, keys_of, read_back

SIZE = 12 * KIB  # 16 KiB records: four per 64 KiB segment; 1 MiB = 16 segments, 15 usable


def _fill(tier, salt: str = "k"):
    keys, blocks = keys_of(200, salt), blocks_of(200, SIZE)
    answers = tier.put(keys, blocks)
    stored = answers.index(False) if False in answers else len(answers)
    assert answers == [True] * stored + [False] * (len(answers) - stored)
    return keys[:stored], blocks[:stored]


def test_full_tier_keeps_one_segment_free_for_compaction(make_tier) -> None:
    tier = make_tier()
    keys, _ = _fill(tier)
    assert len(keys) == 15 * 4, "16 segments of 4 records, one kept free"
    assert tier.usage().used_bytes == 60 * 16 * KIB


def test_all_dead_segment_is_reused(make_tier) -> None:
    tier = make_tier()
    keys, blocks = _fill(tier)
    segment_files = sorted(p.name for p in tier.path.glob("seg-*"))
    assert tier.evict(keys[8:12]) == 4  # exactly the third segment's records
    new_keys, new_blocks = keys_of(4, "new"), blocks_of(4, SIZE)
    assert tier.put(new_keys, new_blocks) == [True] * 4
    assert sorted(p.name for p in tier.path.glob("seg-*")) == segment_files, "no file was added"
    rest = keys[:8] + keys[12:] + new_keys
    assert read_back(tier, rest, SIZE) == ([True] * len(rest), blocks[:8] + blocks[12:] + new_blocks)


def test_scattered_evictions_are_compacted(make_tier, io_mode: str) -> None:
    tier = make_tier(io=io_mode)
    keys, blocks = _fill(tier)
    dead = set(range(0, len(keys), 2))  # half of every segment: nothing can be reused as is
    assert tier.evict([keys[i] for i in sorted(dead)]) == len(dead)
    new_keys, new_blocks = keys_of(28, "new"), blocks_of(28, SIZE)
    answers = tier.put(new_keys, new_blocks)
    assert answers == [True] * 28, "30 blocks of room were freed; compaction must find 28 of them"
    live = [keys[i] for i in range(len(keys)) if i not in dead] + new_keys
    want = [blocks[i] for i in range(len(keys)) if i not in dead] + new_blocks
    assert read_back(tier, live, SIZE) == ([True] * len(live), want)
    assert tier.usage().blocks == len(live)
    tier.close()
    again = make_tier(io=io_mode)  # moved copies win over their (freed) originals
    assert read_back(again, live, SIZE) == ([True] * len(live), want)
    assert again.contains([keys[i] for i in sorted(dead)]) == [False] * len(dead)
    assert again.integrity_failures == 0


def test_no_progress_possible_answers_false(make_tier) -> None:
    tier = make_tier()
    _fill(tier)
    assert tier.put(keys_of(1, "more"), blocks_of(1, SIZE)) == [False]


def test_partially_written_segment_is_sealed_at_reopen_and_compacted_later(make_tier) -> None:
    tier = make_tier()
    keys, blocks = keys_of(2), blocks_of(2, SIZE)
    tier.put(keys, blocks)
    tier.close()
    again = make_tier()
    more_keys, more_blocks = _fill(again, "more")
    assert len(more_keys) == 14 * 4 + 2, "the half-full segment from the last run was compacted to make room"
    both = keys + more_keys
    assert read_back(again, both, SIZE) == ([True] * len(both), blocks + more_blocks)


def test_lower_capacity_at_reopen_gives_files_back_as_they_empty(make_tier) -> None:
    tier = make_tier(capacity=MIB)
    keys, _ = _fill(tier)
    tier.close()
    small = make_tier(capacity=MIB // 2)
    assert small.usage().blocks == len(keys)
    assert small.put(keys_of(1, "x"), blocks_of(1, SIZE)) == [False]
    small.evict(keys)
    assert small.put(keys_of(1, "x"), blocks_of(1, SIZE)) == [True]
    assert len(list(small.path.glob("seg-*"))) <= 8
