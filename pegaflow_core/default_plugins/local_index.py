"""Built-in plugin: ``LocalIndex``, the in-process index of one machine (``index: {kind: local}``).

It sits on the daemon's hot path (every query is one ``acquire`` of a whole request's keys), so
the layout is chosen to make that call cheap:

* one ``_Entry`` object per key holds the key's locations, its pin count and a cached tuple of its
  locations, so ``acquire`` hashes each ``BlockKey`` once (its dataclass ``__hash__`` is Python
  code and costs about as much as everything else per key together);
* recency is kept per (tier, node) in an ``OrderedDict`` keyed by the ``_Entry`` objects themselves
  (identity hash, computed in C), so ``victims`` walks only the keys on that tier, oldest first,
  and never scans the whole index;
* lease deadlines sit in a heap, so ``expire`` touches only the leases that are due;
* a lease remembers the entries it pinned, so ``release`` does not hash keys again.

One lock guards everything; every method takes it once.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import operator
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pegaflow_core.backend import NoOptions
from pegaflow_core.errors import ClosedError, InvalidArgument
from pegaflow_core.hookspecs import Register, hookimpl
from pegaflow_core.index import Index, IndexStats, Lease, Location, check_entries
from pegaflow_core.keys import BlockKey, check_keys

_TierNode = tuple[str, str]
_SNAPSHOT = operator.attrgetter("snapshot")


class _Entry:
    """Everything the index knows about one key. Hashed by identity (no ``__eq__``) on purpose:
    the per-tier recency dicts key on entries, and identity hashing is far cheaper than
    ``BlockKey.__hash__``."""

    __slots__ = ("key", "locations", "snapshot", "pins")

    def __init__(self, key: BlockKey) -> None:
        self.key = key
        self.locations: dict[_TierNode, Location] = {}
        self.snapshot: tuple[Location, ...] = ()  # tuple(locations.values()), rebuilt on change
        self.pins = 0  # number of live leases holding this key (a lease may count a key twice)


@dataclass(slots=True)
class _LeaseRecord:
    """A live lease and the entries it pinned (kept so ending it needs no key hashing)."""

    lease: Lease
    entries: list[_Entry]


class LocalIndex(Index):
    """In-process index for one machine. Thread-safe; state is lost when the process ends."""

    kind = "local"
    Options = NoOptions  # nothing to configure

    def __init__(self, options: NoOptions | None = None) -> None:
        self.options = options if options is not None else NoOptions()
        self._lock = threading.Lock()
        self._entries: dict[BlockKey, _Entry] = {}
        self._recency: dict[_TierNode, OrderedDict[_Entry, None]] = {}
        self._leases: dict[str, _LeaseRecord] = {}
        self._by_owner: dict[str, set[str]] = {}
        self._deadlines: list[tuple[float, int, str]] = []  # heap of (expires_at, seq, lease_id)
        self._seq = itertools.count()
        # Lease ids: a random per-index prefix plus a counter is unique across indexes and
        # restarts and costs a fraction of uuid4().
        self._lease_prefix = secrets.token_hex(6)
        self._blocks = 0  # entries with at least one location
        self._pinned = 0  # entries with pins > 0
        self._closed = False

    @classmethod
    def conformance_options(cls, tmp_path: Path, capacity_bytes: int | None = None) -> Any:
        return NoOptions()

    # -- writes -------------------------------------------------------------------------------
    def insert(self, entries: Sequence[tuple[BlockKey, Location]]) -> None:
        items = check_entries(entries)
        with self._lock:
            self._check_open()
            by_key, recency = self._entries, self._recency
            for key, location in items:
                entry = by_key.get(key)
                if entry is None:
                    entry = by_key[key] = _Entry(key)
                fresh = not entry.locations
                if fresh:
                    self._blocks += 1
                where = (location.tier, location.node)
                if where not in entry.locations:
                    order = recency.get(where)
                    if order is None:
                        order = recency[where] = OrderedDict()
                    order[entry] = None
                entry.locations[where] = location
                entry.snapshot = tuple(entry.locations.values())
                if not fresh:  # a fresh entry was just appended to its one order: newest already
                    self._touch(entry)

    def remove(self, keys: Sequence[BlockKey], tier: str | None = None, node: str | None = None) -> int:
        keys = check_keys(keys)
        if tier is not None and not isinstance(tier, str):
            raise InvalidArgument(f"remove: tier must be a tier name or None, got {tier!r}")
        if node is not None and not isinstance(node, str):
            raise InvalidArgument(f"remove: node must be a node name or None, got {node!r}")
        removed = 0
        with self._lock:
            self._check_open()
            for key in keys:
                entry = self._entries.get(key)
                if entry is None or not entry.locations:
                    continue
                doomed = [
                    where for where in entry.locations
                    if (tier is None or where[0] == tier) and (node is None or where[1] == node)
                ]
                if not doomed:
                    continue
                for where in doomed:
                    del entry.locations[where]
                    order = self._recency[where]
                    del order[entry]
                    if not order:
                        del self._recency[where]
                entry.snapshot = tuple(entry.locations.values())
                removed += 1
                if not entry.locations:
                    self._blocks -= 1
                    if entry.pins == 0:
                        del self._entries[key]
                    # A pinned entry stays (with no locations) so its pin count survives until
                    # the lease ends; a re-insert meanwhile finds it still pinned.
        return removed

    # -- reads --------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[BlockKey]) -> list[tuple[Location, ...]]:
        keys = check_keys(keys)
        with self._lock:
            self._check_open()
            get = self._entries.get
            out: list[tuple[Location, ...]] = []
            for key in keys:
                entry = get(key)
                out.append(entry.snapshot if entry is not None else ())
            return out

    def is_pinned(self, keys: Sequence[BlockKey]) -> list[bool]:
        keys = check_keys(keys)
        with self._lock:
            self._check_open()
            get = self._entries.get
            out: list[bool] = []
            for key in keys:
                entry = get(key)
                out.append(entry is not None and entry.pins > 0)
            return out

    def victims(self, tier: str, count: int, node: str = "") -> list[BlockKey]:
        if not isinstance(tier, str) or not tier:
            raise InvalidArgument(f"victims: tier must be a non-empty tier name, got {tier!r}")
        if not isinstance(node, str):
            raise InvalidArgument(f"victims: node must be a string ('' = this node), got {node!r}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise InvalidArgument(f"victims: count must be an integer >= 0, got {count!r}")
        with self._lock:
            self._check_open()
            order = self._recency.get((tier, node))
            out: list[BlockKey] = []
            if not order or count == 0:
                return out
            # Oldest first; pinned keys are skipped, not moved, so they keep their age and become
            # victims again as soon as their lease ends.
            for entry in order:
                if entry.pins == 0:
                    out.append(entry.key)
                    if len(out) == count:
                        break
            return out

    def stats(self) -> IndexStats:
        """Counts; still answers (all zero) after close so a late metrics scrape does not fail."""
        with self._lock:
            return IndexStats(blocks=self._blocks, pinned=self._pinned, leases=len(self._leases))

    # -- leases -------------------------------------------------------------------------------
    def acquire(self, keys: Sequence[BlockKey], ttl_s: float, owner: str = "") -> Lease:
        keys = check_keys(keys)
        if (
            not isinstance(ttl_s, (int, float)) or isinstance(ttl_s, bool)
            or math.isnan(ttl_s) or ttl_s <= 0
        ):
            raise InvalidArgument(f"acquire: ttl_s must be a number of seconds > 0, got {ttl_s!r}")
        if not isinstance(owner, str):
            raise InvalidArgument(f"acquire: owner must be a string ('' = no owner), got {owner!r}")
        with self._lock:
            self._check_open()
            # The prefix up to the first miss, found with C-level passes (this runs for every
            # Query): a key never seen is None; an entry kept only for its pins has no locations.
            hits: list[_Entry] = list(map(self._entries.get, keys))
            if None in hits:
                del hits[hits.index(None):]
            snapshots = list(map(_SNAPSHOT, hits))
            if not all(snapshots):
                del hits[snapshots.index(()):]
                del snapshots[len(hits):]
            for entry in hits:
                if entry.pins == 0:
                    self._pinned += 1
                entry.pins += 1
            self._touch_all(hits)
            expires_at = time.monotonic() + ttl_s
            seq = next(self._seq)
            lease = Lease(
                lease_id=f"{self._lease_prefix}-{seq}",
                keys=tuple(keys[: len(hits)]),
                locations=tuple(snapshots),
                expires_at=expires_at,
                owner=owner,
            )
            self._leases[lease.lease_id] = _LeaseRecord(lease, hits)
            self._by_owner.setdefault(owner, set()).add(lease.lease_id)
            heapq.heappush(self._deadlines, (expires_at, seq, lease.lease_id))
            if len(self._deadlines) > 2 * len(self._leases) + 1024:
                self._compact_deadlines()
            return lease

    def release(self, lease_id: str) -> bool:
        if not isinstance(lease_id, str):
            raise InvalidArgument(f"release: lease_id must be the string from Lease.lease_id, got {lease_id!r}")
        with self._lock:
            self._check_open()
            record = self._leases.get(lease_id)
            if record is None:
                return False
            self._end(record)
            # A lease past its deadline that expire() has not swept yet is already over.
            return record.lease.expires_at > time.monotonic()

    def release_owner(self, owner: str) -> int:
        if not isinstance(owner, str):
            raise InvalidArgument(f"release_owner: owner must be a string, got {owner!r}")
        with self._lock:
            self._check_open()
            lease_ids = self._by_owner.get(owner)
            if not lease_ids:
                return 0
            records = [self._leases[lease_id] for lease_id in list(lease_ids)]
            for record in records:
                self._end(record)
            return len(records)

    def expire(self, now: float | None = None) -> int:
        """Release leases whose deadline is at or before ``now`` (default: ``time.monotonic()``)."""
        if now is None:
            now = time.monotonic()
        elif not isinstance(now, (int, float)) or isinstance(now, bool) or math.isnan(now):
            raise InvalidArgument(f"expire: now must be a time.monotonic() value or None, got {now!r}")
        expired = 0
        with self._lock:
            self._check_open()
            heap = self._deadlines
            while heap and heap[0][0] <= now:
                _, _, lease_id = heapq.heappop(heap)
                record = self._leases.get(lease_id)
                if record is not None:  # None: released earlier, its heap slot was stale
                    self._end(record)
                    expired += 1
        return expired

    def close(self) -> None:
        """Forget every key and lease. Idempotent; later calls (but ``stats``) raise ClosedError."""
        with self._lock:
            self._closed = True
            self._entries.clear()
            self._recency.clear()
            self._leases.clear()
            self._by_owner.clear()
            self._deadlines.clear()
            self._blocks = self._pinned = 0

    # -- internals (lock held) ----------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("LocalIndex is closed; build a new index")

    def _touch(self, entry: _Entry) -> None:
        """Make ``entry`` the most recently used key in every (tier, node) order it is in."""
        recency = self._recency
        for where in entry.locations:
            recency[where].move_to_end(entry)

    def _touch_all(self, entries: list[_Entry]) -> None:
        """``_touch`` of a batch of entries that each have a location, in order. Runs for every
        Query, so the per-entry Python work is cut: with one (tier, node) order (one tier) the
        batch goes through its move_to_end in C; otherwise entries are grouped per order first."""
        if len(self._recency) == 1:  # one tier: every entry with a location is in its one order
            order = next(iter(self._recency.values()))
            collections.deque(map(order.move_to_end, entries), maxlen=0)
            return
        groups: dict[_TierNode, list[_Entry]] = {}
        for entry in entries:
            for where in entry.locations:
                group = groups.get(where)
                if group is None:
                    group = groups[where] = []
                group.append(entry)
        for where, group in groups.items():
            collections.deque(map(self._recency[where].move_to_end, group), maxlen=0)

    def _end(self, record: _LeaseRecord) -> None:
        lease = record.lease
        del self._leases[lease.lease_id]
        owned = self._by_owner[lease.owner]
        owned.discard(lease.lease_id)
        if not owned:
            del self._by_owner[lease.owner]
        for entry in record.entries:
            entry.pins -= 1
            if entry.pins == 0:
                self._pinned -= 1
                if not entry.locations and self._entries.get(entry.key) is entry:
                    del self._entries[entry.key]

    def _compact_deadlines(self) -> None:
        """Drop heap slots of leases released before their deadline, so the heap stays
        proportional to the live leases however fast leases come and go."""
        self._deadlines = [slot for slot in self._deadlines if slot[2] in self._leases]
        heapq.heapify(self._deadlines)


@hookimpl
def register_indexes(register: Register) -> None:
    register(LocalIndex)
