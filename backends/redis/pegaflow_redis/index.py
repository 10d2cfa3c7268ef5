"""``RedisIndex``: the cluster index (``index: {kind: redis}``). Every daemon of a cluster points at
the same Redis; each publishes the blocks it holds under its node id, and any of them can find and
lease any live node's blocks.

Three pieces of state, and who owns them:

* **Redis** holds the shared truth: locations, recency, leases and membership (README: key layout).
  Each method is one Lua script call (one round trip, atomic), never one call per block.
* **The shadow** is this process's own copy of what *this node* published (key -> tier -> record),
  in publish order. Redis can lose everything (a restart without persistence) or miss writes (an
  outage); the heartbeat notices and republishes the shadow, removing what Redis lists for this
  node that the shadow no longer has. Writes of this node's blocks go through ``_publish_lock`` so
  the shadow and Redis change in the same order.
* **Local lease records** keep each lease this index handed out with its ``time.monotonic()``
  deadline, so ``expire(now)`` and ``release_owner`` answer exactly as the local index does; Redis
  keeps the same leases with server-time deadlines and TTLs, so a daemon that dies pins nothing
  for longer than its leases' ttl.

When Redis is unreachable the daemon keeps serving alone: ``lookup`` and ``acquire`` answer misses,
``insert``/``remove``/``release`` change the shadow and local records and are reconciled when
Redis is back. Calls that cannot be answered without Redis (``victims``, ``is_pinned``, ``stats``,
``nodes``, ``register_node``) raise TransportError naming the URL. Short socket timeouts keep
every failure quick.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from pegaflow_core.backend import Availability
from pegaflow_core.errors import ClosedError, InvalidArgument, TransportError
from pegaflow_core.index import Index, IndexStats, Lease, Location
from pegaflow_core.keys import BlockKey, check_keys

from . import scripts
from .options import RedisIndexOptions

from pegaflow_core.index import NodeInfo, check_entries

log = logging.getLogger("pegaflow.redis")

# Separators of packed replies and records (see scripts.py): keys, locations, fields.
GS, RS, US = b"\x1d", b"\x1e", b"\x1f"
_REPUBLISH_CHUNK = 1000  # entries per INSERT/REMOVE script call while reconciling
_REAP_BUDGET = 1000  # dead-node locations deleted per REAP call
_REAP_CALLS_PER_BEAT = 10  # bound the heartbeat thread's cleaning work per beat
_CLOSE_REAP_S = 1.0  # how long close() spends deleting this node's own locations
_DECODE_CACHE = 1 << 16  # packed records -> Locations kept for reuse


@dataclass(slots=True)
class _LocalLease:
    expires_at: float
    owner: str
    offline: bool  # handed out while Redis was down: a miss that Redis never saw


class RedisIndex(Index):
    """Cluster index on Redis. Thread-safe; one instance per daemon (it heartbeats as ``node``)."""

    shared: ClassVar[bool] = True  # cluster-wide: the daemon keeps a local index in front of it

    kind = "redis"
    Options = RedisIndexOptions

    def __init__(self, options: RedisIndexOptions | None = None) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.options = options if options is not None else RedisIndexOptions()
        self.node = self.options.node
        self.url = _safe_url(self.options.url)
        self._redis_errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        # One retry without backoff: a pooled connection that died with a restarted server is
        # replaced at once, while a server that is really down still fails within socket_timeout.
        self._client = redis.Redis.from_url(
            self.options.url,
            socket_timeout=self.options.socket_timeout,
            socket_connect_timeout=self.options.socket_timeout,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=0,
        )
        self._scripts = {
            name: self._client.register_script(getattr(scripts, name))
            for name in ("INSERT", "LOOKUP", "ACQUIRE", "RELEASE", "RELEASE_OWNER", "REMOVE", "VICTIMS",
                         "IS_PINNED", "STATS", "HEARTBEAT", "NODES", "REAP", "OWN_KEYS", "OWN_TIERS")
        }
        self._argv0 = (self.options.key_prefix.encode(), self.node.encode())
        self._self_node = self.node.encode()
        self._ttl_ms = max(1, int(self.options.node_ttl * 1000))

        self._lock = threading.Lock()  # local lease records
        self._leases: dict[str, _LocalLease] = {}
        self._by_owner: dict[str, set[str]] = {}
        self._deadlines: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._lease_prefix = secrets.token_hex(8)

        self._publish_lock = threading.Lock()  # orders shadow changes with their Redis writes
        # enc -> b"tier\x1fnode" -> its packed record, least recently published first
        self._shadow: OrderedDict[bytes, dict[bytes, bytes]] = OrderedDict()
        # A new process is a new incarnation of the node: whatever Redis still lists for it from an
        # earlier one is reconciled against the (empty) shadow on the first heartbeat.
        self._resync_needed = True
        self._address = ""
        self._transports: dict[str, bytes] = {}
        self._decoded: dict[bytes, tuple[Location, ...]] = {}
        self._last_warning = 0.0
        self._closed = False
        self._stop = threading.Event()

        # Join now so a wrong URL fails at start-up with its reason, not later as silent misses.
        try:
            self._beat(force=True, raise_errors=True)
        except TransportError:
            self._client.close()
            raise
        self._thread = threading.Thread(target=self._heartbeat_loop, name=f"pegaflow-redis-heartbeat-{self.node}",
                                        daemon=True)
        self._thread.start()

    # -- backend plumbing ---------------------------------------------------------------------
    @classmethod
    def availability(cls) -> Availability:
        try:
            import redis
        except ImportError as exc:
            return Availability(False, f"the 'redis' package does not import ({exc}); pip install redis")
        return Availability(True, f"redis-py {getattr(redis, '__version__', '?')}")

    @classmethod
    def conformance_options(cls, tmp_path: Path, capacity_bytes: int | None = None) -> Any:
        """Needs a server: only when ``PEGAFLOW_REDIS_URL`` names one (each call a fresh prefix)."""
        import os

        url = os.environ.get("PEGAFLOW_REDIS_URL")
        if not url:
            return None
        return RedisIndexOptions(url=url, node="conformance", key_prefix=f"pegaflow-test-{secrets.token_hex(6)}",
                                 socket_timeout=2.0)

    # -- cluster membership -------------------------------------------------------------------
    def register_node(self, node_id: str, address: str, transports: dict[str, bytes] | None = None) -> None:
        """Publish how other daemons reach this one: its transport ``address`` and a descriptor per
        transport (e.g. the remote key of its pinned pool). The heartbeat keeps it alive and
        re-publishes it after a Redis restart. Raises TransportError when Redis is unreachable;
        the registration is kept and published by the heartbeat once Redis answers."""
        self._check_open()
        if node_id != self.node:
            raise InvalidArgument(
                f"register_node: node_id {node_id!r} is not this index's node {self.node!r}; "
                "set the index option 'node' to the daemon's node id"
            )
        if not isinstance(address, str):
            raise InvalidArgument(f"register_node: address must be a string, got {address!r}")
        transports = dict(transports or {})
        for name, descriptor in transports.items():
            if not isinstance(name, str) or not name:
                raise InvalidArgument(f"register_node: transport names must be non-empty strings, got {name!r}")
            if not isinstance(descriptor, (bytes, bytearray, memoryview)):
                raise InvalidArgument(
                    f"register_node: transports[{name!r}] must be bytes, got {type(descriptor).__name__}"
                )
            transports[name] = bytes(descriptor)
        self._address, self._transports = address, transports
        self._beat(force=True, raise_errors=True)

    def nodes(self) -> dict[str, NodeInfo]:
        """Live nodes of the cluster (this one included), by node id."""
        self._check_open()
        reply = self._call("list nodes", "NODES", ())
        out: dict[str, NodeInfo] = {}
        for node_b, flat in reply:
            node_id = node_b.decode()
            address, transports = "", {}
            for name, value in zip(flat[::2], flat[1::2]):
                if name == b"addr":
                    address = value.decode()
                elif name.startswith(b"t:"):
                    transports[name[2:].decode()] = bytes(value)
            out[node_id] = NodeInfo(node_id, address, transports)
        return out

    # -- writes -------------------------------------------------------------------------------
    def insert(self, entries: Sequence[tuple[BlockKey, Location]]) -> None:
        items = check_entries(entries)
        self._check_open()
        if not items:
            return
        encs: list[bytes] = []
        records: list[bytes] = []
        own: list[tuple[bytes, bytes, bytes]] = []
        for enc, (_, location) in zip(_encode([key for key, _ in items]), items):
            node_b = self._node_id(location.node)
            where = location.tier.encode() + US + node_b
            record = where + US + _value(location)
            encs.append(enc)
            records.append(record)
            if node_b == self._self_node:
                own.append((enc, where, record))
        with self._publish_lock:
            for enc, where, record in own:
                locations = self._shadow.get(enc)
                if locations is None:
                    locations = self._shadow[enc] = {}
                else:
                    self._shadow.move_to_end(enc)
                locations[where] = record
            self._write("insert", "INSERT", [_pack(encs), GS.join(records)])

    def remove(self, keys: Sequence[BlockKey], tier: str | None = None, node: str | None = None) -> int:
        keys = check_keys(keys)
        if tier is not None and (not isinstance(tier, str) or not tier):
            raise InvalidArgument(f"remove: tier must be a tier name or None, got {tier!r}")
        if node is not None and not isinstance(node, str):
            raise InvalidArgument(f"remove: node must be a node name or None, got {node!r}")
        self._check_open()
        if not keys:
            return 0
        encs = _encode(keys)
        node_b = b"" if node is None else self._node_id(node)
        tier_b = b"" if tier is None else _encode_name(tier, "tier")
        with self._publish_lock:
            if node is None or node_b == self._self_node:
                for enc in encs:
                    locations = self._shadow.get(enc)
                    if locations is None:
                        continue
                    for fld in [f for f in locations if tier is None or f.split(US, 1)[0] == tier_b]:
                        del locations[fld]
                    if not locations:
                        del self._shadow[enc]
            removed = self._write("remove", "REMOVE", [tier_b, node_b, b"0" if node is None else b"1", _pack(encs)])
        return int(removed) if removed is not None else 0

    # -- reads --------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[BlockKey]) -> list[tuple[Location, ...]]:
        keys = check_keys(keys)
        self._check_open()
        if not keys:
            return []
        try:
            reply = self._call("lookup", "LOOKUP", [_pack(_encode(keys))])
        except TransportError as exc:
            self._warn(f"{exc}; answering misses")
            return [() for _ in keys]
        return list(map(self._decode, reply.split(GS)))

    def is_pinned(self, keys: Sequence[BlockKey]) -> list[bool]:
        keys = check_keys(keys)
        self._check_open()
        if not keys:
            return []
        reply = self._call("is_pinned", "IS_PINNED", [_pack(_encode(keys))])
        return [flag == 49 for flag in reply]  # b'1'[0] == 49

    def victims(self, tier: str, count: int, node: str = "") -> list[BlockKey]:
        if not isinstance(tier, str) or not tier:
            raise InvalidArgument(f"victims: tier must be a non-empty tier name, got {tier!r}")
        if not isinstance(node, str):
            raise InvalidArgument(f"victims: node must be a string ('' = this node), got {node!r}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise InvalidArgument(f"victims: count must be an integer >= 0, got {count!r}")
        self._check_open()
        if count == 0:
            return []
        reply = self._call("victims", "VICTIMS", [self._field(tier, node), count])
        return [BlockKey.decode(enc) for enc in reply]

    def stats(self) -> IndexStats:
        """Cluster-wide counts (blocks of dead nodes count until they are reaped). All zero after
        close, like the local index, so a late metrics scrape does not fail."""
        if self._closed:
            return IndexStats(0, 0, 0)
        blocks, pinned, leases = self._call("stats", "STATS", ())
        return IndexStats(blocks=int(blocks), pinned=int(pinned), leases=int(leases))

    # -- leases -------------------------------------------------------------------------------
    def acquire(self, keys: Sequence[BlockKey], ttl_s: float, owner: str = "") -> Lease:
        keys = check_keys(keys)
        if (
            not isinstance(ttl_s, (int, float)) or isinstance(ttl_s, bool)
            or math.isnan(ttl_s) or math.isinf(ttl_s) or ttl_s <= 0
        ):
            raise InvalidArgument(f"acquire: ttl_s must be a finite number of seconds > 0, got {ttl_s!r}")
        if not isinstance(owner, str) or _has_control(owner):
            raise InvalidArgument(
                f"acquire: owner must be a string without control characters ('' = no owner), got {owner!r}"
            )
        self._check_open()
        # The local deadline is taken before the call, so it never outlives the server's.
        expires_at = time.monotonic() + ttl_s
        seq = next(self._seq)
        lease_id = f"{self._lease_prefix}-{seq}"
        argv = [max(1, math.ceil(ttl_s * 1000)), scripts.LEASE_GRACE_MS, lease_id, owner.encode(),
                _pack(_encode(keys))]
        offline = False
        try:
            reply = self._call("acquire", "ACQUIRE", argv)
            hits = reply.split(GS) if reply else []
        except TransportError as exc:
            self._warn(f"{exc}; answering a miss")
            hits, offline = [], True
        lease = Lease(
            lease_id=lease_id,
            keys=tuple(keys[: len(hits)]),
            locations=tuple(map(self._decode, hits)),
            expires_at=expires_at,
            owner=owner,
        )
        with self._lock:
            self._leases[lease_id] = _LocalLease(expires_at, owner, offline)
            self._by_owner.setdefault(owner, set()).add(lease_id)
            heapq.heappush(self._deadlines, (expires_at, seq, lease_id))
            if len(self._deadlines) > 2 * len(self._leases) + 1024:
                self._deadlines = [slot for slot in self._deadlines if slot[2] in self._leases]
                heapq.heapify(self._deadlines)
        return lease

    def release(self, lease_id: str) -> bool:
        if not isinstance(lease_id, str):
            raise InvalidArgument(f"release: lease_id must be the string from Lease.lease_id, got {lease_id!r}")
        self._check_open()
        with self._lock:
            record = self._forget(lease_id)
        if record is not None and record.offline:
            return record.expires_at > time.monotonic()
        released = self._write("release", "RELEASE", [1, lease_id])
        if released is None:  # Redis is down; the lease ends there at its deadline
            return record is not None and record.expires_at > time.monotonic()
        # Redis says whether the lease was still pinning (it forgets leases in a restart, and a
        # lease may be released by another daemon). A lease past its local deadline that
        # expire() has not swept yet is already over.
        return bool(released) and (record is None or record.expires_at > time.monotonic())

    def release_owner(self, owner: str) -> int:
        """Release this node's leases of ``owner`` (a client of this daemon that went away)."""
        if not isinstance(owner, str):
            raise InvalidArgument(f"release_owner: owner must be a string, got {owner!r}")
        self._check_open()
        with self._lock:
            local = list(self._by_owner.get(owner, ()))
            for lease_id in local:
                self._forget(lease_id)
        if _has_control(owner):
            return len(local)  # no such owner can exist in Redis (acquire refuses the name)
        try:
            in_redis = [lid.decode() for lid in self._call("release_owner", "RELEASE_OWNER", [owner.encode()])]
        except TransportError as exc:
            self._warn(f"{exc}; the leases end on the server when their ttl runs out")
            return len(local)
        return len(set(local) | set(in_redis))

    def expire(self, now: float | None = None) -> int:
        """Release this index's leases whose deadline is at or before ``now`` (default:
        ``time.monotonic()``). Leases of other daemons end on the server by their ttl."""
        if now is None:
            now = time.monotonic()
        elif not isinstance(now, (int, float)) or isinstance(now, bool) or math.isnan(now):
            raise InvalidArgument(f"expire: now must be a time.monotonic() value or None, got {now!r}")
        self._check_open()
        due: list[str] = []
        with self._lock:
            heap = self._deadlines
            while heap and heap[0][0] <= now:
                _, _, lease_id = heapq.heappop(heap)
                record = self._forget(lease_id)
                if record is not None:
                    due.append(lease_id)
        if due:
            self._write("expire", "RELEASE", [len(due), *due])
        return len(due)

    def close(self) -> None:
        """Leave the cluster: stop the heartbeat, release this index's leases, drop this node's
        membership (other daemons stop seeing its blocks at once) and delete its locations for up to
        a second (what is left is reaped by the other nodes). Idempotent; never raises for Redis."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            ids = list(self._leases)
            self._leases.clear()
            self._by_owner.clear()
            self._deadlines.clear()
        prefix, node = self._argv0
        try:
            if ids:
                self._scripts["RELEASE"](args=[prefix, node, len(ids), *ids])
            self._client.delete(prefix + b":n:" + node)
            deadline = time.monotonic() + _CLOSE_REAP_S
            while time.monotonic() < deadline:
                _, done = self._scripts["REAP"](args=[prefix, node, _REAP_BUDGET, node])
                if done:
                    break
        except self._redis_errors as exc:
            log.warning("redis index %s: leaving the cluster cleanly failed (%s); other nodes will reap node %r "
                        "after its heartbeat expires", self.url, exc, self.node)
        finally:
            with self._publish_lock:
                self._shadow.clear()
            self._client.close()

    # -- heartbeat and reconciliation -----------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.options.heartbeat):
            try:
                self._beat(force=False, raise_errors=False)
                self._reap_dead()
            except Exception:  # never let the thread die: the node would silently leave
                log.exception("redis index %s: heartbeat of node %r failed", self.url, self.node)

    def _beat(self, *, force: bool, raise_errors: bool) -> None:
        """Renew membership; when Redis had lost it (restart, or an outage longer than node_ttl) or
        writes failed since the last beat, republish this node's shadow."""
        argv: list[bytes | int | str] = [self._ttl_ms, b"1" if force else b"0", self._address]
        for name, descriptor in self._transports.items():
            argv += (name, descriptor)
        try:
            existed = self._call("heartbeat", "HEARTBEAT", argv)
        except TransportError as exc:
            self._resync_needed = True
            if raise_errors:
                raise
            self._warn(str(exc))
            return
        if not existed or self._resync_needed:
            self._resync()

    def _resync(self) -> None:
        """Make Redis list exactly the shadow for this node: remove what it lists that the shadow
        lacks, then re-insert the shadow in the order this node published it. Holds the publish lock throughout so
        no insert or remove interleaves with a half-done pass."""
        prefix, node = self._argv0
        with self._publish_lock:
            self._resync_needed = False
            try:
                stale = 0
                for tier in self._scripts["OWN_TIERS"](args=[prefix, node]):
                    where = bytes(tier) + US + node
                    listed = self._scripts["OWN_KEYS"](args=[prefix, node, tier])
                    gone = [enc for enc in listed if where not in self._shadow.get(enc, ())]
                    for start in range(0, len(gone), _REPUBLISH_CHUNK):
                        chunk = gone[start : start + _REPUBLISH_CHUNK]
                        self._scripts["REMOVE"](args=[prefix, node, tier, node, b"1", _pack(chunk)])
                    stale += len(gone)
                encs: list[bytes] = []
                records: list[bytes] = []
                for enc, locations in self._shadow.items():
                    for record in locations.values():
                        encs.append(enc)
                        records.append(record)
                for start in range(0, len(encs), _REPUBLISH_CHUNK):
                    chunk = slice(start, start + _REPUBLISH_CHUNK)
                    self._scripts["INSERT"](args=[prefix, node, _pack(encs[chunk]), GS.join(records[chunk])])
                published = len(encs)
            except self._redis_errors as exc:
                self._resync_needed = True
                self._warn(f"redis index {self.url}: republishing node {self.node!r} failed: {exc}; will retry")
                return
        if published or stale:
            log.warning("redis index %s: republished %d locations of node %r, removed %d stale ones",
                        self.url, published, self.node, stale)

    def _reap_dead(self) -> None:
        """Delete locations of dead nodes, a bounded batch at a time (lookups already hide them)."""
        prefix, node = self._argv0
        for _ in range(_REAP_CALLS_PER_BEAT):
            if self._stop.is_set():
                return
            try:
                cleaned, done = self._scripts["REAP"](args=[prefix, node, _REAP_BUDGET, b""])
            except self._redis_errors:
                return  # the heartbeat has already reported the outage
            if cleaned:
                log.info("redis index %s: reaped %d locations of dead nodes", self.url, cleaned)
            if done:
                return

    # -- internals ------------------------------------------------------------------------------
    def _call(self, what: str, script: str, argv: Sequence[Any]) -> Any:
        """Run one script; Redis failures become TransportError naming the URL and the node."""
        try:
            return self._scripts[script](args=[*self._argv0, *argv])
        except self._redis_errors as exc:
            raise TransportError(
                f"redis index {self.url} (node {self.node!r}): {what} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _write(self, what: str, script: str, argv: Sequence[Any]) -> Any:
        """Run a write the daemon can do without Redis: on failure, log, schedule a resync of this
        node's shadow and return None."""
        try:
            return self._call(what, script, argv)
        except TransportError as exc:
            self._resync_needed = True
            self._warn(f"{exc}; continuing alone, this node's blocks are republished when Redis is back")
            return None

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 5.0:  # an outage would otherwise log once per query
            self._last_warning = now
            log.warning("%s", message)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"RedisIndex for node {self.node!r} is closed; build a new index")

    def _forget(self, lease_id: str) -> _LocalLease | None:
        """Drop a local lease record (lock held); its heap slot goes stale and is skipped."""
        record = self._leases.pop(lease_id, None)
        if record is not None:
            owned = self._by_owner[record.owner]
            owned.discard(lease_id)
            if not owned:
                del self._by_owner[record.owner]
        return record

    def _node_id(self, node: str) -> bytes:
        """'' means this node; any other node id is stored as given."""
        return self._self_node if node == "" else _encode_name(node, "node")

    def _field(self, tier: str, node: str) -> bytes:
        return _encode_name(tier, "tier") + US + self._node_id(node)

    def _decode(self, packed: bytes) -> tuple[Location, ...]:
        """One key's locations from its packed records (b'' = a miss); this node's id reads back
        as ''. Cached by the packed bytes: a block's records repeat in every call that finds it,
        and building a Location costs more than the rest of decoding together."""
        if not packed:
            return ()
        cached = self._decoded.get(packed)
        if cached is not None:
            return cached
        out = []
        for record in packed.split(RS):
            # tier, node, nbytes, checksum, offset (a record written before offsets has four)
            tier, node, nbytes, checksum, *offset = record.split(US)
            out.append(Location(tier.decode(), "" if node == self._self_node else node.decode(), int(nbytes),
                                int(checksum) if checksum else None, int(offset[0]) if offset and offset[0] else -1))
        locations = tuple(out)
        if len(self._decoded) >= _DECODE_CACHE:
            self._decoded.clear()  # crude, but bounded and lock-free (dict operations are atomic)
        self._decoded[packed] = locations
        return locations


