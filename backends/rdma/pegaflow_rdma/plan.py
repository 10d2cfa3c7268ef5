"""Cutting a batch of ops into RDMA work requests (pure Python: no verbs, tested anywhere).

One work request moves one contiguous range of the peer's region, so ops that are adjacent on the
peer become one request whose local side is a scatter/gather list (up to ``max_sge`` entries;
entries adjacent locally merge too). Requests never cross a memory-region chunk on either side
(each chunk has its own key) and never exceed ``wr_size``, so one large op becomes several
requests the engine stripes over every NIC and queue pair.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .protocol import RemoteDescriptor


class LocalChunks(Protocol):
    """What the planner needs of a local region: its memory-region chunk size."""

    chunk: int


@dataclass(frozen=True)
class OpSpan:
    """One checked op: ``length`` bytes between ``local`` at ``local_offset`` and the peer's
    region at ``remote_offset``; ``index`` is its position in the caller's batch."""

    index: int
    local: Any  # a LocalChunks (the transport's registered region)
    local_offset: int
    remote: RemoteDescriptor
    remote_offset: int
    length: int


@dataclass
class WorkRequest:
    """One RDMA READ or WRITE: the peer's ``[remote_offset, remote_offset + length)`` and the local
    scatter/gather list ``sges`` of ``[region, offset, length]`` covering as many bytes."""

    index: int  # the first op it carries, for error messages
    remote: RemoteDescriptor
    remote_offset: int
    length: int = 0
    sges: list[list[Any]] = field(default_factory=list)
    resubmits: int = 0  # times it was posted again after a retryable failure (engine)


def plan_work(spans: Iterable[OpSpan], wr_size: int, max_sge: int) -> list[WorkRequest]:
    """Work requests for ``spans`` in order; zero-length ops produce none."""
    out: list[WorkRequest] = []
    current: WorkRequest | None = None
    for span in spans:
        local, lo, remote, ro, left = span.local, span.local_offset, span.remote, span.remote_offset, span.length
        while left > 0:
            step = min(left, remote.chunk - ro % remote.chunk, local.chunk - lo % local.chunk)
            extend = (current is not None and current.remote is remote and current.length < wr_size
                      and current.remote_offset + current.length == ro and ro % remote.chunk != 0)
            merge = False
            if extend:
                last = current.sges[-1]
                merge = last[0] is local and last[1] + last[2] == lo and lo % local.chunk != 0
                if not merge and len(current.sges) >= max_sge:
                    extend = False
            if not extend:
                current = WorkRequest(span.index, remote, ro)
                out.append(current)
                merge = False
            step = min(step, wr_size - current.length)
            if merge:
                current.sges[-1][2] += step
            else:
                current.sges.append([local, lo, step])
            current.length += step
            left -= step
            lo += step
            ro += step
    return out
