"""The Index interface: which block is where, and which blocks must not move right now.

The index maps a ``BlockKey`` to the places holding its bytes (tier, node) and hands out
**leases**: ``acquire`` finds the longest cached prefix of a request's keys and pins those blocks
in one atomic step, so a block being loaded cannot be evicted between "it's there" and "copy it".
A lease ends by ``release``, by its deadline, or by ``release_owner`` when the client that held it
dies (the daemon's session watcher calls it). The index also keeps recency, so the tier stack
asks it for victims (least recently used, never pinned).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .backend import Backend
from .errors import InvalidArgument
from .keys import BlockKey


@dataclass(frozen=True)
class Location:
    """One copy of a block: in tier ``tier`` (its name in the stack) on node ``node`` ("" = here).

    ``checksum`` is the xxhash64 of the block's bytes, set when the block was sealed; readers from
    anything but local DRAM verify it and treat a mismatch as a miss.

    ``offset`` is where the block starts in the memory its node serves to peers (the top tier's
    pool, registered with the transport), -1 when unknown: a peer with it starts reading while
    its Pin is still on the way, and lets the Pin's answer decide whether the bytes are served.
    """

    tier: str
    node: str = ""
    nbytes: int = 0
    checksum: int | None = None
    offset: int = -1


@dataclass(frozen=True)
class Lease:
    """Pinned prefix hit. ``keys[i]`` can be read from any of ``locations[i]`` until released."""

    lease_id: str
    keys: tuple[BlockKey, ...]
    locations: tuple[tuple[Location, ...], ...]
    expires_at: float  # time.monotonic() deadline
    owner: str = ""

    @property
    def hits(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class NodeInfo:
    """A live daemon of the cluster: where its transport listens and the descriptors peers need
    (e.g. the remote key of its DRAM pool), keyed by transport kind."""

    node_id: str
    address: str
    transports: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexStats:
    blocks: int  # distinct keys with at least one location
    pinned: int  # distinct keys currently pinned by a lease
    leases: int  # live leases


class Index(Backend, ABC):
    """Base class of every index. Thread-safe; every method is batched.

    An index whose class sets ``shared = True`` is cluster-wide (Redis): the daemon then keeps a
    local index for its own blocks in front of it (node_index.py), so the node keeps serving its
    own blocks when the shared one is unreachable.
    """

    shared: ClassVar[bool] = False

    @abstractmethod
    def insert(self, entries: Sequence[tuple[BlockKey, Location]]) -> None:
        """Record that each key has a copy at that location (replacing an earlier one on the same
        tier and node). Inserting marks the key as most recently used."""

    @abstractmethod
    def lookup(self, keys: Sequence[BlockKey]) -> list[tuple[Location, ...]]:
        """Every known location of each key; an empty tuple is a miss. Does not touch recency."""

    def lookup_here(self, keys: Sequence[BlockKey]) -> list[tuple[Location, ...]]:
        """Like ``lookup``, but only this node's copies need be known: the question a save asks
        (is it stored here already?), which must not cost a round trip to a cluster index. An
        index that is not in front of another one answers it with ``lookup``."""
        return self.lookup(keys)

    @abstractmethod
    def acquire(self, keys: Sequence[BlockKey], ttl_s: float, owner: str = "") -> Lease:
        """Pin the longest prefix of ``keys`` that has a location and return it as a lease.

        The prefix stops at the first miss. A lease with no keys pins nothing but is still valid to
        release. Hits become most recently used.
        """

    @abstractmethod
    def release(self, lease_id: str) -> bool:
        """Unpin a lease; ``False`` if it is unknown or already expired (never an error)."""

    @abstractmethod
    def release_owner(self, owner: str) -> int:
        """Release every lease of ``owner`` (a client that went away); return how many."""

    @abstractmethod
    def expire(self, now: float | None = None) -> int:
        """Release leases whose deadline passed; return how many."""

    @abstractmethod
    def remove(self, keys: Sequence[BlockKey], tier: str | None = None, node: str | None = None) -> int:
        """Forget locations of ``keys`` (only those on ``tier``/``node`` when given), pinned or not
        (the caller decides; the stack never removes pinned keys). Return how many keys lost a
        location."""

    @abstractmethod
    def victims(self, tier: str, count: int, node: str = "") -> list[BlockKey]:
        """Up to ``count`` least recently used keys with a copy on ``tier``/``node`` that no lease
        pins, oldest first."""

    @abstractmethod
    def is_pinned(self, keys: Sequence[BlockKey]) -> list[bool]: ...

    @abstractmethod
    def stats(self) -> IndexStats: ...

    # -- inserting in two halves (an index with a cluster behind it) -----------------------------
    def insert_here(self, entries: Sequence[tuple[BlockKey, Location]]) -> None:
        """The part of ``insert`` that makes this node serve the blocks. An index with a cluster
        behind it (``NodeIndex``) leaves telling the cluster to ``publish``, so a caller with
        someone waiting on the blocks wakes them first; the default inserts all at once."""
        self.insert(entries)

    def publish(self, entries: Sequence[tuple[BlockKey, Location]]) -> None:
        """The rest of ``insert`` after ``insert_here``: telling the cluster. The default has
        nothing left to do."""

    # -- cluster membership (indexes shared by several daemons) ---------------------------------
    def register_node(self, node_id: str, address: str, transports: dict[str, bytes]) -> None:
        """Publish this daemon's transport address and descriptors; a one-machine index has no
        peers to tell, so the default does nothing."""

    def nodes(self) -> dict[str, NodeInfo]:
        """Live daemons of the cluster by node id; a one-machine index knows none."""
        return {}

    def close(self) -> None:
        """Release resources; the default has none."""

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_entries(entries: Sequence[tuple[BlockKey, Location]]) -> list[tuple[BlockKey, Location]]:
    """Validate an insert batch before anything changes; names the position of the bad entry."""
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise InvalidArgument(
            f"entries: expected a sequence of (BlockKey, Location) pairs, got {type(entries).__name__}"
        )
    items: list[tuple[BlockKey, Location]] = []
    checked: set[int] = set()  # ids of Location objects validated already (a batch often shares one)
    clean: set[tuple[str, str]] = set()  # (tier, node) pairs validated already: per-block Locations repeat them
    for i, item in enumerate(entries):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InvalidArgument(f"entries[{i}]: expected a (BlockKey, Location) pair, got {item!r:.80}")
        key, location = item
        if not isinstance(key, BlockKey):
            raise InvalidArgument(f"entries[{i}][0]: expected a BlockKey, got {type(key).__name__} {key!r:.60}")
        if id(location) in checked:
            items.append((key, location))
            continue
        if not isinstance(location, Location):
            raise InvalidArgument(
                f"entries[{i}][1]: expected a Location, got {type(location).__name__} {location!r:.60}"
            )
        names = (location.tier, location.node)
        if not (type(location.tier) is str and type(location.node) is str and names in clean):
            if not isinstance(location.tier, str) or not location.tier or _has_control(location.tier):
                raise InvalidArgument(
                    f"entries[{i}][1].tier: expected a non-empty tier name without control characters, "
                    f"got {location.tier!r}"
                )
            if not isinstance(location.node, str) or _has_control(location.node):
                raise InvalidArgument(
                    f"entries[{i}][1].node: expected a node id without control characters ('' = this node), "
                    f"got {location.node!r}"
                )
        if not isinstance(location.nbytes, int) or isinstance(location.nbytes, bool) or location.nbytes < 0:
            raise InvalidArgument(f"entries[{i}][1].nbytes: expected an integer >= 0, got {location.nbytes!r}")
        if location.checksum is not None and (
            not isinstance(location.checksum, int) or isinstance(location.checksum, bool) or location.checksum < 0
        ):
            raise InvalidArgument(
                f"entries[{i}][1].checksum: expected an integer >= 0 or None, got {location.checksum!r}"
            )
        if not isinstance(location.offset, int) or isinstance(location.offset, bool) or location.offset < -1:
            raise InvalidArgument(
                f"entries[{i}][1].offset: expected an integer >= 0, or -1 for unknown, got {location.offset!r}"
            )
        checked.add(id(location))
        clean.add(names)
        items.append((key, location))
    return items


def _has_control(name: str) -> bool:
    """Control characters would collide with separators of packed records (Redis, journals)."""
    return any(ord(ch) < 0x20 for ch in name)
