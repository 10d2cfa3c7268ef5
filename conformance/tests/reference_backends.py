"""Small, correct in-memory backends the contracts are checked against (and broken on purpose)."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from pegaflow_core.buffers import byte_view
from pegaflow_core.errors import ClosedError, InvalidArgument, TransportError
from pegaflow_core.index import Index, IndexStats, Lease, Location
from pegaflow_core.keys import BlockKey
from pegaflow_core.tier import Tier, TierCapabilities, TierUsage
from pegaflow_core.transport import Region, Transport


def check_keys(keys: Sequence[object]) -> None:
    for i, key in enumerate(keys):
        if not isinstance(key, BlockKey):
            raise InvalidArgument(f"keys[{i}]: expected a BlockKey, got {type(key).__name__}")


def check_lengths(keys: Sequence[object], other: Sequence[object], what: str) -> None:
    if len(keys) != len(other):
        raise InvalidArgument(f"{len(keys)} keys but {len(other)} {what}: lengths must match")


# -- Tier -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DictTierOptions:
    capacity: int
    store: str = ""  # name of a shared store, so a reopened tier sees the same blocks


class DictTier(Tier):
    kind = "ref-dict"
    Options = DictTierOptions
    capabilities = TierCapabilities(host_views=True)
    _stores: dict[str, dict[BlockKey, bytes]] = {}

    @classmethod
    def conformance_options(cls, tmp_path, capacity_bytes=None):
        return DictTierOptions(capacity_bytes or 1 << 20)

    def __init__(self, options: DictTierOptions) -> None:
        self.capacity = options.capacity
        self._blocks: dict[BlockKey, bytes | bytearray] = self._stores.setdefault(options.store, {}) if options.store else {}
        self._reserved: dict[BlockKey, bytearray] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _used(self) -> int:
        return sum(map(len, self._blocks.values())) + sum(map(len, self._reserved.values()))

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"tier {self.kind!r} is closed")

    def put(self, keys, blocks):
        check_lengths(keys, blocks, "blocks")
        check_keys(keys)
        views = [byte_view(b, what=f"blocks[{i}]") for i, b in enumerate(blocks)]
        with self._lock:
            self._check_open()
            used, out = self._used(), []
            for key, view in zip(keys, views):
                if key in self._blocks:
                    out.append(True)
                elif used + view.nbytes <= self.capacity:
                    self._blocks[key] = bytes(view)
                    used += view.nbytes
                    out.append(True)
                else:
                    out.append(False)
            return out

    def get_into(self, keys, dests):
        check_lengths(keys, dests, "destinations")
        check_keys(keys)
        views = [byte_view(d, writable=True, what=f"dests[{i}]") for i, d in enumerate(dests)]
        with self._lock:
            self._check_open()
            found = [self._blocks.get(k) for k in keys]
            for i, (block, view) in enumerate(zip(found, views)):
                if block is not None and len(block) != view.nbytes:
                    raise InvalidArgument(f"dests[{i}]: block has {len(block)} bytes, destination has {view.nbytes}")
            for block, view in zip(found, views):
                if block is not None:
                    view[:] = block
            return [b is not None for b in found]

    def contains(self, keys):
        check_keys(keys)
        with self._lock:
            self._check_open()
            return [k in self._blocks for k in keys]

    def evict(self, keys):
        check_keys(keys)
        with self._lock:
            self._check_open()
            return sum(self._blocks.pop(k, None) is not None for k in keys)

    def usage(self):
        with self._lock:
            self._check_open()
            return TierUsage(self.capacity, self._used(), len(self._blocks))

    def close(self):
        self._closed = True

    def reserve(self, keys, nbytes):
        check_keys(keys)
        with self._lock:
            self._check_open()
            used, out = self._used(), []
            for key in keys:
                if used + nbytes <= self.capacity and key not in self._reserved:
                    self._reserved[key] = bytearray(nbytes)
                    used += nbytes
                    out.append(memoryview(self._reserved[key]))
                else:
                    out.append(None)
            return out

    def commit(self, keys, checksums=None):
        check_keys(keys)
        with self._lock:
            self._check_open()
            for key in keys:
                self._blocks[key] = bytes(self._reserved.pop(key))

    def abort(self, keys):
        check_keys(keys)
        with self._lock:
            self._check_open()
            for key in keys:
                self._reserved.pop(key, None)

    def view(self, keys):
        check_keys(keys)
        with self._lock:
            self._check_open()
            return [None if (b := self._blocks.get(k)) is None else memoryview(b).toreadonly() for k in keys]


class PersistentDictTier(DictTier):
    kind = "ref-persistent"
    capabilities = TierCapabilities(persistent=True)

    @classmethod
    def conformance_options(cls, tmp_path, capacity_bytes=None):
        return DictTierOptions(capacity_bytes or 1 << 20, store=str(tmp_path))


class NeedsHelpTier(DictTier):
    """Cannot be built by the generic runner (``conformance_options`` keeps the default None)."""

    kind = "ref-needs-help"

    @classmethod
    def conformance_options(cls, tmp_path, capacity_bytes=None):
        return None


# -- Index ----------------------------------------------------------------------------------
class DictIndex(Index):
    kind = "ref-index"

    @classmethod
    def conformance_options(cls, tmp_path, capacity_bytes=None):
        return "no options"

    def __init__(self, options: object = None) -> None:
        self._locs: OrderedDict[BlockKey, dict[tuple[str, str], Location]] = OrderedDict()
        self._leases: dict[str, Lease] = {}
        self._pins: dict[BlockKey, int] = {}
        self._lock = threading.Lock()

    def insert(self, entries):
        for i, entry in enumerate(entries):
            if not isinstance(entry, tuple) or len(entry) != 2:
                raise InvalidArgument(f"entries[{i}]: expected (BlockKey, Location)")
            check_keys([entry[0]])
            if not isinstance(entry[1], Location):
                raise InvalidArgument(f"entries[{i}]: expected a Location, got {type(entry[1]).__name__}")
        with self._lock:
            for key, loc in entries:
                self._locs.setdefault(key, {})[(loc.tier, loc.node)] = loc
                self._locs.move_to_end(key)

    def lookup(self, keys):
        check_keys(keys)
        with self._lock:
            return [tuple(self._locs.get(k, {}).values()) for k in keys]

    def acquire(self, keys, ttl_s, owner=""):
        check_keys(keys)
        if not isinstance(ttl_s, (int, float)) or ttl_s <= 0:
            raise InvalidArgument(f"ttl_s: expected a positive number of seconds, got {ttl_s!r}")
        with self._lock:
            hits = []
            for key in keys:
                if not self._locs.get(key):
                    break
                hits.append(key)
                self._locs.move_to_end(key)
                self._pins[key] = self._pins.get(key, 0) + 1
            lease = Lease(uuid.uuid4().hex, tuple(hits), tuple(tuple(self._locs[k].values()) for k in hits), time.monotonic() + ttl_s, owner)
            self._leases[lease.lease_id] = lease
            return lease

    def _drop(self, lease: Lease) -> None:
        del self._leases[lease.lease_id]
        for key in lease.keys:
            self._pins[key] -= 1
            if not self._pins[key]:
                del self._pins[key]

    def release(self, lease_id):
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                return False
            self._drop(lease)
            return True

    def release_owner(self, owner):
        with self._lock:
            mine = [lease for lease in self._leases.values() if lease.owner == owner]
            for lease in mine:
                self._drop(lease)
            return len(mine)

    def expire(self, now=None):
        now = time.monotonic() if now is None else now
        with self._lock:
            old = [lease for lease in self._leases.values() if lease.expires_at <= now]
            for lease in old:
                self._drop(lease)
            return len(old)

    def remove(self, keys, tier=None, node=None):
        check_keys(keys)
        lost = 0
        with self._lock:
            for key in dict.fromkeys(keys):
                locs = self._locs.get(key)
                if not locs:
                    continue
                gone = [tn for tn in locs if (tier is None or tn[0] == tier) and (node is None or tn[1] == node)]
                for tn in gone:
                    del locs[tn]
                lost += bool(gone)
                if not locs:
                    del self._locs[key]
        return lost

    def victims(self, tier, count, node=""):
        with self._lock:
            out = []
            for key, locs in self._locs.items():
                if len(out) >= count:
                    break
                if (tier, node) in locs and key not in self._pins:
                    out.append(key)
            return out

    def is_pinned(self, keys):
        check_keys(keys)
        with self._lock:
            return [k in self._pins for k in keys]

    def stats(self):
        with self._lock:
            return IndexStats(len(self._locs), len(self._pins), len(self._leases))


# -- Transport ------------------------------------------------------------------------------
_endpoints: dict[str, InProcessTransport] = {}
_counter = itertools.count(1)


class InProcessTransport(Transport):
    """Endpoints find each other through a process-wide dict keyed by address."""

    kind = "ref-inproc"

    @classmethod
    def conformance_options(cls, tmp_path, capacity_bytes=None):
        return "no options"

    def __init__(self, options: object = None) -> None:
        self._address = f"inproc://{next(_counter)}"
        self._regions: dict[int, memoryview] = {}
        self._lock = threading.Lock()
        _endpoints[self._address] = self

    @property
    def address(self):
        return self._address

    def register(self, buffer):
        view = byte_view(buffer, writable=True, what="buffer")
        region_id = next(_counter)
        with self._lock:
            self._regions[region_id] = view
        return Region(region_id, view.nbytes, region_id.to_bytes(8, "little"))

    def deregister(self, region):
        with self._lock:
            self._regions.pop(region.region_id, None)

    def _peer(self, address: str) -> InProcessTransport:
        peer = _endpoints.get(address)
        if peer is None:
            raise TransportError(f"no endpoint at {address}")
        return peer

    def connect(self, address, timeout_s=5.0):
        self._peer(address)

    def _transfer(self, ops, write: bool) -> Future:
        future: Future = Future()
        try:
            plan = []
            for i, op in enumerate(ops):
                local = self._regions.get(op.local.region_id)
                if local is None:
                    raise InvalidArgument(f"ops[{i}].local: region is not registered")
                peer = self._peer(op.remote.address)
                remote = peer._regions.get(int.from_bytes(op.remote.descriptor, "little"))
                if remote is None:
                    raise TransportError(f"ops[{i}].remote: region is not registered at {op.remote.address}")
                for where, view, off in (("local", local, op.local_offset), ("remote", remote, op.remote_offset)):
                    if off < 0 or op.length < 0 or off + op.length > view.nbytes:
                        raise InvalidArgument(f"ops[{i}]: {where} range {off}+{op.length} is out of bounds of a {view.nbytes}-byte region")
                plan.append((local, op.local_offset, remote, op.remote_offset, op.length))
            for local, lo, remote, ro, n in plan:
                if write:
                    remote[ro : ro + n] = local[lo : lo + n]
                else:
                    local[lo : lo + n] = remote[ro : ro + n]
            future.set_result(None)
        except (InvalidArgument, TransportError) as exc:
            future.set_exception(exc)
        return future

    def read(self, ops, timeout_s=30.0):
        return self._transfer(ops, write=False)

    def write(self, ops, timeout_s=30.0):
        return self._transfer(ops, write=True)

    def close(self):
        _endpoints.pop(self._address, None)
        self._regions.clear()
