"""Built-in plugin: the ``remote`` tier — other nodes' DRAM pools, as a tier below this node's.

A local miss that the cluster index places on another node is fetched from that node's pool over
the configured transport, straight into the slot this node's top tier reserved for it:

1. ``index.lookup`` says which node holds each block; ``index.nodes()`` says where that node's
   daemon and its registered pool are (published by the owner at start);
2. the owner's ``Pin`` RPC pins the blocks for the transfer and answers their pool offsets and
   checksums (taken from the bytes at that moment);
3. one batched ``transport.read`` per owner moves the bytes; each block is checked against the
   owner's checksum, so a flipped bit or a block the owner lost meanwhile is a miss, never served;
4. ``Release`` ends the pin (it also expires by itself if this node dies first).

The tier stores nothing itself: ``put`` answers ``False`` (blocks are published where they are
saved, not pushed to peers) and it holds no capacity.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import grpc
import numpy as np

from pegaflow_core._proto import pegaflow_pb2 as pb
from pegaflow_core._proto import pegaflow_pb2_grpc as pb_grpc
from pegaflow_core.buffers import Buffer, byte_view
from pegaflow_core.checksum import checksum
from pegaflow_core.errors import ClosedError, InvalidArgument, PegaflowError, TransportError
from pegaflow_core.hookspecs import Register, hookimpl
from pegaflow_core.keys import BlockKey, check_keys
from pegaflow_core.sizes import Duration
from pegaflow_core.tier import MemoryKind, StackContext, Tier, TierCapabilities, TierUsage
from pegaflow_core.transport import RemoteRegion, TransferOp

log = logging.getLogger("pegaflow.remote")

PIPELINE_BYTES = 8 << 20  # bytes per transfer batch at most: verified while the next batches arrive
PIPELINE_OPS = 16  # blocks per transfer batch at most (small blocks)
PIPELINE_DEPTH = 2  # batches in flight


@dataclass(frozen=True)
class RemoteOptions:
    timeout: Duration = field(default=Duration(5.0), metadata={"help": "how long one peer may take to pin and send a batch"})
    lease_ttl: Duration = field(default=Duration(30.0), metadata={"help": "how long a peer keeps blocks pinned for us at most"})
    verify: bool = field(default=True, metadata={
        "help": "check each fetched block against the checksum its owner sealed (false: trust the transport's "
                "own integrity checks; a failed or cut transfer is still a miss either way)"})


class RemoteTier(Tier):
    kind: ClassVar[str] = "remote"
    Options: ClassVar[type] = RemoteOptions
    capabilities: ClassVar[TierCapabilities] = TierCapabilities(memory=frozenset({MemoryKind.HOST}))

    def __init__(self, options: RemoteOptions | None = None) -> None:
        self.options = options or RemoteOptions()
        self.integrity_failures = 0
        self._context: StackContext | None = None
        self._stubs: dict[str, tuple[grpc.Channel, pb_grpc.PegaflowStub]] = {}
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
        return [bool(self._owners(locs)) for locs in self._ctx().index.lookup(check_keys(keys))]

    def evict(self, keys: Sequence[BlockKey]) -> int:
        self._check_open()
        check_keys(keys)
        return 0

    def usage(self) -> TierUsage:
        self._check_open()
        return TierUsage(0, 0, 0)

    def get_into(self, keys: Sequence[BlockKey], dests: Sequence[Buffer]) -> list[bool]:
        self._check_open()
        keys = check_keys(keys)
        if len(keys) != len(dests):
            raise InvalidArgument(f"dests: expected one buffer per key ({len(keys)}), got {len(dests)}")
        targets = [byte_view(d, writable=True, what=f"dests[{i}]") for i, d in enumerate(dests)]
        context = self._ctx()
        by_owner: dict[str, list[int]] = {}
        for i, locs in enumerate(context.index.lookup(keys)):
            owners = self._owners(locs)
            if owners:
                by_owner.setdefault(owners[0], []).append(i)
        results = [False] * len(keys)
        if not by_owner:
            return results
        nodes = context.index.nodes()
        for owner, positions in by_owner.items():
            info = nodes.get(owner)
            if info is None:
                log.info("remote: node %s holds %d blocks but is not live; they are misses", owner, len(positions))
                continue
            try:
                for i, ok in zip(positions, self._fetch(info, [keys[i] for i in positions], [targets[i] for i in positions])):
                    results[i] = ok
            except (PegaflowError, grpc.RpcError) as exc:
                log.warning("remote: fetching %d blocks from %s failed (%s); they are misses", len(positions), owner, exc)
        return results

    def close(self) -> None:
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
        info = context.index.nodes().get(node)
        if info is None or node == context.node:
            raise InvalidArgument(f"probe: node {node!r} is not another live node of the cluster")
        targets = [byte_view(d, writable=True, what=f"dests[{i}]") for i, d in enumerate(dests)]
        with self._pinned(info, keys) as (remote, pinned):
            ops, _ = self._plan(context, remote, pinned, targets)
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
        kind = self._transport_kind(info)
        remote = RemoteRegion(info.transports[f"{kind}.address"].decode(), info.transports[f"{kind}.pool"])
        stub = self._stub(info.address)
        pinned = stub.Pin(
            pb.PinRequest(blocks=[pb.BlockRef(namespace=k.namespace, block_hash=k.block_hash, shard=k.shard) for k in keys],
                          lease_ttl_s=self.options.lease_ttl, requester=self._ctx().node),
            timeout=self.options.timeout,
        )
        try:
            yield remote, pinned
        finally:
            try:
                stub.Release(pb.ReleaseRequest(lease_ids=[pinned.lease_id]), timeout=self.options.timeout)
            except grpc.RpcError:
                pass  # the pin expires by itself

    def _plan(self, context: StackContext, remote: RemoteRegion, pinned: pb.PinResponse,
              targets: list[memoryview]) -> tuple[list[TransferOp], list[int]]:
        """One read op per block the owner still holds at the size we expect, into a slot of our
        pool; and the position of each op's block."""
        pool = np.frombuffer(context.top.buffer(), dtype=np.uint8)
        base = pool.__array_interface__["data"][0]
        end = base + pool.size
        ops, wanted = [], []
        for i, (target, offset, nbytes) in enumerate(zip(targets, pinned.offsets, pinned.nbytes)):
            address_of = np.frombuffer(target, dtype=np.uint8).__array_interface__["data"][0]
            if offset < 0 or nbytes != len(target) or not base <= address_of < end:
                continue  # not on that node any more, another size, or not a slot of our pool
            ops.append(TransferOp(context.pool_region, address_of - base, remote, offset, nbytes))
            wanted.append(i)
        return ops, wanted

    def _fetch(self, info: object, keys: list[BlockKey], targets: list[memoryview]) -> list[bool]:
        context = self._ctx()
        results = [False] * len(keys)
        with self._pinned(info, keys) as (remote, pinned):
            ops, wanted = self._plan(context, remote, pinned, targets)
            # Pipelined: batches of at most PIPELINE_OPS blocks or PIPELINE_BYTES, PIPELINE_DEPTH of
            # them in flight, so the link never waits for this thread and each block is verified
            # (without the GIL) soon after it arrived, while it is still in the CPU's cache.
            per_batch = max(1, min(PIPELINE_OPS, PIPELINE_BYTES // max((op.length for op in ops), default=1)))
            batches = [range(lo, min(len(ops), lo + per_batch)) for lo in range(0, len(ops), per_batch)]
            in_flight: collections.deque[Any] = collections.deque()
            try:
                for n, batch in enumerate(batches):
                    while len(in_flight) < PIPELINE_DEPTH and n + len(in_flight) < len(batches):
                        in_flight.append(self._read(context, ops, batches[n + len(in_flight)]))
                    in_flight.popleft().result(timeout=self.options.timeout + 1)
                    for j in batch:
                        i = wanted[j]
                        results[i] = not self.options.verify or self._verified(keys[i], targets[i], pinned.checksums[i], info.node_id)
            finally:
                # A batch still in flight writes into slots our caller frees when we fail: wait
                # for it (each read ends by its own timeout) before handing them back.
                for pending in in_flight:
                    try:
                        pending.result(timeout=self.options.timeout + 1)
                    except Exception:
                        pass
        return results

    def _read(self, context: StackContext, ops: list[TransferOp], batch: range) -> Any:
        return context.transport.read(ops[batch.start : batch.stop], timeout_s=self.options.timeout)

    def _verified(self, key: BlockKey, target: memoryview, expected: int, owner: str) -> bool:
        if checksum(target) == expected:
            return True
        self.integrity_failures += 1
        log.error("remote: block %r from %s failed its checksum; treated as a miss", key, owner)
        return False

    def _owners(self, locations: Sequence[object]) -> list[str]:
        node = self._ctx().node
        return [loc.node for loc in locations if loc.node not in ("", node)]

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