def _encode(keys: Sequence[BlockKey]) -> list[bytes]:
    """``[key.encode() for key in keys]``, with the namespace and shard part built once per batch
    (a request's keys share them) instead of once per key. test_options checks it agrees."""
    heads: dict[tuple[str, int], bytes] = {}
    out = []
    for namespace, block_hash, shard in keys:
        head = heads.get((namespace, shard))
        if head is None:
            ns = namespace.encode()
            head = heads[(namespace, shard)] = len(ns).to_bytes(2, "little") + ns + shard.to_bytes(4, "little")
        out.append(head + block_hash)
    return out


def _pack(encs: list[bytes]) -> bytes:
    """Encoded keys as one argument (``read_keys`` in scripts.py): a 4-byte little-endian width and
    the keys back to back when all have that width, else width 0 and each key after its length."""
    if not encs:
        return b""
    widths = set(map(len, encs))
    if len(widths) == 1:
        return widths.pop().to_bytes(4, "little") + b"".join(encs)
    return b"\0\0\0\0" + b"".join([part for enc in encs for part in (len(enc).to_bytes(4, "little"), enc)])


def _value(location: Location) -> bytes:
    checksum = b"" if location.checksum is None else str(location.checksum).encode()
    offset = b"" if location.offset < 0 else str(location.offset).encode()
    return str(location.nbytes).encode() + US + checksum + US + offset


def _has_control(name: str) -> bool:
    """Control characters would collide with the separators of the packed records."""
    return any(ord(ch) < 0x20 for ch in name)


def _encode_name(name: str, what: str) -> bytes:
    if _has_control(name):
        raise InvalidArgument(f"{what} names must not contain control characters, got {name!r}")
    return name.encode()


def _safe_url(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


