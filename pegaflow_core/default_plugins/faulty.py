"""Built-in plugin: ``faulty``, a fault-injecting wrapper around any tier or any transport.

pegaflow promises never to serve wrong KV and to survive a failing tier or peer. Those promises are
only as good as the tests that break things on purpose, so this wrapper lets any test (ours, a
backend author's, a chaos run of a real daemon) wrap an existing backend and make it misbehave in
the ways real hardware does, reproducibly::

    tiers:
      - kind: faulty
        seed: 1
        bit_flip_rate: 0.001
        inner: {kind: dram, capacity: 64mb}

Faults, all off by default (a fault-free wrapper passes the full contract suites):

* ``latency``: added to every data call (tiers: in the calling thread; transports: to the
  completion of the returned future, and to ``connect``).
* ``error_rate``: the call fails. Tiers raise :class:`InjectedFault` (a plain
  :class:`~pegaflow_core.errors.PegaflowError`: the tier failed, the caller did nothing wrong, so it
  is neither InvalidArgument nor IntegrityError; the daemon must treat it as a miss or a failed
  save). Transports fail the future (``connect``: raise) with :class:`InjectedTransportError`, a
  :class:`~pegaflow_core.errors.TransportError`.
* ``bit_flip_rate``: one random bit of the data the caller receives is flipped — per block read
  through a tier's ``get_into`` (in the caller's buffer) or ``view`` (in a corrupted private copy;
  the tier's memory is never touched), per transfer batch of a transport (reads: in the local
  buffer; writes: in a private copy that is sent instead). The stored copy stays intact, so a retry
  can succeed.
* ``torn_write_rate``: a tier ``put`` or ``commit`` stores only a prefix of the block (the rest
  reads as zeros) and reports success; a transport ``write`` delivers only a prefix of one op and
  reports success. This is what checksums exist for.
* ``drop_rate`` (transports): the connection drops mid-batch: a prefix of the ops is delivered,
  then the future fails with InjectedTransportError.
* ``after`` / ``max_faults``: random faults start after ``after`` calls and stop after
  ``max_faults`` of them. ``seed`` seeds one ``random.Random`` per wrapper, so a single-threaded
  sequence of calls faults identically on every run.

Tests can also force faults: ``fail_next(n)``, ``flip_next(n)``, ``tear_next(n)`` and (transports)
``drop_next(n)`` apply to the next ``n`` eligible calls, blocks or transfers whatever the rates,
``after`` and ``max_faults`` say; ``faults`` counts what was injected. ``FaultyTier.wrap(tier, ...)``
and ``FaultyTransport.wrap(transport, ...)`` wrap an object built in code (e.g. a backend under
development that is not installed as a plugin).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pegaflow_core.backend import Availability
from pegaflow_core.buffers import Buffer, byte_view
from pegaflow_core.errors import InvalidArgument, PegaflowError, PluginError, TransportError
from pegaflow_core.hookspecs import Register, hookimpl
from pegaflow_core.keys import BlockKey
from pegaflow_core.sizes import Duration
from pegaflow_core.tier import Tier, TierCapabilities, TierUsage
from pegaflow_core.transport import Region, TransferOp, Transport

T = TypeVar("T")

ERROR, BIT_FLIP, TORN_WRITE, DROP = "error", "bit_flip", "torn_write", "drop"


class InjectedFault(PegaflowError):
    """A failure the ``faulty`` wrapper injected on purpose (what a faulty tier raises)."""


class InjectedTransportError(InjectedFault, TransportError):
    """An injected transport failure: an error or a dropped connection."""


# -- options ---------------------------------------------------------------------------------------

def _check_probability(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        shown = f"{value:g}" if isinstance(value, float) else repr(value)  # '2' as written, not '2.0'
        raise ValueError(f"expected a probability from 0 to 1, got {shown}")


def _check_count(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected an integer >= 0, got {value!r}")


def _check_seed(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")


def _check_latency(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < float("inf"):
        raise ValueError(f"expected a finite duration >= 0, got {value!r}")


def _rate(help_text: str) -> Any:
    return field(default=0.0, metadata={"help": help_text, "check": _check_probability})


@dataclass(frozen=True, kw_only=True)
class FaultOptions:
    """What to inject. ``FaultyTier.Options`` adds the ``inner`` tier; transports use
    :class:`TransportFaultOptions`."""

    seed: int = field(default=0, metadata={"help": "seed of the fault generator: same seed and calls, same faults",
                                           "check": _check_seed})
    latency: Duration = field(default=Duration(0.0), metadata={"help": "added to every data call",
                                                               "check": _check_latency})
    error_rate: float = _rate("probability that a call fails (tiers: InjectedFault; transports: TransportError)")
    bit_flip_rate: float = _rate("probability that a block or transfer the caller receives has one bit flipped")
    torn_write_rate: float = _rate("probability that a block or write is stored only in part, reported as success")
    after: int = field(default=0, metadata={"help": "calls to let through before random faults start",
                                            "check": _check_count})
    max_faults: int | None = field(default=None, metadata={"help": "random faults after which the wrapper stops "
                                                                   "faulting; null: no limit", "check": _check_count})

    def __post_init__(self) -> None:
        # The config loader runs the same checks per key (naming the key path); this catches
        # options built in code.
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            value = getattr(self, f.name)
            if check is not None and value is not None:
                try:
                    check(value)
                except ValueError as exc:
                    raise InvalidArgument(f"{f.name}: {exc}") from None

    def rates(self) -> dict[str, float]:
        return {ERROR: self.error_rate, BIT_FLIP: self.bit_flip_rate, TORN_WRITE: self.torn_write_rate}


@dataclass(frozen=True, kw_only=True)
class TransportFaultOptions(FaultOptions):
    drop_rate: float = _rate("probability that the connection drops mid-batch (the future fails)")

    def rates(self) -> dict[str, float]:
        return {**super().rates(), DROP: self.drop_rate}


_INNER_HELP = "the wrapped {role}: a mapping with its own kind and options"


def _inner_component(options: Any, role: str) -> Any:
    """The validated inner component; ConfigErrors name ``inner...`` and the config loader puts
    them under the wrapper's own path (``tiers[0].inner.capacity``)."""
    from pegaflow_core.config import component_from_mapping  # config imports the plugin host

    return component_from_mapping(role, options.inner, file=None, path="inner")


