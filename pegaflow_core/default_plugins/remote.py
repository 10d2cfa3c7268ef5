"""Built-in plugin: the ``remote`` tier — other nodes' DRAM pools, as a tier below this node's.

A local miss that the cluster index places on another node is fetched from that node's pool over
the configured transport, straight into the slot this node's top tier reserved for it:

1. ``index.lookup`` says which node holds each block; ``index.nodes()`` says where that node's
   daemon and its registered pool are (published by the owner at start);
2. the owner's ``Pin`` RPC pins the blocks for the transfer and answers their pool offsets and
   checksums (taken from the bytes at that moment);
3. one batched ``transport.read`` per owner moves the bytes, the same single read the bare
   transport would make; each block is checked against the owner's checksum as soon as it has
   arrived, while the later ones still move, so a flipped bit or a block the owner lost
   meanwhile is a miss, never served. When the owner published the blocks' offsets with their
   locations (``Location.offset``), the read starts right after the lookup, with the Pin sent
   alongside it: blocks that land before its answer wait for it, and a block is served only if
   the Pin places it where it was read from and its bytes match the Pin's checksum, so a slot
   the owner reused meanwhile is a miss too. Without verification the Pin stays first;
4. ``Release`` ends the pin, without waiting for the answer (the pin also expires by itself).

The tier stores nothing itself: ``put`` answers ``False`` (blocks are published where they are
saved, not pushed to peers) and it holds no capacity.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, ClassVar

import grpc
import numpy as np

from pegaflow_core._proto import pegaflow_pb2 as pb
from pegaflow_core._proto import pegaflow_pb2_grpc as pb_grpc
from pegaflow_core.buffers import Buffer, byte_view
from pegaflow_core.checksum import algorithm_name, checksum_for
from pegaflow_core.copier import buffer_address, buffer_addresses
from pegaflow_core.deferred import Deferred
from pegaflow_core.errors import ClosedError, InvalidArgument, PegaflowError, TransportError
from pegaflow_core.hookspecs import Register, hookimpl
from pegaflow_core.index import Location
from pegaflow_core.keys import BlockKey, check_keys
from pegaflow_core.sizes import Duration
from pegaflow_core.tier import MemoryKind, StackContext, Tier, TierCapabilities, TierUsage
from pegaflow_core.transport import RemoteRegion, TransferOp

log = logging.getLogger("pegaflow.remote")

TIMEOUT_BYTES = 8 << 20  # a fetch's read may take ``timeout`` per this many bytes
NODES_TTL_S = 10.0  # how long fetches reuse the cluster's list of nodes (addresses, pool descriptors)
HANDOVER_BLOCKS = 32  # fetched blocks handed to the caller at a time while the rest of the read moves
RELEASE_DELAY_S = 0.005  # a fetch's pin is released this long after the fetch: after its answer


@dataclass(frozen=True)
class RemoteOptions:
    timeout: Duration = field(default=Duration(5.0), metadata={
        "help": "how long one peer may take to answer a pin, and to send each 8 MiB of a fetch"})
    lease_ttl: Duration = field(default=Duration(30.0), metadata={"help": "how long a peer keeps blocks pinned for us at most"})
    verify: bool = field(default=True, metadata={
        "help": "check each fetched block against the checksum its owner sealed (false: trust the transport's "
                "own integrity checks; a failed or cut transfer is still a miss either way)"})


class _Landing:
    """What one fetch has landed: ``results[i]`` turns True once block i is in place and checked,
    and ``sums[i]`` gets the checksum it passed when it is one of this node's algorithm (the top
    tier then seals the block with it instead of hashing it again). Such blocks are passed to the
    caller's ``deliver`` (with ``sums``) HANDOVER_BLOCKS at a time while the rest of the read moves, so that their
    commits overlap the transfer; the last partial batch is not passed, the caller takes it from
    ``results``. Both the transport's thread and the fetching one accept blocks."""

    def __init__(self, count: int, deliver: Callable[[list[int], list[int | None]], None] | None) -> None:
        self.results = [False] * count
        self.sums: list[int | None] = [None] * count
        self._deliver = deliver
        self._lock = threading.Lock()
        self._ready: list[int] = []

    def accept(self, i: int, checksum: int | None) -> None:
        self.sums[i] = checksum
        self.results[i] = True
        if self._deliver is None:
            return
        with self._lock:
            self._ready.append(i)
            if len(self._ready) < HANDOVER_BLOCKS:
                return
            batch, self._ready = self._ready, []
        self._deliver(batch, self.sums)


