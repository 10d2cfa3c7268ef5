"""Direct device I/O: tiers that move blocks between their storage and GPU memory themselves.

A tier that declares ``TierCapabilities(device_io=True)`` implements ``Tier.read_into_device`` and
``Tier.write_from_device`` (pegaflow-gds does, with cuFile through kvikio). They take, per key, the
block's GPU memory as a list of ``(device address, nbytes)`` segments in the block's byte order:
an engine's block is one piece per KV plane (see layout.py), so a block is usually scattered, and a
daemon staging buffer is the one-segment case.

The daemon decides per request, per hit, with :func:`load_route`:

* the block sits in a host-memory tier (the DRAM pool)  -> ``POOL``: pool -> GPU by the memory kind's copy;
* the block sits in a device-I/O tier that says direct loads pay off here (``Tier.direct_loads``,
  set from its ``direct: auto|always|never`` option) and the engine memory is GPU memory
  (``EngineMemory.device_memory``) -> ``DIRECT``: ``holder.read_into_device`` straight into the
  engine's blocks; a Query does not promote such a hit, and the Load reads it directly;
* anything else -> ``STAGED``: ``holder.get_into`` a pool block (the usual promotion), then
  pool -> GPU.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .backend import is_int
from .errors import InvalidArgument

if TYPE_CHECKING:
    from .tier import Tier

#: One block's GPU memory: ``(device address, nbytes)`` pieces in the block's byte order.
DeviceSegments = Sequence[tuple[int, int]]


class LoadRoute(enum.Enum):
    """How one hit reaches an engine's memory (see the module docstring)."""

    POOL = "pool"
    DIRECT = "direct"
    STAGED = "staged"


def load_route(holder: Tier, device_memory: bool) -> LoadRoute:
    """The path for a hit held by ``holder`` into engine memory that is GPU memory or not (the
    memory kind's ``EngineMemory.device_memory``). Cheap (attribute reads): call it per request."""
    caps = holder.capabilities
    if caps.host_views:
        return LoadRoute.POOL
    if caps.device_io and device_memory and bool(getattr(holder, "direct_loads", False)):
        return LoadRoute.DIRECT
    return LoadRoute.STAGED


def check_device_segments(batch: Sequence[Any], count: int, what: str) -> list[list[tuple[int, int]]]:
    """Validate a batch of per-key segment lists (shape and values only; whether the addresses are
    GPU memory is the tier's check). Returns plain lists; raises InvalidArgument naming the item."""
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence):
        raise InvalidArgument(f"{what}: expected a sequence of segment lists, got {type(batch).__name__}")
    if len(batch) != count:
        raise InvalidArgument(f"{what}: expected one segment list per key ({count}), got {len(batch)}")
    out: list[list[tuple[int, int]]] = []
    for i, segments in enumerate(batch):
        if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence) or not segments:
            raise InvalidArgument(
                f"{what}[{i}]: expected a non-empty list of (device address, nbytes) pairs, got {segments!r}"
            )
        pairs: list[tuple[int, int]] = []
        for j, pair in enumerate(segments):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InvalidArgument(f"{what}[{i}][{j}]: expected a (device address, nbytes) pair, got {pair!r}")
            addr, nbytes = pair
            if not is_int(addr) or addr <= 0:
                raise InvalidArgument(f"{what}[{i}][{j}]: expected a device address above 0, got {addr!r}")
            if not is_int(nbytes) or nbytes <= 0:
                raise InvalidArgument(f"{what}[{i}][{j}]: expected a length above 0, got {nbytes!r}")
            pairs.append((int(addr), int(nbytes)))
        out.append(pairs)
    return out