@dataclass(frozen=True, kw_only=True)
class FaultyTierOptions(FaultOptions):
    inner: dict[str, Any] = field(metadata={"help": _INNER_HELP.format(role="tier")})
    #: ``inner`` validated (a ComponentConfig); built by FaultyTier.
    component: Any = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "component", _inner_component(self, "tier"))


@dataclass(frozen=True, kw_only=True)
class FaultyTransportOptions(TransportFaultOptions):
    inner: dict[str, Any] = field(metadata={"help": _INNER_HELP.format(role="transport")})
    component: Any = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "component", _inner_component(self, "transport"))


@dataclass(frozen=True)
class FaultCounts:
    """What a wrapper has done so far. ``calls`` counts data calls (the unit of ``after``)."""

    calls: int = 0
    errors: int = 0
    bit_flips: int = 0
    torn_writes: int = 0
    drops: int = 0

    @property
    def total(self) -> int:
        return self.errors + self.bit_flips + self.torn_writes + self.drops


_COUNTER = {ERROR: "errors", BIT_FLIP: "bit_flips", TORN_WRITE: "torn_writes", DROP: "drops"}


# -- the decisions -----------------------------------------------------------------------------------

class _Injector:
    """Decides which calls, blocks and transfers fault, from one seeded generator under one lock,
    so one thread's sequence of calls faults the same way on every run."""

    def __init__(self, options: FaultOptions) -> None:
        self.latency = float(options.latency)
        self.rates = options.rates()
        self.after = options.after
        self.max_faults = options.max_faults
        self._rng = random.Random(options.seed)
        self._lock = threading.Lock()
        self._calls = 0
        self._random_faults = 0
        self._counts = dict.fromkeys(_COUNTER, 0)
        self._forced = dict.fromkeys(_COUNTER, 0)

    def force(self, kind: str, n: int) -> None:
        if kind not in self.rates:
            raise InvalidArgument(f"this wrapper cannot inject {kind!r} faults")
        _check_count_arg(n)
        with self._lock:
            self._forced[kind] += n

    def counts(self) -> FaultCounts:
        with self._lock:
            return FaultCounts(self._calls, **{_COUNTER[k]: v for k, v in self._counts.items()})

    def armed(self, kind: str) -> bool:
        """Whether ``kind`` could fire now: cheap enough to guard the fault-free fast path."""
        return self._forced.get(kind, 0) > 0 or self.rates.get(kind, 0.0) > 0.0

    def call(self, *, sleep: bool = True) -> bool:
        """Count one data call and (with ``sleep``) wait the latency in the calling thread; whether
        random faults may fire in it."""
        with self._lock:
            self._calls += 1
            live = self._calls > self.after
        if sleep and self.latency:
            time.sleep(self.latency)
        return live

    def pick(self, kind: str, count: int, live: bool) -> list[int]:
        """Which of ``count`` candidates get a ``kind`` fault (forced ones first), counted."""
        if count <= 0 or not self.armed(kind):
            return []
        chosen = []
        with self._lock:
            rate = self.rates.get(kind, 0.0)
            for i in range(count):
                if self._forced[kind] > 0:
                    self._forced[kind] -= 1
                elif (live and rate > 0.0 and (self.max_faults is None or self._random_faults < self.max_faults)
                      and self._rng.random() < rate):
                    self._random_faults += 1
                else:
                    continue
                self._counts[kind] += 1
                chosen.append(i)
        return chosen

    def hit(self, kind: str, live: bool) -> bool:
        return bool(self.pick(kind, 1, live))

    def refund(self, kind: str, n: int = 1) -> None:
        """Un-count faults that were decided but could not happen (the block was not stored)."""
        if n:
            with self._lock:
                self._counts[kind] -= n

    def below(self, n: int) -> int:
        with self._lock:
            return self._rng.randrange(n)