class RemoteTier(Tier):
    kind: ClassVar[str] = "remote"
    Options: ClassVar[type] = RemoteOptions
    capabilities: ClassVar[TierCapabilities] = TierCapabilities(memory=frozenset({MemoryKind.HOST}))

    def __init__(self, options: RemoteOptions | None = None) -> None:
        self.options = options or RemoteOptions()
        self.integrity_failures = 0
        self._context: StackContext | None = None
        self._stubs: dict[str, tuple[grpc.Channel, pb_grpc.PegaflowStub]] = {}
        self._nodes_cache: tuple[float, dict[str, Any]] | None = None  # (expires at, nodes)
        self._releasing: set[grpc.Future] = set()  # Release calls not answered yet
        # pins to end once their fetch is over and its blocks are served (deferred.py)
        self._to_release: Deferred[tuple[pb_grpc.PegaflowStub, str]] = Deferred(
            "pegaflow-remote-release", self._send_releases, RELEASE_DELAY_S)
        self._unverifiable: set[tuple[str, str]] = set()  # (owner, algorithm) said already
        self._lock = threading.Lock()
        self._closed = False

    def attach(self, context: StackContext) -> None:
        if context.transport is None or context.pool_region is None:
            raise PegaflowError("tier 'remote' needs a transport: add e.g. `transport: {kind: loopback}` to the config")
        self._context = context

    # -- Tier ---------------------------------------------------------------------------------
    def put(self, keys: Sequence[BlockKey], blocks: Sequence[Buffer]) -> list[bool]:
        self._check_open()
        return [False] * len(check_keys(keys))

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        self._check_open()
        return [bool(self._elsewhere(locs)) for locs in self._ctx().index.lookup(check_keys(keys))]

    def evict(self, keys: Sequence[BlockKey]) -> int:
        self._check_open()
        check_keys(keys)
        return 0

    def usage(self) -> TierUsage:
        self._check_open()
        return TierUsage(0, 0, 0)

    def get_into(self, keys: Sequence[BlockKey], dests: Sequence[Buffer]) -> list[bool]:
        return self._get_into(keys, dests, None, None)

    def get_into_located(self, keys: Sequence[BlockKey], dests: Sequence[Buffer],
                         locations: Sequence[Sequence[Any]],
                         verified: list[int | None] | None = None,
                         delivered: Callable[[list[int]], None] | None = None) -> list[bool]:
        """``get_into`` with the owners the Query's lease found: no second cluster lookup. A
        location that went stale since is a miss, as it would be after a lookup (the owner's Pin
        says it no longer holds the block). ``verified`` gets the owner's checksum of each block
        checked against it in this node's algorithm; ``delivered`` gets the blocks in place and
        checked, HANDOVER_BLOCKS at a time, while the read goes on (``Tier.get_into_located``)."""
        if len(locations) != len(keys):
            raise InvalidArgument(f"locations: expected one entry per key ({len(keys)}), got {len(locations)}")
        if verified is not None and len(verified) != len(keys):
            raise InvalidArgument(f"verified: expected one entry per key ({len(keys)}), got {len(verified)}")
        return self._get_into(keys, dests, locations, verified, delivered)

    def _get_into(self, keys: Sequence[BlockKey], dests: Sequence[Buffer], locations: Sequence[Sequence[Any]] | None,
                  verified: list[int | None] | None, delivered: Callable[[list[int]], None] | None = None) -> list[bool]:
        self._check_open()
        keys = check_keys(keys)
        if len(keys) != len(dests):
            raise InvalidArgument(f"dests: expected one buffer per key ({len(keys)}), got {len(dests)}")
        targets = [byte_view(d, writable=True, what=f"dests[{i}]") for i, d in enumerate(dests)]
        addresses = buffer_addresses(dests)  # a tier's slots (PoolViews) know theirs: no lookup per block
        context = self._ctx()
        by_owner: dict[str, list[int]] = {}
        copies: list[Location | None] = [None] * len(keys)  # the owner's copy of each block, as it published it
        for i, locs in enumerate(context.index.lookup(keys) if locations is None else locations):
            elsewhere = self._elsewhere(locs)
            if elsewhere:
                by_owner.setdefault(elsewhere[0].node, []).append(i)
                copies[i] = elsewhere[0]
        results = [False] * len(keys)
        if not by_owner:
            return results
        nodes = self._nodes(by_owner)
        for owner, positions in by_owner.items():
            info = nodes.get(owner)
            if info is None:
                log.info("remote: node %s holds %d blocks but is not live; they are misses", owner, len(positions))
                continue

            def landed(batch: list[int], sums: list[int | None], positions: list[int] = positions) -> None:
                at = [positions[n] for n in batch]
                if verified is not None:
                    for n, i in zip(batch, at):
                        verified[i] = sums[n]
                delivered(at)

            landing = _Landing(len(positions), landed if delivered else None)
            try:
                self._fetch(info, [keys[i] for i in positions], [targets[i] for i in positions], addresses[positions],
                            [copies[i] for i in positions], landing)
            except (PegaflowError, grpc.RpcError) as exc:
                # What landed whole and passed its checks before the failure is kept; the rest are misses.
                self._forget_nodes()  # the owner may have restarted elsewhere: ask the index again
                log.warning("remote: fetching %d blocks from %s failed (%s); the %d not in place are misses",
                            len(positions), owner, exc, landing.results.count(False))
            for n, i in enumerate(positions):
                results[i] = landing.results[n]
                if verified is not None and landing.results[n]:
                    verified[i] = landing.sums[n]
        return results

    def close(self) -> None:
        self._to_release.close()  # sends what is queued, while the channels are still open
        with self._lock:
            self._closed = True
            stubs, self._stubs = self._stubs, {}
        for channel, _ in stubs.values():
            channel.close()

    def probe(self, node: str, keys: Sequence[BlockKey], dests: Sequence[Buffer]) -> tuple[int, float]:
        """The bare transport on the same path as a fetch, for ``pegaflow bench remote``'s
        baseline: pin ``keys`` on ``node`` and move their bytes into ``dests`` (scratch slots of
        this node's pool) with one ``transport.read``, no pipelining, no verification. Returns
        (bytes moved, seconds the read took)."""
        self._check_open()
        keys = check_keys(keys)
        if len(keys) != len(dests):
            raise InvalidArgument(f"dests: expected one buffer per key ({len(keys)}), got {len(dests)}")
        context = self._ctx()
        info = self._nodes().get(node)
        if info is None or node == context.node:
            raise InvalidArgument(f"probe: node {node!r} is not another live node of the cluster")
        targets = [byte_view(d, writable=True, what=f"dests[{i}]") for i, d in enumerate(dests)]
        with self._pinned(info, keys) as (remote, pinned):
            ops, _ = self._plan(context, remote, pinned.offsets, pinned.nbytes, targets, buffer_addresses(dests))
            if len(ops) != len(keys):
                raise PegaflowError(f"probe: node {node!r} holds {len(ops)} of the {len(keys)} blocks")
            started = time.perf_counter()
            context.transport.read(ops, timeout_s=self.options.timeout).result(timeout=self.options.timeout + 1)
            return sum(op.length for op in ops), time.perf_counter() - started

    # -- internals ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _pinned(self, info: object, keys: list[BlockKey]) -> Iterator[tuple[RemoteRegion, pb.PinResponse]]:
        """Pin ``keys`` on their owner for the duration of the block (the pin also expires by
        itself if this node dies first)."""
        remote = self._remote_region(info)
        stub = self._stub(info.address)
        pinned = stub.Pin(self._pin_request(keys), timeout=self.options.timeout)
        try:
            yield remote, pinned
        finally:
            self._release(stub, pinned.lease_id)

    def _remote_region(self, info: object) -> RemoteRegion:
        kind = self._transport_kind(info)
        return RemoteRegion(info.transports[f"{kind}.address"].decode(), info.transports[f"{kind}.pool"])

    def _pin_request(self, keys: list[BlockKey]) -> pb.PinRequest:
        return pb.PinRequest(blocks=[pb.BlockRef(namespace=k.namespace, block_hash=k.block_hash, shard=k.shard) for k in keys],
                             lease_ttl_s=self.options.lease_ttl, requester=self._ctx().node)

    def _release(self, stub: pb_grpc.PegaflowStub, lease_id: str) -> None:
        """End a pin RELEASE_DELAY_S from now (deferred.py): sending the Release takes ~0.7 ms of
        Python, which on the fetch's path delayed its answer by as much. A Release that is lost
        only leaves the pin to expire by itself."""
        self._to_release.put((stub, lease_id))

    def _send_releases(self, pins: list[tuple[pb_grpc.PegaflowStub, str]]) -> None:
        """One Release per owner for the pins queued together, without waiting for the answers:
        nothing here depends on them. Each call is kept until it is answered (a gRPC future that
        is dropped cancels its call)."""
        by_owner: dict[int, tuple[pb_grpc.PegaflowStub, list[str]]] = {}
        for stub, lease_id in pins:
            by_owner.setdefault(id(stub), (stub, []))[1].append(lease_id)
        for stub, lease_ids in by_owner.values():
            try:
                call = stub.Release.future(pb.ReleaseRequest(lease_ids=lease_ids), timeout=self.options.timeout)
            except ValueError:  # the tier was closed meanwhile (its channels with it)
                return
            with self._lock:
                self._releasing.add(call)
            call.add_done_callback(self._released)

    def _released(self, call: grpc.Future) -> None:
        with self._lock:
            self._releasing.discard(call)

    def _plan(self, context: StackContext, remote: RemoteRegion, offsets: Sequence[int], sizes: Sequence[int],
              targets: list[memoryview], addresses: np.ndarray) -> tuple[list[TransferOp], list[int]]:
        """One read op per block the owner holds (``offsets``: where in its pool, -1 if not) at
        the size we expect, into a slot of our pool (``addresses``: each target's first byte);
        and the position of each op's block."""
        pool = context.top.buffer()
        base = buffer_address(pool)
        end = base + len(pool)
        ops, wanted = [], []
        for i, (target, address_of, offset, nbytes) in enumerate(
                zip(targets, addresses.tolist(), offsets, sizes)):
            if offset < 0 or nbytes != len(target) or not base <= address_of < end:
                continue  # not on that node any more, another size, or not a slot of our pool
            ops.append(TransferOp(context.pool_region, address_of - base, remote, offset, nbytes))
            wanted.append(i)
        return ops, wanted

    def _fetch(self, info: object, keys: list[BlockKey], targets: list[memoryview], addresses: np.ndarray,
               copies: Sequence[Location | None], landing: _Landing) -> None:
        """Move ``keys`` from their owner into ``targets``: reading at once from where the owner
        published them (``copies``), when it did for all and the bytes are verified, else after
        its Pin's answer; each block in place and checked is accepted into ``landing``. Raises when
        the read or the Pin fails: the blocks accepted by then landed whole and stay good."""
        if self.options.verify and all(c is not None and c.offset >= 0 for c in copies):
            self._fetch_published(info, keys, targets, addresses, copies, landing)
        else:
            self._fetch_pinned(info, keys, targets, addresses, landing)

    def _fetch_pinned(self, info: object, keys: list[BlockKey], targets: list[memoryview], addresses: np.ndarray,
                      landing: _Landing) -> None:
        """``_fetch`` after the Pin: pin ``keys`` on their owner and move them into ``targets``
        with one transport read (the per-read cost is paid once, as by the bare transport). Each
        block is verified where and when the transport reports it in place: on the receiving
        thread, while the block is still in the CPU's cache and the next ones queue up in the
        socket (natively, without the GIL)."""
        context = self._ctx()
        with self._pinned(info, keys) as (remote, pinned):
            digest = checksum_for(pinned.checksum_algorithm)
            if self.options.verify and digest is None:
                self._cannot_verify(info.node_id, pinned.checksum_algorithm)
                return
            ops, wanted = self._plan(context, remote, pinned.offsets, pinned.nbytes, targets, addresses)
            if not ops:
                return
            timeout = self._read_timeout(ops)
            ours = pinned.checksum_algorithm == algorithm_name()

            def check(j: int) -> None:
                i = wanted[j]
                if not self.options.verify:
                    landing.accept(i, None)
                elif self._verified(keys[i], targets[i], pinned.checksums[i], info.node_id, digest):
                    landing.accept(i, pinned.checksums[i] if ours else None)

            self._await(context.transport.read_reporting(ops, check, timeout_s=timeout), timeout)

    def _fetch_published(self, info: object, keys: list[BlockKey], targets: list[memoryview], addresses: np.ndarray,
                         copies: Sequence[Location], landing: _Landing) -> None:
        """``_fetch`` from the offsets the owner published: the read starts now and the Pin
        travels alongside it, so its round trip (~2.8 ms on the 2-core VM, docs/benchmarks.md)
        is off the fetch's path. Blocks that land before the Pin's answer wait for it; then a
        block is served only if the Pin places it where it was read from, at the size read, and
        its bytes match the Pin's checksum (the owner may have reused the slot before the pin)."""
        context = self._ctx()
        ops, wanted = self._plan(context, self._remote_region(info), [c.offset for c in copies],
                                 [c.nbytes for c in copies], targets, addresses)
        if not ops:
            return
        timeout = self._read_timeout(ops)
        lock = threading.Lock()
        answer: list[tuple[pb.PinResponse, Callable[[Buffer], int] | None, bool]] = []
        early: list[int] = []  # blocks landed before the Pin's answer

        def judge(j: int, pinned: pb.PinResponse, digest: Callable[[Buffer], int] | None, ours: bool) -> None:
            i = wanted[j]
            if digest is None or pinned.offsets[i] != copies[i].offset or pinned.nbytes[i] != len(targets[i]):
                return  # unverifiable, or not where it was read from any more: a miss
            if self._verified(keys[i], targets[i], pinned.checksums[i], info.node_id, digest):
                landing.accept(i, pinned.checksums[i] if ours else None)

        def check(j: int) -> None:
            with lock:
                if not answer:
                    early.append(j)
                    return
            judge(j, *answer[0])

        transfer = context.transport.read_reporting(ops, check, timeout_s=timeout)
        pinned = None
        try:
            # Sent once the read is under way: building it (a BlockRef per block) and the send
            # would otherwise delay the read's first request.
            stub = self._stub(info.address)
            pinned = stub.Pin(self._pin_request(keys), timeout=self.options.timeout)
            digest = checksum_for(pinned.checksum_algorithm)
            if digest is None:
                self._cannot_verify(info.node_id, pinned.checksum_algorithm)
            ours = pinned.checksum_algorithm == algorithm_name()
            with lock:
                answer.append((pinned, digest, ours))
                landed, early[:] = early[:], []
            for j in landed:  # verified here while the transport's thread verifies the later ones
                judge(j, pinned, digest, ours)
        finally:
            try:
                self._await(transfer, timeout)
            finally:
                if pinned is not None:
                    self._release(stub, pinned.lease_id)

    @staticmethod
    def _await(transfer: Future[None], timeout: float) -> None:
        """Wait for a read, raising if it failed. Also when the caller is failing already: a read
        still in flight writes into slots the caller frees when it fails, so it is waited for (it
        ends by its own timeout) before they are handed back."""
        try:
            transfer.result(timeout=timeout + 1)
        finally:
            with contextlib.suppress(Exception):
                transfer.result(timeout=timeout + 1)

    def _read_timeout(self, ops: list[TransferOp]) -> float:
        """``timeout`` per started TIMEOUT_BYTES of the read: a large fetch is not cut short."""
        return self.options.timeout * max(1, math.ceil(sum(op.length for op in ops) / TIMEOUT_BYTES))

    def _verified(self, key: BlockKey, target: memoryview, expected: int, owner: str,
                  digest: Callable[[Buffer], int]) -> bool:
        if digest(target) == expected:
            return True
        with self._lock:
            self.integrity_failures += 1
        log.error("remote: block %r from %s failed its checksum; treated as a miss", key, owner)
        return False

    def _cannot_verify(self, owner: str, algorithm: str) -> None:
        """An owner whose checksums this node cannot compute (another pegaflow version): its blocks
        are misses, said once per owner and algorithm rather than once per block."""
        with self._lock:
            first = (owner, algorithm) not in self._unverifiable
            self._unverifiable.add((owner, algorithm))
        if first:
            log.error("remote: node %s checksums its blocks with %r, which this node (%r) cannot compute: its "
                      "blocks are misses; run one pegaflow version on every node, or set `verify: false` on "
                      "the remote tier", owner, algorithm or "an unnamed algorithm", algorithm_name())

    def _nodes(self, wanted: Iterable[str] = ()) -> dict[str, Any]:
        """The cluster's live nodes, read from the index at most every ``NODES_TTL_S`` unless one
        of the ``wanted`` owners is not among them (it joined since): a fetch needs only their
        addresses, which change when a node restarts, and a fetch that fails forgets them
        (``_forget_nodes``). An empty answer (the index is down) is not kept."""
        now = time.monotonic()
        with self._lock:
            cached = self._nodes_cache
        if cached is not None and now < cached[0] and all(node in cached[1] for node in wanted):
            return cached[1]
        nodes = self._ctx().index.nodes()
        if nodes:
            with self._lock:
                self._nodes_cache = (now + NODES_TTL_S, nodes)
        return nodes

    def _forget_nodes(self) -> None:
        with self._lock:
            self._nodes_cache = None

    def _elsewhere(self, locations: Sequence[Location]) -> list[Location]:
        """The block's copies on other nodes."""
        node = self._ctx().node
        return [loc for loc in locations if loc.node not in ("", node)]

    def _transport_kind(self, info: object) -> str:
        for name in info.transports:
            if name.endswith(".address"):
                return name.removesuffix(".address")
        raise TransportError(f"node {info.node_id} published no transport address")

    def _stub(self, address: str) -> pb_grpc.PegaflowStub:
        with self._lock:
            if address not in self._stubs:
                channel = grpc.insecure_channel(address)
                self._stubs[address] = (channel, pb_grpc.PegaflowStub(channel))
            return self._stubs[address][1]

    def _ctx(self) -> StackContext:
        if self._context is None:
            raise PegaflowError("tier 'remote' is used before the daemon attached it to a transport and an index")
        return self._context

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("remote tier is closed")


@hookimpl
def register_tiers(register: Register) -> None:
    register(RemoteTier)
