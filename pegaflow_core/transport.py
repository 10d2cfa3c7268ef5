"""The Transport interface: move bytes between registered memory regions, here or on a peer.

The model is one-sided RDMA's, which every fast fabric offers and which a TCP loopback can emulate:
each side registers memory once (huge regions, never per block) and publishes the region's
``descriptor``; a peer then reads or writes ``(region, offset, length)`` lists of it without the
owner's code running per transfer. Transfers are batched and asynchronous: ``read``/``write``
return a ``concurrent.futures.Future`` (usable from threads, and from asyncio through
``asyncio.wrap_future``) that fails with ``TransportError`` on an unreachable or dead peer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from .backend import Backend
from .buffers import Buffer


@dataclass(frozen=True)
class Region:
    """A registered local memory region. ``descriptor`` is opaque bytes a peer needs to address it
    (for RDMA: address + rkey); send it through the index or the control plane."""

    region_id: int
    nbytes: int
    descriptor: bytes


@dataclass(frozen=True)
class RemoteRegion:
    """A peer's region: the peer's transport ``address`` and the region's ``descriptor``."""

    address: str
    descriptor: bytes


@dataclass(frozen=True)
class TransferOp:
    """Move ``length`` bytes between ``local`` at ``local_offset`` and ``remote`` at
    ``remote_offset``. Direction is given by the call (read: remote → local; write: local → remote)."""

    local: Region
    local_offset: int
    remote: RemoteRegion
    remote_offset: int
    length: int


class Transport(Backend, ABC):
    """Base class of every transport. Thread-safe."""

    @property
    @abstractmethod
    def address(self) -> str:
        """Where peers reach this endpoint, e.g. ``tcp://127.0.0.1:41234``."""

    @abstractmethod
    def register(self, buffer: Buffer) -> Region:
        """Make a writable buffer addressable by peers. The caller keeps it alive until
        ``deregister``."""

    @abstractmethod
    def deregister(self, region: Region) -> None:
        """Stop serving a region; later remote access to it fails with TransportError."""

    @abstractmethod
    def connect(self, address: str, timeout_s: float = 5.0) -> None:
        """Open (and cache) a connection to a peer; raise TransportError if unreachable.
        Transfers connect on demand, so calling this is optional: it surfaces errors early."""

    @abstractmethod
    def read(self, ops: Sequence[TransferOp], timeout_s: float = 30.0) -> Future[None]:
        """Copy remote → local for every op; one future for the whole batch."""

    @abstractmethod
    def write(self, ops: Sequence[TransferOp], timeout_s: float = 30.0) -> Future[None]:
        """Copy local → remote for every op; one future for the whole batch."""

    @abstractmethod
    def close(self) -> None:
        """Close connections and stop serving regions."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