def _check_count_arg(n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidArgument(f"n: expected an integer >= 0, got {n!r}")


def _with_faults(options: T, faults: dict[str, Any]) -> T:
    """``options`` with ``faults`` replaced; an unknown name is an InvalidArgument listing the known."""
    known = [f.name for f in dataclasses.fields(options) if f.init and f.name != "inner"]  # type: ignore[arg-type]
    unknown = sorted(set(faults) - set(known))
    if unknown:
        raise InvalidArgument(f"{unknown[0]}: not a fault option of {type(options).__name__}; known: {', '.join(known)}")
    return dataclasses.replace(options, **faults)  # type: ignore[type-var]


def _flip_bit(view: memoryview, bit: int) -> None:
    view[bit // 8] ^= 1 << (bit % 8)


class _FaultControls:
    """The test-facing API both wrappers share."""

    _faults: _Injector

    def fail_next(self, n: int = 1) -> None:
        """The next ``n`` data calls fail (tiers: raise InjectedFault; transports: TransportError)."""
        self._faults.force(ERROR, n)

    def flip_next(self, n: int = 1) -> None:
        """The next ``n`` blocks read (tiers) or transfers (transports) get one bit flipped."""
        self._faults.force(BIT_FLIP, n)

    def tear_next(self, n: int = 1) -> None:
        """The next ``n`` blocks stored (tiers) or writes (transports) are stored only in part."""
        self._faults.force(TORN_WRITE, n)

    @property
    def faults(self) -> FaultCounts:
        """Calls seen and faults injected so far."""
        return self._faults.counts()


def _conformance_inner(role: str, kind: str, tmp_path: Path, capacity_bytes: int | None) -> dict[str, Any] | None:
    """``{kind: ..., <options>}`` of an installed backend's own conformance options, or None."""
    from pegaflow_core.plugins import get_registry

    try:
        cls = get_registry().get(role, kind)
    except PluginError:
        return None
    if not cls.availability().ok:
        return None
    options = cls.conformance_options(tmp_path, capacity_bytes)
    if options is None:
        return None

    def plain(value: Any) -> Any:  # what the config loader reads: lists, not tuples
        return [plain(item) for item in value] if isinstance(value, (tuple, list)) else value

    fields = dataclasses.fields(options) if dataclasses.is_dataclass(options) else ()
    return {"kind": kind, **{f.name: plain(getattr(options, f.name)) for f in fields if f.init}}


# -- tiers ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _tier_class(capabilities: TierCapabilities) -> type[FaultyTier]:
    """FaultyTier declaring ``capabilities`` on the class: the contract suite reads capabilities
    from ``type(tier)``, so the wrapper's class must declare what the inner tier's class does."""
    if capabilities == FaultyTier.capabilities:
        return FaultyTier
    namespace = {"capabilities": capabilities, "__module__": FaultyTier.__module__,
                 "__qualname__": FaultyTier.__qualname__, "__doc__": FaultyTier.__doc__}
    return type(FaultyTier)(FaultyTier.__name__, (FaultyTier,), namespace)


class FaultyTier(_FaultControls, Tier):
    """A tier that forwards to an inner tier and injects the faults its options ask for.

    It offers what the inner tier offers (host views, persistence, memory kinds, ``recovered()``,
    ``integrity_failures``), nothing more: other methods of the inner tier are not forwarded, so no
    caller can reach the inner memory around the faults. Faulted calls: latency on every data call;
    errors on ``put``, ``get_into``, ``contains``, ``reserve``, ``commit`` and ``view`` (never on
    ``evict``/``abort``, which free the inner tier's room and must not leak it); bit flips per
    block read; torn writes per block newly stored by ``put`` or ``commit``.
    """

    kind: ClassVar[str] = "faulty"
    Options: ClassVar[type] = FaultyTierOptions

    def __new__(cls, options: FaultyTierOptions | None = None) -> FaultyTier:
        component = getattr(options, "component", None)
        if cls is FaultyTier and component is not None:
            cls = _tier_class(getattr(component.cls, "capabilities", TierCapabilities()))
        return super().__new__(cls)

    def __init__(self, options: FaultyTierOptions) -> None:
        if not isinstance(options, FaultyTierOptions):
            raise InvalidArgument(f"FaultyTier: expected FaultyTier.Options, got {type(options).__name__}")
        inner = options.component.build()
        if not isinstance(inner, Tier):
            raise PluginError(f"faulty: inner kind {options.component.kind!r} built {type(inner).__name__}, not a Tier")
        self._attach(inner, options)

    @classmethod
    def wrap(cls, inner: Tier, options: FaultOptions | None = None, **faults: Any) -> FaultyTier:
        """Wrap a tier built in code: ``FaultyTier.wrap(tier, seed=1, bit_flip_rate=0.5)``. The
        wrapper owns it (closing the wrapper closes it)."""
        if not isinstance(inner, Tier):
            raise InvalidArgument(f"inner: expected a Tier, got {type(inner).__name__}")
        wrapper = object.__new__(_tier_class(type(inner).capabilities))
        wrapper._attach(inner, _with_faults(options or FaultOptions(), faults))
        return wrapper

    def _attach(self, inner: Tier, options: FaultOptions) -> None:
        self.options = options
        self.inner = inner
        self.capabilities = inner.capabilities  # the instance's, e.g. a pinned pool's
        self._faults = _Injector(options)
        self._lock = threading.Lock()
        self._reserved: dict[BlockKey, memoryview] = {}  # for tearing at commit
        self._closed = False

    @classmethod
    def availability(cls) -> Availability:
        """Always available: the inner tier's availability is checked where it is configured."""
        return Availability(True)

    @classmethod
    def conformance_options(cls, tmp_path: Path, capacity_bytes: int | None = None) -> FaultyTierOptions | None:
        """A fault-free wrapper around the ``dram`` tier (None when dram is not installed here)."""
        inner = _conformance_inner("tier", "dram", tmp_path, capacity_bytes)
        return None if inner is None else FaultyTierOptions(inner=inner)

    def __repr__(self) -> str:
        return f"FaultyTier({self.inner!r})"

    @property
    def integrity_failures(self) -> int:  # type: ignore[override]
        return int(getattr(self.inner, "integrity_failures", 0))

    # -- helpers ---------------------------------------------------------------------------------
    def _begin(self, call: str, *, may_fail: bool = True) -> bool:
        """Count the call and apply latency and errors; whether random faults may fire in it.
        A closed wrapper injects nothing, so the inner tier's ClosedError comes through."""
        if self._closed:
            return False
        live = self._faults.call()
        if may_fail and self._faults.hit(ERROR, live):
            raise InjectedFault(f"faulty tier ({self.inner.kind}): injected error in {call}()")
        return live

    def _new_keys(self, keys: list[BlockKey]) -> list[bool] | None:
        """Which keys the inner tier does not hold yet (only those can be torn); None on bad keys,
        which the forwarded call then reports."""
        try:
            return [not held for held in self.inner.contains(keys)]
        except InvalidArgument:
            return None

    # -- Tier: required ----------------------------------------------------------------------------
    def put(self, keys: Sequence[BlockKey], blocks: Sequence[Buffer]) -> list[bool]:
        live = self._begin("put")
        if self._closed or not self._faults.armed(TORN_WRITE) or len(keys) != len(blocks):
            return self.inner.put(keys, blocks)
        keys, blocks = list(keys), list(blocks)
        new = self._new_keys(keys)
        if new is None:
            return self.inner.put(keys, blocks)
        sources: dict[int, memoryview] = {}
        for i, block in enumerate(blocks):
            if new[i]:
                try:
                    sources[i] = byte_view(block, what=f"blocks[{i}]")
                except InvalidArgument:
                    return self.inner.put(keys, blocks)  # reports the bad block, stores nothing
        candidates = [i for i in sources if len(sources[i])]
        torn = [candidates[j] for j in self._faults.pick(TORN_WRITE, len(candidates), live)]
        for i in torn:
            prefix = self._faults.below(len(sources[i]))
            partial = bytearray(len(sources[i]))  # what the medium holds after a torn write: the rest is zeros
            partial[:prefix] = sources[i][:prefix]
            blocks[i] = partial
        stored = self.inner.put(keys, blocks)
        self._faults.refund(TORN_WRITE, sum(not stored[i] for i in torn))
        return stored

    def get_into(self, keys: Sequence[BlockKey], dests: Sequence[Buffer]) -> list[bool]:
        live = self._begin("get_into")
        hits = self.inner.get_into(keys, dests)
        if self._closed or not self._faults.armed(BIT_FLIP):
            return hits
        got = [i for i, hit in enumerate(hits) if hit]
        for j in self._faults.pick(BIT_FLIP, len(got), live):
            view = byte_view(dests[got[j]], writable=True, what=f"dests[{got[j]}]")
            if len(view):
                _flip_bit(view, self._faults.below(8 * len(view)))
            else:
                self._faults.refund(BIT_FLIP)
        return hits

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        self._begin("contains")
        return self.inner.contains(keys)

    def evict(self, keys: Sequence[BlockKey]) -> int:
        self._begin("evict", may_fail=False)
        return self.inner.evict(keys)

    def usage(self) -> TierUsage:
        return self.inner.usage()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            self._reserved.clear()
        self.inner.close()

    def recovered(self) -> list[tuple[BlockKey, int]]:
        recovered: Callable[[], list[tuple[BlockKey, int]]] | None = getattr(self.inner, "recovered", None)
        return recovered() if recovered is not None else []

    # -- capability: host views ---------------------------------------------------------------------
    def reserve(self, keys: Sequence[BlockKey], nbytes: int) -> list[memoryview | None]:
        self._begin("reserve")
        views = self.inner.reserve(keys, nbytes)
        with self._lock:
            self._reserved.update((key, view) for key, view in zip(keys, views) if view is not None)
        return views

    def commit(self, keys: Sequence[BlockKey], checksums: Sequence[int | None] | None = None) -> None:
        """Make reserved blocks visible; a torn one keeps only a prefix of what the caller wrote.
        An injected error leaves the reservations in place, as a failed commit would: the caller
        must abort them."""
        live = self._begin("commit")
        if not self._closed and self._faults.armed(TORN_WRITE):
            with self._lock:
                slots = [(key, self._reserved.get(key)) for key in keys]
            slots = [(key, view) for key, view in slots if view is not None and len(view)]
            new = self._new_keys([key for key, _ in slots]) if slots else []
            candidates = [view for (_, view), is_new in zip(slots, new or []) if is_new]
            for j in self._faults.pick(TORN_WRITE, len(candidates), live):
                view = candidates[j]
                prefix = self._faults.below(len(view))
                view[prefix:] = bytes(len(view) - prefix)
        self.inner.commit(keys, checksums)  # a torn block then fails its checksum where it is verified
        self._forget(keys)

    def abort(self, keys: Sequence[BlockKey]) -> None:
        self._begin("abort", may_fail=False)
        self.inner.abort(keys)
        self._forget(keys)

    def view(self, keys: Sequence[BlockKey]) -> list[memoryview | None]:
        """Views of the inner tier's blocks; a flipped one is a read-only view of a corrupted private
        copy, never the inner memory."""
        live = self._begin("view")
        views = self.inner.view(keys)
        if self._closed or not self._faults.armed(BIT_FLIP):
            return views
        got = [i for i, view in enumerate(views) if view is not None and len(view)]
        for j in self._faults.pick(BIT_FLIP, len(got), live):
            i = got[j]
            copy = bytearray(views[i])  # type: ignore[arg-type]
            _flip_bit(memoryview(copy), self._faults.below(8 * len(copy)))
            views[i] = memoryview(copy).toreadonly()
        return views

    def _forget(self, keys: Sequence[BlockKey]) -> None:
        with self._lock:
            for key in keys:
                self._reserved.pop(key, None)


# -- transports ----------------------------------------------------------------------------------------

@dataclass
class _Plan:
    """What one transfer call will do: the ops to hand the inner transport, and the fault."""

    ops: list[TransferOp]
    fault: str | None = None
    delivered: int = 0  # DROP: ops delivered before the connection drops
    flip: tuple[int, int] | None = None  # BIT_FLIP: (op index, bit within the op's bytes)
    scratch: Region | None = None  # BIT_FLIP on a write: the corrupted private copy sent instead


class FaultyTransport(_FaultControls, Transport):
    """A transport that forwards to an inner transport and injects the faults its options ask for.

    At most one fault per ``read``/``write`` call, tried in this order: error (nothing moves),
    drop (a prefix of the ops moves, then the future fails), torn write (writes: one op moves only
    a prefix, reported as success), bit flip (one bit of what the caller receives). Faults need
    well-formed ops (TransferOp objects) and regions registered through this wrapper; a batch
    without them is forwarded untouched, so the inner transport reports bad input as usual.
    """

    kind: ClassVar[str] = "faulty"
    Options: ClassVar[type] = FaultyTransportOptions

    def __init__(self, options: FaultyTransportOptions) -> None:
        if not isinstance(options, FaultyTransportOptions):
            raise InvalidArgument(f"FaultyTransport: expected FaultyTransport.Options, got {type(options).__name__}")
        inner = options.component.build()
        if not isinstance(inner, Transport):
            raise PluginError(
                f"faulty: inner kind {options.component.kind!r} built {type(inner).__name__}, not a Transport"
            )
        self._attach(inner, options)

    @classmethod
    def wrap(cls, inner: Transport, options: TransportFaultOptions | None = None, **faults: Any) -> FaultyTransport:
        """Wrap a transport built in code; the wrapper owns it (closing the wrapper closes it)."""
        if not isinstance(inner, Transport):
            raise InvalidArgument(f"inner: expected a Transport, got {type(inner).__name__}")
        wrapper = object.__new__(cls)
        wrapper._attach(inner, _with_faults(options or TransportFaultOptions(), faults))
        return wrapper

    def _attach(self, inner: Transport, options: TransportFaultOptions) -> None:
        self.options = options
        self.inner = inner
        self._faults = _Injector(options)
        self._lock = threading.Lock()
        self._views: dict[Region, memoryview] = {}  # our registrations, to flip bits in and copy from
        self._timers: set[threading.Timer] = set()
        self._closed = False

    @classmethod
    def availability(cls) -> Availability:
        """Always available: the inner transport's availability is checked where it is configured."""
        return Availability(True)

    @classmethod
    def conformance_options(cls, tmp_path: Path, capacity_bytes: int | None = None) -> FaultyTransportOptions | None:
        """A fault-free wrapper around the built-in ``loopback`` transport."""
        inner = _conformance_inner("transport", "loopback", tmp_path, None)
        return None if inner is None else FaultyTransportOptions(inner=inner)

    def drop_next(self, n: int = 1) -> None:
        """The next ``n`` transfer batches lose their connection mid-batch."""
        self._faults.force(DROP, n)

    def __repr__(self) -> str:
        return f"FaultyTransport({self.inner!r})"

    @property
    def address(self) -> str:
        return self.inner.address

    def register(self, buffer: Buffer) -> Region:
        region = self.inner.register(buffer)
        view = byte_view(buffer, writable=True, what="register(buffer)")
        with self._lock:
            self._views[region] = view
        return region

    def deregister(self, region: Region) -> None:
        self.inner.deregister(region)
        with self._lock:
            self._views.pop(region, None)

    def connect(self, address: str, timeout_s: float = 5.0) -> None:
        if self._closed:  # inject nothing: the inner transport's ClosedError comes through
            self.inner.connect(address, timeout_s)
            return
        live = self._faults.call()
        if self._faults.hit(ERROR, live):
            raise InjectedTransportError(f"faulty transport: injected error connecting to {address}")
        self.inner.connect(address, timeout_s)

    def read(self, ops: Sequence[TransferOp], timeout_s: float = 30.0) -> Future[None]:
        return self._transfer("read", ops, timeout_s)

    def write(self, ops: Sequence[TransferOp], timeout_s: float = 30.0) -> Future[None]:
        return self._transfer("write", ops, timeout_s)

    def close(self) -> None:
        self._closed = True
        self.inner.close()
        with self._lock:
            timers = list(self._timers)
            self._views.clear()
        for timer in timers:  # deliver what was only waiting for its latency now
            timer.cancel()
            timer.function(*timer.args)

    # -- transfers ------------------------------------------------------------------------------------
    def _transfer(self, direction: str, ops: Sequence[TransferOp], timeout_s: float) -> Future[None]:
        if self._closed:  # inject nothing: the inner transport reports that it is closed
            return (self.inner.read if direction == "read" else self.inner.write)(ops, timeout_s)
        live = self._faults.call(sleep=False)  # latency delays the future, not the caller
        well_formed = isinstance(ops, Sequence) and all(isinstance(op, TransferOp) for op in ops)
        plan = self._plan(direction, list(ops), live) if well_formed else None
        if plan is None or plan.fault == ERROR:
            if plan is None and not self._faults.latency:
                return (self.inner.read if direction == "read" else self.inner.write)(ops, timeout_s)
            outer: Future[None] = Future()
            if plan is not None:
                self._settle(outer, InjectedTransportError(
                    f"faulty transport: injected error in {direction} of {len(plan.ops)} ops"))
            else:
                self._chain((self.inner.read if direction == "read" else self.inner.write)(ops, timeout_s), outer)
            return outer
        try:
            inner = (self.inner.read if direction == "read" else self.inner.write)(plan.ops, timeout_s)
        except BaseException:  # bad input the inner transport rejects at once: no fault happened
            self._release(plan)
            if plan.fault is not None:
                self._faults.refund(plan.fault)
            raise
        outer = Future()
        inner.add_done_callback(lambda done: self._finish(direction, plan, done, outer))
        return outer

    def _plan(self, direction: str, ops: list[TransferOp], live: bool) -> _Plan | None:
        """Decide this call's fault; None when it has none (forward the call as it is)."""
        if self._faults.hit(ERROR, live):
            return _Plan(ops, ERROR)
        if ops and self._faults.hit(DROP, live):
            kept = self._faults.below(len(ops))  # "mid-batch": at least the last op never arrives
            return _Plan(ops[:kept], DROP, delivered=kept)
        sized = [i for i, op in enumerate(ops) if self._local_bytes(op) is not None and op.length > 0]
        if direction == "write" and sized and self._faults.hit(TORN_WRITE, live):
            i = sized[self._faults.below(len(sized))]
            cut = self._faults.below(ops[i].length)
            torn = ops[:i] + ([dataclasses.replace(ops[i], length=cut)] if cut else []) + ops[i + 1:]
            return _Plan(torn, TORN_WRITE)
        if sized and self._faults.hit(BIT_FLIP, live):
            total = sum(ops[i].length for i in sized)
            bit = self._faults.below(8 * total)
            for i in sized:
                if bit < 8 * ops[i].length:
                    break
                bit -= 8 * ops[i].length
            plan = _Plan(list(ops), BIT_FLIP, flip=(i, bit))
            if direction == "write":
                copy = bytearray(self._local_bytes(ops[i]))  # type: ignore[arg-type]
                _flip_bit(memoryview(copy), bit)
                plan.scratch = self.inner.register(copy)
                plan.ops[i] = TransferOp(plan.scratch, 0, ops[i].remote, ops[i].remote_offset, ops[i].length)
            return plan
        return None if not self._faults.latency else _Plan(ops)

    def _local_bytes(self, op: TransferOp) -> memoryview | None:
        """The caller's bytes an op moves, if this wrapper registered its region and it is in bounds."""
        with self._lock:
            view = self._views.get(op.local) if isinstance(op.local, Region) else None
        if (view is None or not isinstance(op.local_offset, int) or not isinstance(op.length, int)
                or op.local_offset < 0 or op.length < 0 or op.local_offset + op.length > len(view)):
            return None
        return view[op.local_offset : op.local_offset + op.length]

    def _finish(self, direction: str, plan: _Plan, inner: Future[None], outer: Future[None]) -> None:
        """Inner batch done: apply the fault to what the caller receives, then complete."""
        self._release(plan)
        error = inner.exception()
        if error is not None:
            if plan.fault is not None:
                self._faults.refund(plan.fault)
            self._settle(outer, error)
            return
        if plan.fault == DROP:
            self._settle(outer, InjectedTransportError(
                f"faulty transport: connection dropped during {direction}, after {plan.delivered} of its ops"))
            return
        if plan.fault == BIT_FLIP and direction == "read" and plan.flip is not None:
            i, bit = plan.flip
            received = self._local_bytes(plan.ops[i])
            if received is None:  # deregistered meanwhile: nothing to flip
                self._faults.refund(BIT_FLIP)
            else:
                _flip_bit(received, bit)
        self._settle(outer, None)

    def _release(self, plan: _Plan) -> None:
        if plan.scratch is not None:
            try:
                self.inner.deregister(plan.scratch)
            except PegaflowError:
                pass  # the inner transport is closed; the scratch copy goes with it
            plan.scratch = None

    def _chain(self, inner: Future[None], outer: Future[None]) -> None:
        inner.add_done_callback(lambda done: self._settle(outer, done.exception()))

    def _settle(self, outer: Future[None], error: BaseException | None) -> None:
        """Complete ``outer`` after the configured latency (on a timer, never blocking the inner
        transport's completion thread)."""
        def complete() -> None:
            with self._lock:
                self._timers.discard(timer)
            try:
                if error is None:
                    outer.set_result(None)
                else:
                    outer.set_exception(error)
            except InvalidStateError:
                pass  # the caller cancelled it, or close() delivered it already

        if not self._faults.latency:
            timer = None
            complete()
            return
        timer = threading.Timer(self._faults.latency, complete)
        timer.daemon = True
        with self._lock:
            self._timers.add(timer)
        timer.start()


@hookimpl
def register_tiers(register: Register) -> None:
    """Register the faulty tier wrapper."""
    register(FaultyTier)


@hookimpl
def register_transports(register: Register) -> None:
    """Register the faulty transport wrapper."""
    register(FaultyTransport)
