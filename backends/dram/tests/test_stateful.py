"""DramTier against a dict model under random operation sequences (hypothesis state machine).

Checks what the unit tests cannot enumerate: bytes always come back as stored, usage agrees with
the model, and the allocator never holds a slot that no block or reservation owns.
"""

from __future__ import annotations

import tempfile

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pegaflow_core import BlockKey
from pegaflow_dram import DramOptions, DramTier

SIZES = (100, 4096, 20_000)  # three size classes, so chunks move between classes
KEYS = st.integers(0, 11)


def key(i: int) -> BlockKey:
    return BlockKey("model", bytes([i + 1]))


def payload(i: int, size: int, version: int) -> bytes:
    return np.random.default_rng(i * 1000 + version).integers(0, 256, size, dtype=np.uint8).tobytes()


class DramModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.tier = DramTier(DramOptions(capacity=256 * 1024, chunk=64 * 1024, shm_dir=self.dir.name, numa=None))
        self.stored: dict[int, bytes] = {}
        self.reserved: dict[int, tuple[memoryview, bytes]] = {}
        self.version = 0

    def teardown(self) -> None:
        self.reserved.clear()
        self.tier.close()
        self.dir.cleanup()

    @rule(i=KEYS, size=st.sampled_from(SIZES))
    def put(self, i: int, size: int) -> None:
        self.version += 1
        data = payload(i, size, self.version)
        (ok,) = self.tier.put([key(i)], [data])
        if i in self.stored:
            assert ok  # a stored key answers True and keeps its bytes
        elif ok:
            self.stored[i] = data

    @rule(i=KEYS)
    def get(self, i: int) -> None:
        want = self.stored.get(i)
        out = bytearray(len(want) if want is not None else 1)
        (hit,) = self.tier.get_into([key(i)], [out])
        assert hit == (want is not None)
        if want is not None:
            assert bytes(out) == want

    @rule(i=KEYS)
    def evict(self, i: int) -> None:
        assert self.tier.evict([key(i)]) == (1 if self.stored.pop(i, None) is not None else 0)

    @rule(i=KEYS, size=st.sampled_from(SIZES))
    def reserve(self, i: int, size: int) -> None:
        if i in self.reserved:
            return
        (view,) = self.tier.reserve([key(i)], size)
        if view is not None:
            self.version += 1
            data = payload(i, size, self.version)
            view[:] = data
            self.reserved[i] = (view, data)

    @precondition(lambda self: bool(self.reserved))
    @rule(data=st.data(), commit=st.booleans())
    def finish(self, data: st.DataObject, commit: bool) -> None:
        i = data.draw(st.sampled_from(sorted(self.reserved)))
        _, written = self.reserved.pop(i)
        if commit:
            self.tier.commit([key(i)])
            self.stored.setdefault(i, written)
        else:
            self.tier.abort([key(i)])

    @invariant()
    def usage_matches(self) -> None:
        usage = self.tier.usage()
        assert usage.blocks == len(self.stored)
        assert usage.used_bytes == sum(len(v) for v in self.stored.values())
        assert self.tier.contains([key(i) for i in range(12)]) == [i in self.stored for i in range(12)]
        slots = sum(self.tier._alloc.stats().slots_used.values())
        assert slots == len(self.stored) + len(self.reserved)


TestDramModel = DramModel.TestCase
TestDramModel.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
