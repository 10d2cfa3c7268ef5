"""The tier stack: the daemon's store, built from the config's tiers and index.

It owns placement policy and nothing else: where a saved block goes (the top tier, through its
host views, so the copy from engine memory lands in place), what is evicted when the top tier is
full (the index's least recently used unpinned blocks, spilled to the next tier down when there is
one), and how a hit in a lower tier is promoted back to the top before it is served. Copies from
and to engine memory are the caller's (the daemon's copier); the stack hands out views.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Any

from .buffers import pick, put
from .deferred import Deferred
from .device_io import DeviceSegments, LoadRoute, load_route
from .errors import InvalidArgument, PegaflowError, PluginError
from .index import Index, Lease, Location
from .keys import BlockKey
from .memory import Landed
from .metrics import Metrics
from .tier import Tier

log = logging.getLogger("pegaflow.stack")

#: ``fill(batches, landed)``: write each drawn batch's blocks, ``(positions, views)``, calling
#: ``landed(indices)`` for those done early (indices count the views of all batches in order).
Fill = Callable[[Iterator[tuple[list[int], list[memoryview]]], Landed], None]
FIRST_BATCH = 16  # a save's first batch of slots: one GPU save tile of 2 MiB blocks; later ones grow 4x
CLEAN_WINDOW = 2  # make_room looks this many times further down the LRU order for blocks it can drop without a write
PROMOTION_WAIT_S = 30.0  # a load waiting on another thread's promotion of the same block
PUBLISH_DELAY_S = 0.005  # promoted blocks are published this long after their waiters were woken


@dataclass(frozen=True)
class SaveOutcome:
    stored: int
    already_present: int
    dropped: int


class TierStack:
    """Tiers top (fastest) to bottom, one index over all of them."""

    def __init__(self, tiers: Sequence[tuple[str, Tier]], index: Index, metrics: Metrics, node: str = "",
                 publish_offsets: bool = False) -> None:
        """``publish_offsets``: peers read this node's top tier over a transport, so what the
        cluster is told of its blocks carries their offsets there (``Location.offset``)."""
        if not tiers:
            raise InvalidArgument("a tier stack needs at least one tier")
        top_name, top = tiers[0]
        if not top.capabilities.host_views:
            raise InvalidArgument(
                f"tiers[0] ({top_name!r}, kind {top.kind!r}) must offer host views (like 'dram'): the daemon "
                "copies engine KV straight into the top tier"
            )
        self.tiers = list(tiers)
        self.index = index
        self.metrics = metrics
        self.node = node
        self.publish_offsets = publish_offsets and hasattr(top, "locate")
        self._lock = threading.Lock()
        self._in_flight: set[BlockKey] = set()  # being saved
        self._promoting: dict[BlockKey, Future[None]] = {}  # being promoted, done when they are in the top tier
        self._block_bytes: dict[str, int] = {}
        # promoted blocks the cluster is told of a moment later, after their waiters are answered
        # (deferred.py); an index without a cluster has nothing to tell it
        self._tells_cluster = type(index).publish is not Index.publish
        self._to_publish: Deferred[list[tuple[BlockKey, Location]]] = Deferred(
            "pegaflow-publish", self._publish_promoted, PUBLISH_DELAY_S)
        # tiers whose get_into_located takes ``delivered`` (one written before it existed does not)
        self._delivers = {name: "delivered" in inspect.signature(tier.get_into_located).parameters
                          for name, tier in self.tiers}
        for name, tier in self.tiers:
            metrics.bind_gauge(metrics.tier_capacity.labels(name), lambda t=tier: t.usage().capacity_bytes)
            metrics.bind_gauge(metrics.tier_used.labels(name), lambda t=tier: t.usage().used_bytes)
            metrics.bind_gauge(metrics.tier_blocks.labels(name), lambda t=tier: t.usage().blocks)
            metrics.bind_gauge(metrics.tier_integrity_failures.labels(name), lambda t=tier: t.integrity_failures)
        self.recovered = self._index_recovered()
        self._write_through = [i for i, (_, t) in enumerate(self.tiers) if i > 0 and getattr(getattr(t, "options", None), "write_through", False)]
        self._through_queue: queue.SimpleQueue[list[BlockKey] | None] = queue.SimpleQueue()
        self._through_thread: threading.Thread | None = None
        if self._write_through:
            self._through_thread = threading.Thread(target=self._write_through_loop, name="pegaflow-write-through", daemon=True)
            self._through_thread.start()

    def _index_recovered(self) -> int:
        """Index what persistent tiers found at open (a re-attached pool, SSD segments), lowest
        tier first so that the fastest copy is the most recently used one. A tier still
        rebuilding in the background is indexed by a thread once it is done."""
        total = 0
        for name, tier in reversed(self.tiers):
            if tier.warming and tier.capabilities.persistent:
                threading.Thread(target=self._index_tier, args=(name, tier), name=f"pegaflow-recover-{name}", daemon=True).start()
            else:
                total += self._index_tier(name, tier)
        return total

    def _index_tier(self, name: str, tier: Tier) -> int:
        found = tier.recovered()
        if found:
            offsets = self._offsets(tier, [key for key, _ in found])
            self.index.insert([(key, Location(name, self.node, nbytes, None, offset))
                               for (key, nbytes), offset in zip(found, offsets)])
            with self._lock:
                for key, nbytes in found:
                    self._block_bytes.setdefault(key.namespace, nbytes)
            log.info("tier %s: %d blocks recovered and indexed", name, len(found))
        return len(found)

    @property
    def top(self) -> tuple[str, Tier]:
        return self.tiers[0]

    # -- namespaces ---------------------------------------------------------------------------
    def claim_block_size(self, namespace: str, block_bytes: int) -> None:
        """Every context of a namespace must produce blocks of one size; the first one sets it."""
        with self._lock:
            known = self._block_bytes.setdefault(namespace, block_bytes)
        if known != block_bytes:
            raise InvalidArgument(
                f"namespace {namespace!r} stores blocks of {known} bytes, but this layout gives {block_bytes}: "
                "a namespace must fingerprint the KV layout (dtype, block size, heads, head size)"
            )

    # -- save ---------------------------------------------------------------------------------
    def stored_here(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Which keys this node stores already. Stored once per node: a copy on another node does
        not stop this one keeping its own."""
        local = {"", self.node}
        out = []
        for locs in self.index.lookup_here(keys):  # a plain loop: a generator per key cost 0.4 ms per 625 keys
            for loc in locs:
                if loc.node in local:
                    out.append(True)
                    break
            else:
                out.append(False)
        return out

    def save(self, keys: Sequence[BlockKey], nbytes: int, fill: Fill, present: list[bool] | None = None) -> SaveOutcome:
        """Store the blocks that are not stored yet. ``fill(batches, landed)`` must draw every
        ``(positions, views)`` batch of ``batches`` and write the block for ``keys[positions[i]]``
        into ``views[i]``. Slots are reserved as each batch is drawn, the first batch small and
        later ones larger, so a copy that queues its work (the GPU lanes) moves the first blocks
        while the later ones are still being reserved, instead of after all of them. A block is
        visible once ``fill`` reports it through ``landed([i, ...])`` (``i`` counts the views of
        all batches in order) or returns, never before.
        ``present`` is ``stored_here(keys)`` when the caller has it already."""
        if present is None:
            present = self.stored_here(keys)
        todo: list[int] = []
        with self._lock:
            for i, key in enumerate(keys):
                if present[i] or key in self._in_flight:
                    continue
                self._in_flight.add(key)
                todo.append(i)
        already = len(keys) - len(todo)
        got_keys: list[BlockKey] = []  # reserved, in the order the batches handed out their views
        try:
            if not todo:
                return SaveOutcome(0, already, 0)
            name, top = self.top
            location = Location(name, self.node, nbytes)  # one object for the batch: validated once
            published: list[bool] = []
            drawn = [False]

            def batches() -> Iterator[tuple[list[int], list[memoryview]]]:
                at, size = 0, FIRST_BATCH
                while at < len(todo):
                    positions = todo[at : at + size]
                    at, size = at + size, 4 * size
                    views = self._reserve_top([keys[i] for i in positions], nbytes)
                    got = [j for j, v in enumerate(views) if v is not None]
                    got_keys.extend(keys[positions[j]] for j in got)
                    published.extend([False] * len(got))
                    if got:
                        yield [positions[j] for j in got], pick(views, got)
                drawn[0] = True

            def publish(indices: Sequence[int]) -> None:
                """Whole blocks become visible: those ``fill`` reports landed while the rest are
                still being copied (their bookkeeping is then off the request's critical path),
                and the others once it returns."""
                fresh = [got_keys[i] for i in indices if not published[i]]
                if fresh:
                    top.commit(fresh)
                    entries = [(k, location) for k in fresh]
                    self.index.insert_here(entries)
                    self.index.publish(self._for_peers(entries))
                for i in indices:
                    published[i] = True

            try:
                fill(batches(), publish)
                if not drawn[0]:
                    raise PegaflowError("a save's fill returned without drawing every batch of slots")
                publish(range(len(got_keys)))
            except BaseException:
                # Blocks published already are whole; the rest of the batch never becomes visible.
                top.abort([k for k, done in zip(got_keys, published) if not done])
                raise
        finally:
            with self._lock:
                self._in_flight.difference_update(keys[i] for i in todo)
        dropped = len(todo) - len(got_keys)
        if self._write_through and got_keys:
            self._through_queue.put(got_keys)
        self.metrics.bytes.labels(name, "save").inc(nbytes * len(got_keys))
        self.metrics.blocks.labels(name, "save").inc(len(got_keys))
        self.metrics.deduplicated.inc(already)
        if dropped:
            self.metrics.dropped.inc(dropped)
        return SaveOutcome(len(got_keys), already, dropped)

    def _for_peers(self, entries: list[tuple[BlockKey, Location]]) -> list[tuple[BlockKey, Location]]:
        """Blocks just committed to the top tier, sharing one Location, as the cluster is told of
        them: each with its own offset when peers read this pool (``publish_offsets``: a fetching
        peer then starts its read without waiting for its Pin's answer, remote.py). This node's
        own index keeps the shared Location: one object per batch to build and validate, instead
        of one per block (~1 ms per 625 blocks on the 2-core VM)."""
        if not self.publish_offsets or not entries:
            return entries
        keys = [k for k, _ in entries]
        tier, node, nbytes = entries[0][1].tier, entries[0][1].node, entries[0][1].nbytes
        return [(k, Location(tier, node, nbytes, None, offset)) for k, offset in zip(keys, self._offsets(self.top[1], keys))]

    def _offsets(self, tier: Tier, keys: list[BlockKey]) -> list[int]:
        """Where ``keys`` lie in ``tier``'s memory, when it is the pool peers read; -1 otherwise."""
        if not self.publish_offsets or tier is not self.top[1]:
            return [-1] * len(keys)
        return [-1 if where is None else where[0] for where in tier.locate(keys)]

    def _reserve_top(self, keys: list[BlockKey], nbytes: int) -> list[memoryview | None]:
        """Slots in the top tier for ``keys``, evicting for those that found none the first time;
        ``None`` where there is still no room."""
        top = self.top[1]
        slots = top.reserve(keys, nbytes)
        missing = [i for i, s in enumerate(slots) if s is None]
        if missing:
            self.make_room(0, len(missing))
            again = top.reserve([keys[i] for i in missing], nbytes)
            if len(missing) == len(slots):
                return again  # a full pool, the usual case: every slot came from the second try
            put(slots, missing, again)
        return slots

    def make_room(self, level: int, count: int) -> int:
        """Evict up to ``count`` LRU unpinned blocks from tier ``level``, spilling them to the
        tier below when there is one. Return how many were evicted."""
        name, tier = self.tiers[level]
        spills = level + 1 < len(self.tiers)
        victims = self.index.victims(name, CLEAN_WINDOW * count if spills else count, self.node)
        if spills:
            victims = self._clean_first(level, victims, count)
        if not victims:
            return 0
        if spills:
            self._spill(level, victims)
        tier.evict(victims)
        self.index.remove(victims, tier=name, node=self.node)
        self.metrics.evictions.labels(name).inc(len(victims))
        return len(victims)

    def _clean_first(self, level: int, window: list[BlockKey], count: int) -> list[BlockKey]:
        """``count`` victims out of the LRU ``window``, those the tier below holds already first:
        evicting them costs no write (a block promoted from the SSD keeps its SSD copy), while a
        block only in this tier must be written down first. Within the window LRU order is kept."""
        if len(window) <= count:
            return window
        lower = self.tiers[level + 1][0]
        held = [any(loc.tier == lower for loc in locs) for locs in self.index.lookup(window)]
        clean = [k for k, h in zip(window, held) if h]
        dirty = [k for k, h in zip(window, held) if not h]
        return clean[:count] + dirty[: max(0, count - len(clean))]

    def _spill(self, level: int, keys: list[BlockKey]) -> None:
        name, tier = self.tiers[level]
        lower_name, lower = self.tiers[level + 1]
        locations = self.index.lookup(keys)
        todo = [(k, locs) for k, locs in zip(keys, locations) if not any(l.tier == lower_name for l in locs)]
        if not todo:
            return
        views = tier.view([k for k, _ in todo])
        batch = [(k, locs, v) for (k, locs), v in zip(todo, views) if v is not None]
        try:
            stored = lower.put([k for k, _, _ in batch], [v for _, _, v in batch])
            full = [i for i, ok in enumerate(stored) if not ok]
            if full and self.make_room(level + 1, len(full)):  # the lower tier is full: its LRU go
                retry = lower.put([batch[i][0] for i in full], [batch[i][2] for i in full])
                for i, ok in zip(full, retry):
                    stored[i] = ok
        except PegaflowError as exc:
            log.warning("spill from %s to %s failed: %s", name, lower_name, exc)
            return
        entries = []
        for (key, locs, view), ok in zip(batch, stored):
            if ok:
                entries.append((key, Location(lower_name, self.node, len(view), _checksum_of(locs))))
        self.index.insert(entries)
        moved = sum(len(v) for (_, _, v), ok in zip(batch, stored) if ok)
        self.metrics.bytes.labels(lower_name, "spill").inc(moved)

    def _write_through_loop(self) -> None:
        """Copy newly saved blocks into the write-through tiers, off the save path. Each block
        is pinned by a short lease while it is read, so eviction cannot reuse its slot."""
        name, top = self.top
        while (keys := self._through_queue.get()) is not None:
            for key in keys:
                lease = self.index.acquire([key], 30.0, owner="pegaflow-write-through")
                try:
                    if not lease.hits:
                        continue
                    view = top.view([key])[0]
                    if view is None:
                        continue
                    for level in self._write_through:
                        lower_name, lower = self.tiers[level]
                        try:
                            if lower.put([key], [view])[0]:
                                self.index.insert([(key, Location(lower_name, self.node, len(view)))])
                                self.metrics.bytes.labels(lower_name, "write_through").inc(len(view))
                        except PegaflowError as exc:
                            log.warning("write-through of %r to %s failed: %s", key, lower_name, exc)
                finally:
                    self.index.release(lease.lease_id)

    # -- load ---------------------------------------------------------------------------------
    def start_promotion(self, keys: Sequence[BlockKey], nbytes: int, submit: Callable[..., Any],
                        device_memory: bool = False,
                        locations: Sequence[Sequence[Location]] | None = None) -> bool:
        """Start bringing the blocks of ``keys`` held only in lower tiers up into the top tier on
        ``submit`` (an executor's submit); return whether any of them is still on its way up.
        Blocks a direct-route tier will read straight into the engine's GPU memory at Load
        (``device_memory``: the engine's memory kind is GPU memory) are left where they are.

        Blocks are claimed here, before the work is queued: an engine polls its Query while the
        answer is "loading", and every poll must not queue another copy of the same promotion
        (those re-read the blocks from the SSD and hold the executor's threads). Callers hold a
        lease on ``keys``; ``locations`` are the lease's, handed to the lower tiers so that they
        need not look the keys up again."""
        absent = self._absent_from_top(keys)
        direct = {i for positions in self._direct_holders(keys, device_memory, absent).values() for i in positions}
        missing = [keys[i] for i in absent if i not in direct]
        if not missing:
            return False
        mine, _, done = self._claim(missing)
        if mine:
            where = None if locations is None else dict(zip(keys, locations))
            try:
                submit(self._promote_and_unclaim, mine, nbytes, done, where)
            except BaseException:
                self._unclaim(mine, done)
                raise
        return True

    def _absent_from_top(self, keys: Sequence[BlockKey]) -> list[int]:
        """Positions of ``keys`` whose bytes are not in the top tier."""
        return [i for i, here in enumerate(self.top[1].contains(keys)) if not here]

    def _direct_holders(self, keys: Sequence[BlockKey], device_memory: bool,
                        absent: list[int] | None = None) -> dict[int, list[int]]:
        """Positions of ``keys`` absent from the top tier (``absent``, when the caller has them)
        that a lower tier will load straight into GPU memory (route DIRECT, see device_io.py), by
        that tier's level; the first such tier holding a block serves it. Empty unless the
        engine's memory is GPU memory and some tier takes the direct route."""
        levels = [i for i, (_, tier) in enumerate(self.tiers)
                  if i and device_memory and load_route(tier, True) is LoadRoute.DIRECT]
        if not levels:
            return {}
        out: dict[int, list[int]] = {}
        pending = self._absent_from_top(keys) if absent is None else absent
        for level in levels:
            if not pending:
                break
            held = self.tiers[level][1].contains([keys[i] for i in pending])
            if any(held):
                out[level] = [i for i, h in zip(pending, held) if h]
            pending = [i for i, h in zip(pending, held) if not h]
        return out

    def load_direct(self, keys: Sequence[BlockKey], nbytes: int, device_memory: bool,
                    segments_of: Callable[[list[int]], Sequence[DeviceSegments]]) -> set[int]:
        """Read the blocks of ``keys`` that direct-route tiers hold straight into the engine's GPU
        memory (``segments_of(positions)``: each block's device segments); return the positions
        loaded. A block that fails here (a miss, a checksum, the tier's error) is left to the
        staged path, which promotes it or reports it failed. Callers hold a lease on ``keys``."""
        done: set[int] = set()
        for level, positions in self._direct_holders(keys, device_memory).items():
            name, tier = self.tiers[level]
            try:
                ok = tier.read_into_device([keys[i] for i in positions], segments_of(positions))
            except PegaflowError as exc:
                log.warning("direct load of %d blocks from %s failed (%s); staging them instead", len(positions), name, exc)
                continue
            loaded = [i for i, good in zip(positions, ok) if good]
            done.update(loaded)
            self.metrics.bytes.labels(name, "load_direct").inc(nbytes * len(loaded))
        return done

    def acquire(self, keys: Sequence[BlockKey], ttl_s: float, owner: str) -> Lease:
        lease = self.index.acquire(keys, ttl_s, owner)
        self.metrics.query_blocks.labels("hit").inc(lease.hits)
        self.metrics.query_blocks.labels("miss").inc(len(keys) - lease.hits)
        return lease

    def read_views(self, keys: Sequence[BlockKey], nbytes: int) -> list[memoryview | None]:
        """Views of leased blocks in the top tier, promoting those held only lower down.
        ``None`` marks a block that cannot be served (the engine recomputes it)."""
        name, top = self.top
        views = top.view(keys)
        lost = [i for i, v in enumerate(views) if v is None]
        if lost and len(self.tiers) > 1:
            for i, view in zip(lost, self._promote([keys[i] for i in lost], nbytes)):
                views[i] = view
        for i, view in enumerate(views):
            if view is not None and len(view) != nbytes:
                log.error("block %r is %d bytes in %s, the context expects %d", keys[i], len(view), name, nbytes)
                views[i] = None
        failed = [k for k, v in zip(keys, views) if v is None]
        if failed:
            self.metrics.load_failures.labels("missing").inc(len(failed))
            self._forget_lost(failed)
        return views

    def _forget_lost(self, keys: list[BlockKey]) -> None:
        """Index entries of tiers that no longer hold these blocks (a tier dropped a block that
        failed its checksum, a lower tier lost a file) are removed, so the engine's next save
        stores the recomputed block again instead of skipping it as already present."""
        for name, tier in self.tiers:
            gone = [k for k, held in zip(keys, tier.contains(keys)) if not held]
            if gone:
                self.index.remove(gone, tier=name, node=self.node)

    def _promote(self, keys: list[BlockKey], nbytes: int) -> list[memoryview | None]:
        """Copy blocks held only in lower tiers into the top tier and return their views. A block
        another thread is promoting already (a Query that answered "loading") is waited for, not
        copied twice; ``None`` marks a block no tier could deliver."""
        mine, waits, done = self._claim(keys)
        if mine:
            self._promote_and_unclaim(mine, nbytes, done)
        if waits:
            wait(waits, PROMOTION_WAIT_S)
        return self.top[1].view(keys)

    def promotions(self, keys: Sequence[BlockKey]) -> set[Future[None]]:
        """The promotions under way for any of ``keys``: each future is done once its blocks are
        in the top tier (or failed to get there). A Query that may wait waits on these."""
        with self._lock:
            return {self._promoting[k] for k in keys if k in self._promoting}

    def _claim(self, keys: Sequence[BlockKey]) -> tuple[list[BlockKey], set[Future[None]], Future[None]]:
        """Claim the keys no thread is promoting yet: returns them, the futures of the promotions
        already under way for the others, and the future done when the claimed ones are."""
        done: Future[None] = Future()
        done.set_running_or_notify_cancel()  # running: a waiter can never cancel it for the others
        with self._lock:
            waits = {self._promoting[k] for k in keys if k in self._promoting}
            mine = [k for k in keys if k not in self._promoting]
            for key in mine:
                self._promoting[key] = done
        return mine, waits, done

    def _promote_and_unclaim(self, keys: list[BlockKey], nbytes: int, done: Future[None],
                             where: dict[BlockKey, Sequence[Location]] | None = None) -> None:
        publish: list[tuple[BlockKey, Location]] = []
        try:
            self._promote_claimed(keys, nbytes, publish, where)
        finally:
            self._unclaim(keys, done)
        if publish and self._tells_cluster:
            self._to_publish.put(publish)

    def _publish_promoted(self, batches: list[list[tuple[BlockKey, Location]]]) -> None:
        """Tell the cluster of promoted blocks, those still here: one evicted in the meantime
        would otherwise be published after its removal, and stay listed."""
        entries = [entry for batch in batches for entry in batch]
        held = self.top[1].contains([key for key, _ in entries])
        self.index.publish([entry for entry, here in zip(entries, held) if here])

    def _unclaim(self, keys: list[BlockKey], done: Future[None]) -> None:
        with self._lock:
            for key in keys:
                del self._promoting[key]
        done.set_result(None)

    def _promote_claimed(self, keys: list[BlockKey], nbytes: int, publish: list[tuple[BlockKey, Location]],
                         where: dict[BlockKey, Sequence[Location]] | None = None) -> None:
        """Promote ``keys``; what must still be told to the cluster (``Index.publish``) is left in
        ``publish``: the caller does it after the waiters are woken (the blocks are served from
        this node's index already, and a Redis round trip would only delay them). ``where``: the
        keys' locations from the caller's lease, if it has them."""
        name, top = self.top
        keys = [k for k, here in zip(keys, top.contains(keys)) if not here]  # arrived since they were missed
        if not keys:
            return
        slots = self._reserve_top(keys, nbytes)
        pending = [i for i, s in enumerate(slots) if s is not None]
        location = Location(name, self.node, nbytes)  # one object for the batch: validated once
        for lower_name, lower in self.tiers[1:]:
            if not pending:
                break
            wanted = [keys[i] for i in pending]
            if where is None:
                hits = lower.get_into(wanted, pick(slots, pending))
                self._commit_promoted(wanted, [None] * len(wanted), [n for n, ok in enumerate(hits) if ok],
                                      location, lower_name, publish)
            else:
                hits = self._get_located(lower, lower_name, wanted, pick(slots, pending), where, location, publish)
            pending = [i for i, ok in zip(pending, hits) if not ok]
        if pending:
            top.abort([keys[i] for i in pending])

    def _get_located(self, lower: Tier, lower_name: str, wanted: list[BlockKey], dests: list[memoryview | None],
                     where: dict[BlockKey, Sequence[Location]], location: Location,
                     publish: list[tuple[BlockKey, Location]]) -> list[bool]:
        """``get_into_located`` from ``lower``, committing blocks as the tier delivers them: a
        remote fetch hands them over batch by batch while the rest of its read still moves, so
        their commits and local index inserts are done by the time the read ends instead of
        after it (~1.5 ms per 256 blocks on the 2-core VM, docs/benchmarks.md). What was not
        delivered early is committed when the call returns."""
        verified: list[int | None] = [None] * len(wanted)  # checksums the tier checked the bytes against
        committed: set[int] = set()  # positions delivered early, committed already
        guard = threading.Lock()  # deliveries may come from two threads at once

        def delivered(positions: Sequence[int]) -> None:
            with guard:
                again = committed.intersection(positions)
                if again:  # a tier's bug; failing its call makes the rest misses, never wrong bytes
                    raise PluginError(f"tier {lower_name!r} delivered blocks at positions {sorted(again)[:8]} twice")
                self._commit_promoted(wanted, verified, positions, location, lower_name, publish)
                committed.update(positions)

        locations = [where.get(k, ()) for k in wanted]
        if self._delivers[lower_name]:
            hits = lower.get_into_located(wanted, dests, locations, verified, delivered=delivered)
        else:
            hits = lower.get_into_located(wanted, dests, locations, verified)
        with guard:
            rest = [n for n, ok in enumerate(hits) if ok and n not in committed]
            self._commit_promoted(wanted, verified, rest, location, lower_name, publish)
            return [bool(ok) or n in committed for n, ok in enumerate(hits)]

    def _commit_promoted(self, keys: list[BlockKey], checksums: list[int | None], positions: Sequence[int],
                         location: Location, lower_name: str, publish: list[tuple[BlockKey, Location]]) -> None:
        """Make the promoted blocks at ``positions`` of ``keys`` visible: committed to the top tier
        (sealed with their ``checksums``), indexed here, and queued in ``publish`` for the cluster."""
        if not positions:
            return
        self.top[1].commit([keys[n] for n in positions], [checksums[n] for n in positions])
        entries = [(keys[n], location) for n in positions]
        self.index.insert_here(entries)
        publish.extend(self._for_peers(entries))
        self.metrics.bytes.labels(lower_name, "promote").inc(location.nbytes * len(positions))

    def probe_remote(self, node: str, keys: Sequence[BlockKey], nbytes: int) -> tuple[int, float]:
        """Time the bare transport moving ``keys`` from ``node`` (which holds them) into scratch
        slots of the top tier (given back afterwards): the baseline of ``pegaflow bench remote``,
        taken between the same two daemons, pools and transport endpoints as a remote fetch."""
        probes = [tier for _, tier in self.tiers[1:] if hasattr(tier, "probe")]
        if not probes:
            raise InvalidArgument("probe: this daemon has no tier that fetches from other nodes (add `- {kind: remote}`)")
        _, top = self.top
        scratch = [BlockKey(k.namespace, hashlib.sha256(b"pegaflow-probe" + k.block_hash).digest(), k.shard) for k in keys]
        try:
            slots = self._reserve_top(scratch, nbytes)
            if any(s is None for s in slots):
                raise PegaflowError(f"probe: the top tier has no room for {len(keys)} scratch blocks")
            return probes[0].probe(node, keys, slots)
        finally:
            top.abort(scratch)

    def release(self, lease_id: str) -> bool:
        return self.index.release(lease_id)

    def close(self) -> None:
        self._to_publish.close()
        if self._through_thread is not None:
            self._through_queue.put(None)
            self._through_thread.join(timeout=30)
        for name, tier in self.tiers:
            try:
                tier.close()
            except Exception:
                log.exception("closing tier %s failed", name)
        self.index.close()


def _checksum_of(locations: Sequence[Location]) -> int | None:
    for location in locations:
        if location.checksum is not None:
            return location.checksum
    return None
