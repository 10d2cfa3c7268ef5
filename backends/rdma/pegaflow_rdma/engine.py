"""The engine: one thread that posts every work request and polls every completion of a transport.

Callers only queue batches and wait on futures; the event loop of the daemon never touches verbs.
The thread sleeps in ``select`` on the NICs' completion channels, a wake-up eventfd and the peers'
control connections, so an idle transport costs no CPU.

Per peer the engine keeps a queue of work requests and a set of lanes (RC queue pairs, one or more
per NIC). Posting deals queued requests round-robin over the lanes with room, a chain per lane per
round, so a batch is striped over every NIC and queue pair and keeps up to ``queue_depth`` requests
in flight on each.

Failures and recovery:

* a completion with an error puts its queue pair in the error state (the device flushes the rest);
  the lane is retired and, once all its requests are back, replaced by a fresh queue pair made over
  the control connection. Requests flushed through no fault of their own are posted again on the
  other lanes or the replacement (READ and WRITE are idempotent);
* "retry exceeded" (no answer from the peer) is posted again ``resubmits`` times, on a fresh lane;
  an access error (region deregistered, stale key) fails its batch at once;
* a batch past its deadline fails with TransportError, and the lanes carrying it are broken first,
  so once its future fails no byte of it can still land in the caller's memory;
* the peer's control connection closing means the peer is gone: its batches fail at once.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import select
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pegaflow_core.errors import ClosedError, TransportError

from . import control
from .options import RdmaOptions
from .plan import WorkRequest
from .verbs import Nic

log = logging.getLogger("pegaflow.rdma")

READ, WRITE = "read", "write"
CHAIN = 32  # work requests per ibv_post_send call (one doorbell)
POLL = 64  # completions per poll call
FLUSH_GRACE_S = 2.0  # after a failure, how long we wait for the device to flush before giving up on it
NO_CHANNEL_POLL_S = 0.0005  # poll period when a NIC's completion channel descriptor is unknown

# ibv_wc_status values (stable in the verbs ABI)
WC_SUCCESS, WC_LOC_PROT_ERR, WC_WR_FLUSH_ERR, WC_LOC_ACCESS_ERR = 0, 4, 5, 8
WC_REM_INV_REQ_ERR, WC_REM_ACCESS_ERR, WC_REM_OP_ERR, WC_RETRY_EXC_ERR, WC_RNR_RETRY_EXC_ERR = 9, 10, 11, 12, 13
_STATUS_NAMES = {1: "LOC_LEN_ERR", 2: "LOC_QP_OP_ERR", 4: "LOC_PROT_ERR", 5: "WR_FLUSH_ERR", 7: "BAD_RESP_ERR",
                 8: "LOC_ACCESS_ERR", 9: "REM_INV_REQ_ERR", 10: "REM_ACCESS_ERR", 11: "REM_OP_ERR",
                 12: "RETRY_EXC_ERR", 13: "RNR_RETRY_EXC_ERR", 21: "GENERAL_ERR"}


@dataclass(eq=False)
class Batch:
    """One read() or write() call: done when every work request completed, or failed (then only
    once none of its requests is still on a queue pair)."""

    op: str
    future: Future[None]
    deadline: float
    timeout_s: float
    pending: int  # work requests not yet completed successfully
    what: str
    inflight: int = 0
    error: BaseException | None = None
    done: bool = False


@dataclass(eq=False)
class Peer:
    address: str
    host: str
    port: int
    state: str = "connecting"  # -> "ready" -> "dead"
    sock: socket.socket | None = None
    nonce: int = 0
    nics: int = 0
    lanes: list[control.Lane] = field(default_factory=list)
    queue: collections.deque = field(default_factory=collections.deque)  # (WorkRequest, Batch)
    waiters: list[Future[None]] = field(default_factory=list)
    busy: bool = False  # a connector thread is using the control connection
    error: BaseException | None = None
    turn: int = 0  # round-robin start over lanes


class Engine:
    def __init__(self, nics: list[Nic], options: RdmaOptions, nonce: int, verbs_lock: threading.Lock) -> None:
        from pyverbs.wr import SGE, SendWR
        import pyverbs.enums as e

        self._SGE, self._SendWR = SGE, SendWR
        self._opcodes = {READ: e.IBV_WR_RDMA_READ, WRITE: e.IBV_WR_RDMA_WRITE}
        self._signaled = e.IBV_SEND_SIGNALED
        self.nics = nics
        self.options = options
        self.nonce = nonce
        self._verbs_lock = verbs_lock
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._peers: dict[str, Peer] = {}
        self._inflight: dict[int, tuple[WorkRequest, Batch, control.Lane]] = {}
        self._batches: set[Batch] = set()
        self._dying: list[control.Lane] = []  # lanes of dead peers, destroyed once flushed
        self._wr_ids = itertools.count(1)
        self._stopping = False
        self.dead: BaseException | None = None  # why the engine thread stopped by itself, if it did
        self.counters = collections.Counter()  # qp_errors, lanes_replaced, resubmitted, timeouts, stalls
        # A lane with requests out and no completion for this long is wedged: longer than the NIC's
        # own retries of a lost packet (4.096 us * 2^ack_timeout per try, retry_cnt + 1 tries).
        retries_s = 4.096e-6 * (1 << options.ack_timeout) * (options.retry_cnt + 1)
        self.stall_s = options.stall_timeout or max(3.0, 2 * retries_s)
        self._connector = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pegaflow-rdma-connect")
        self._thread = threading.Thread(target=self._run, name="pegaflow-rdma-engine", daemon=True)
        self._thread.start()

    # -- any thread ------------------------------------------------------------------------------
    def submit(self, batch: Batch, work: dict[str, tuple[str, int, list[WorkRequest]]]) -> None:
        self._command("submit", batch, work)

    def connect(self, address: str, host: str, port: int, timeout_s: float) -> Future[None]:
        future: Future[None] = Future()
        self._command("connect", address, host, port, future, time.monotonic() + timeout_s)
        return future

    def break_lanes(self, address: str) -> Future[int]:
        future: Future[int] = Future()
        self._command("break", address, future)
        return future

    def stop(self) -> None:
        if self.dead is None:
            self._commands.put(("stop",))
            os.eventfd_write(self._wake_fd, 1)
        self._thread.join(FLUSH_GRACE_S + 3)
        self._connector.shutdown(wait=False, cancel_futures=True)
        os.close(self._wake_fd)

    def _command(self, *command: Any) -> None:
        if self.dead is not None:
            raise self.dead
        self._commands.put(command)
        os.eventfd_write(self._wake_fd, 1)

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self._handle_commands()
                if self._stopping:
                    break
                self._poll()
                self._post()
                self._expire()
                self._recycle()
                self._wait()
            self._shutdown()
        except BaseException as exc:  # a bug or a dead device: fail every caller instead of hanging them
            log.exception("rdma: engine stopped")
            self._fail_everything(TransportError(f"rdma: the transfer engine stopped: {type(exc).__name__}: {exc}"))

    def _handle_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            kind = command[0]
            if kind == "submit":
                self._accept(command[1], command[2])
            elif kind == "connect":
                _, address, host, port, future, deadline = command
                peer = self._peer(address, host, port, deadline)
                if peer.state == "ready":
                    future.set_result(None)
                else:
                    peer.waiters.append(future)
            elif kind == "connected":
                self._connected(command[1], command[2])
            elif kind == "replaced":
                self._replaced(command[1], command[2])
            elif kind == "break":
                _, address, future = command
                peer = self._peers.get(address)
                if peer is None or peer.state != "ready":
                    future.set_exception(TransportError(f"no connection to {address}"))
                else:
                    lanes = [lane for lane in peer.lanes if not lane.broken]
                    for lane in lanes:
                        self._break(lane, "forced into the error state (break_connections)")
                    future.set_result(len(lanes))
            elif kind == "stop":
                self._stopping = True

    def _accept(self, batch: Batch, work: dict[str, tuple[str, int, list[WorkRequest]]]) -> None:
        self._batches.add(batch)
        for address, (host, port, wrs) in work.items():
            peer = self._peer(address, host, port, batch.deadline)
            if peer.state == "ready" and not self._same_endpoint(peer, wrs, batch):
                continue
            peer.queue.extend((wr, batch) for wr in wrs)

    def _same_endpoint(self, peer: Peer, wrs: list[WorkRequest], batch: Batch) -> bool:
        for wr in wrs:
            if wr.remote.nonce != peer.nonce:
                self._fail(batch, TransportError(
                    f"ops[{wr.index}]: the descriptor of region {wr.remote.region_id} is from an endpoint that no "
                    f"longer exists; {peer.address} is now another endpoint (ask the peer for a fresh descriptor)"))
                return False
        return True

    def _peer(self, address: str, host: str, port: int, deadline: float) -> Peer:
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = Peer(address, host, port)
            timeout_s = max(0.05, min(self.options.timeout, deadline - time.monotonic()))
            peer.busy = True
            self._connector.submit(self._dial, peer, timeout_s)
        return peer

    def _dial(self, peer: Peer, timeout_s: float) -> None:  # connector thread
        sock = None
        lanes: list[control.Lane] = []
        try:
            sock, nonce, nics = control.dial(peer.address, peer.host, peer.port, self.nonce, timeout_s)
            for _ in range(self.options.qps_per_nic):
                for nic in self.nics:
                    lanes.append(control.open_lane(sock, peer.address, nic, nic.index, self._verbs_lock))
            sock.settimeout(None)
            result: Any = (sock, nonce, nics, lanes)
        except BaseException as exc:
            with self._verbs_lock:
                for lane in lanes:
                    lane.qp.close()
            if sock is not None:
                sock.close()
            result = exc if isinstance(exc, TransportError) else TransportError(f"cannot connect to {peer.address}: {exc}")
        self._command("connected", peer, result)

    def _connected(self, peer: Peer, result: Any) -> None:
        peer.busy = False
        if isinstance(result, BaseException):
            self._kill(peer, result)
            return
        peer.sock, peer.nonce, peer.nics, peer.lanes = result
        for lane in peer.lanes:
            lane.peer = peer
        if self._stopping or self._peers.get(peer.address) is not peer:
            self._kill(peer, ClosedError("transport closed"))
            return
        peer.state = "ready"
        for waiter in peer.waiters:
            waiter.set_result(None)
        peer.waiters.clear()
        queued, peer.queue = peer.queue, collections.deque()
        by_batch: dict[Batch, list[WorkRequest]] = {}
        for wr, batch in queued:
            by_batch.setdefault(batch, []).append(wr)
        for batch, wrs in by_batch.items():
            if batch.error is None and self._same_endpoint(peer, wrs, batch):
                peer.queue.extend((wr, batch) for wr in wrs)

    def _replace(self, peer: Peer, broken: list[tuple[Nic, int, int]]) -> None:  # connector thread
        lanes: list[control.Lane] = []
        try:
            peer.sock.settimeout(self.options.timeout)
            for nic, remote_nic, old_qpn in broken:
                lanes.append(control.open_lane(peer.sock, peer.address, nic, remote_nic, self._verbs_lock, replaces=old_qpn))
            peer.sock.settimeout(None)
            result: Any = lanes
        except BaseException as exc:
            with self._verbs_lock:
                for lane in lanes:
                    lane.qp.close()
            result = exc if isinstance(exc, TransportError) else TransportError(f"{peer.address}: {exc}")
        self._command("replaced", peer, result)

    def _replaced(self, peer: Peer, result: Any) -> None:
        peer.busy = False
        if isinstance(result, BaseException):
            self._kill(peer, TransportError(f"{peer.address}: replacing a failed queue pair failed: {result}"))
            return
        for lane in result:
            lane.peer = peer
        if peer.state != "ready":
            with self._verbs_lock:
                for lane in result:
                    lane.qp.close()
            return
        peer.lanes.extend(result)
        self.counters["lanes_replaced"] += len(result)

    # -- posting -----------------------------------------------------------------------------------
    def _post(self) -> None:
        for peer in list(self._peers.values()):
            if peer.state != "ready" or not peer.queue:
                continue
            lanes = [lane for lane in peer.lanes if not lane.broken]
            if not lanes:
                continue  # a replacement is on its way
            n = len(lanes)
            start = peer.turn % n
            lanes = lanes[start:] + lanes[:start]
            peer.turn += 1
            rooms = [max(0, lane.nic.depth - lane.outstanding) for lane in lanes]
            chains: list[list[tuple[WorkRequest, Batch]]] = [[] for _ in lanes]
            i = 0
            while peer.queue:
                for k in range(n):  # the next lane with room on its queue pair and on its NIC's CQ
                    j = (i + k) % n
                    if rooms[j] and lanes[j].nic.outstanding < lanes[j].nic.cq_entries:
                        break
                else:
                    break
                wr, batch = peer.queue.popleft()
                if batch.done or batch.error is not None:
                    continue
                chains[j].append((wr, batch))
                rooms[j] -= 1
                lanes[j].nic.outstanding += 1  # reserve CQ room; _post_chain accounts for real
                i = j + 1
            for lane, chain in zip(lanes, chains):
                for lo in range(0, len(chain), CHAIN):
                    self._post_chain(lane, chain[lo : lo + CHAIN])

    def _post_chain(self, lane: control.Lane, chain: list[tuple[WorkRequest, Batch]]) -> None:
        lane.nic.outstanding -= len(chain)  # the reservation made in _post
        if lane.broken:
            self._requeue(lane.peer, chain)
            return
        nic_index = lane.nic.index
        sends, ids = [], []
        for wr, batch in chain:
            sges = [self._SGE(region.addr + offset, length, region.lkey(nic_index, offset))
                    for region, offset, length in wr.sges]
            wr_id = next(self._wr_ids)
            send = self._SendWR(wr_id=wr_id, opcode=self._opcodes[batch.op], num_sge=len(sges), sg=sges,
                                send_flags=self._signaled)
            send.set_wr_rdma(wr.remote.rkey(lane.remote_nic, wr.remote_offset), wr.remote.addr + wr.remote_offset)
            for sge in sges:
                sge.close()  # copied into the WR (pyverbs frees it only in close())
            sends.append(send)
            ids.append(wr_id)
        for a, b in zip(sends, sends[1:]):
            a.next_wr = b
        posted = len(chain)
        try:
            lane.qp.post_send(sends[0])
        except Exception as exc:
            # ibv_post_send stops at the first request it refuses; those before it are posted. We
            # cannot read which one it was back from pyverbs safely, so we treat the whole chain as
            # not posted only when the lane is dead anyway: retire it and let its flush sort it out.
            posted = 0
            log.warning("rdma: posting to %s on %s failed (%s); replacing the queue pair", lane.peer.address,
                        lane.nic.port.device, exc)
            self._break(lane, f"ibv_post_send failed: {exc}")
            self._requeue(lane.peer, chain)
        finally:
            for send in sends:
                send.close()
        for (wr, batch), wr_id in zip(chain[:posted], ids):
            self._inflight[wr_id] = (wr, batch, lane)
            batch.inflight += 1
        self.counters["posted"] += posted
        if posted and not lane.outstanding:
            lane.progress = time.monotonic()  # the stall watchdog's clock starts with the first request
        lane.outstanding += posted
        lane.nic.outstanding += posted

    def _requeue(self, peer: Peer, items: list[tuple[WorkRequest, Batch]]) -> None:
        if peer.state == "dead":
            for _, batch in items:
                self._fail(batch, peer.error or TransportError(f"{peer.address} is gone"))
            return
        peer.queue.extendleft(reversed(items))

    # -- completions -------------------------------------------------------------------------------
    def _poll(self) -> None:
        for nic in self.nics:
            while nic.outstanding > 0:
                count, completions = nic.cq.poll(POLL)
                for wc in completions:
                    self._complete(wc.wr_id, wc.status, wc.vendor_err)
                if count < POLL:
                    break

    def _complete(self, wr_id: int, status: int, vendor_err: int) -> None:
        entry = self._inflight.pop(wr_id, None)
        if entry is None:
            return
        wr, batch, lane = entry
        lane.progress = time.monotonic()
        lane.outstanding -= 1
        lane.nic.outstanding -= 1
        batch.inflight -= 1
        if status == WC_SUCCESS:
            batch.pending -= 1
        else:
            self._on_error(wr, batch, lane, status, vendor_err)
        self._settle(batch)

    def _on_error(self, wr: WorkRequest, batch: Batch, lane: control.Lane, status: int, vendor_err: int) -> None:
        peer = lane.peer
        name = _STATUS_NAMES.get(status, f"status {status}")
        if status != WC_WR_FLUSH_ERR:
            self.counters["qp_errors"] += 1
        if not lane.broken:
            self._break(lane, name)
        if batch.done or batch.error is not None:
            return
        if peer.state == "dead":
            self._fail(batch, peer.error or TransportError(f"{peer.address} is gone"))
        elif status == WC_WR_FLUSH_ERR:  # an innocent bystander of another request's failure
            self.counters["resubmitted"] += 1
            self._requeue(peer, [(wr, batch)])
        elif status in (WC_RETRY_EXC_ERR, WC_RNR_RETRY_EXC_ERR) and wr.resubmits < self.options.resubmits:
            wr.resubmits += 1
            self.counters["resubmitted"] += 1
            self._requeue(peer, [(wr, batch)])
        else:
            self._fail(batch, TransportError(self._explain(wr, batch, peer, name, status, vendor_err)))

    def _explain(self, wr: WorkRequest, batch: Batch, peer: Peer, name: str, status: int, vendor_err: int) -> str:
        where = f"ops[{wr.index}]"
        region = f"region {wr.remote.region_id} at {peer.address}"
        if status == WC_REM_ACCESS_ERR:
            return f"{where}: {region} refused access ({name}): it was deregistered, or the descriptor is stale"
        if status == WC_REM_INV_REQ_ERR:
            return f"{where}: {region} refused the request as invalid ({name})"
        if status in (WC_LOC_PROT_ERR, WC_LOC_ACCESS_ERR):
            return f"{where}: the local region is not registered any more ({name}); was it deregistered mid-transfer?"
        if status in (WC_RETRY_EXC_ERR, WC_RNR_RETRY_EXC_ERR):
            return (f"{where}: no answer from {peer.address} over RDMA ({name}, after {wr.resubmits + 1} tries): the peer "
                    "is down or unreachable on this fabric (check GIDs, routing and PFC/ECN)")
        return f"{where}: {batch.op} from {region} failed: {name} (vendor error {vendor_err:#x})"

    def _settle(self, batch: Batch) -> None:
        if batch.done:
            return
        if batch.error is not None:
            if batch.inflight == 0:
                self._finish(batch, batch.error)
        elif batch.pending == 0:
            self._finish(batch, None)

    def _finish(self, batch: Batch, error: BaseException | None) -> None:
        batch.done = True
        self._batches.discard(batch)
        if error is None:
            batch.future.set_result(None)
        else:
            batch.future.set_exception(error)

    def _fail(self, batch: Batch, error: BaseException) -> None:
        if batch.error is None and not batch.done:
            batch.error = error
        self._settle(batch)

    def _break(self, lane: control.Lane, reason: str) -> None:
        lane.broken = True
        lane.reason = reason
        lane.nic.break_qp(lane.qp)

    # -- time, recovery, peers ---------------------------------------------------------------------
    def _expire(self) -> None:
        if not self._batches:
            return
        now = time.monotonic()
        for peer in self._peers.values():
            for lane in peer.lanes:
                if lane.outstanding and not lane.broken and now - lane.progress > self.stall_s:
                    # The NIC retries a lost packet by itself (ack_timeout x retry_cnt) and then fails
                    # the request; a queue pair silent for longer is wedged (soft-RoCE does this to
                    # the first queue pair of a device now and then): flush it, move its requests.
                    self.counters["stalls"] += 1
                    log.warning("rdma: no completion from %s on %s for %.1f s; replacing queue pair %d",
                                peer.address, lane.nic.port.device, now - lane.progress, lane.qpn)
                    self._break(lane, f"stalled: no completion for {now - lane.progress:.1f} s")
        for batch in list(self._batches):
            if batch.error is None and now > batch.deadline:
                self.counters["timeouts"] += 1
                log.warning("rdma: %s timed out; %s", batch.what, self.describe())
                self._fail(batch, TransportError(f"{batch.what}: timed out after {batch.timeout_s:g} s"))
                for _, owner, lane in list(self._inflight.values()):
                    if owner is batch and not lane.broken:
                        self._break(lane, "a batch on it timed out")
            elif batch.error is not None and not batch.done and now > batch.deadline + FLUSH_GRACE_S:
                log.error("rdma: the device did not flush %d requests of a failed batch within %g s", batch.inflight,
                          FLUSH_GRACE_S)
                self._finish(batch, batch.error)

    def _recycle(self) -> None:
        for peer in list(self._peers.values()):
            if peer.state != "ready" or peer.busy:
                continue
            done = [lane for lane in peer.lanes if lane.broken and lane.outstanding == 0]
            if not done:
                continue
            peer.lanes = [lane for lane in peer.lanes if lane not in done]
            broken = [(lane.nic, lane.remote_nic, lane.qpn) for lane in done]
            with self._verbs_lock:
                for lane in done:
                    lane.qp.close()
            peer.busy = True
            self._connector.submit(self._replace, peer, broken)
        if self._dying:
            flushed = [lane for lane in self._dying if lane.outstanding == 0]
            if flushed:
                self._dying = [lane for lane in self._dying if lane.outstanding > 0]
                with self._verbs_lock:
                    for lane in flushed:
                        lane.qp.close()

    def _kill(self, peer: Peer, error: BaseException) -> None:
        """The peer is gone (or unreachable): fail what waits for it, retire its lanes."""
        peer.state = "dead"
        peer.error = error
        if self._peers.get(peer.address) is peer:
            del self._peers[peer.address]
        if peer.sock is not None:
            peer.sock.close()
        for _, batch in peer.queue:
            self._fail(batch, error)
        peer.queue.clear()
        for waiter in peer.waiters:
            waiter.set_exception(error)
        peer.waiters.clear()
        for lane in peer.lanes:
            if not lane.broken:
                self._break(lane, str(error))
            self._dying.append(lane)
        peer.lanes = []

    def _wait(self) -> None:
        readable: list[Any] = [self._wake_fd]
        polling = False
        for nic in self.nics:
            if nic.event_fd is not None:
                readable.append(nic.event_fd)
            elif nic.outstanding:
                polling = True
        sockets = {peer.sock: peer for peer in self._peers.values()
                   if peer.state == "ready" and not peer.busy and peer.sock is not None}
        readable.extend(sockets)
        timeout: float | None = None
        if self._batches:
            nearest = min(b.deadline + (FLUSH_GRACE_S if b.error is not None else 0.0) for b in self._batches)
            timeout = min(1.0, max(0.0, nearest - time.monotonic()) + 0.001)
        if self._inflight:
            timeout = min(timeout if timeout is not None else 1.0, self.stall_s / 4)
        if polling:
            timeout = NO_CHANNEL_POLL_S
        ready, _, _ = select.select(readable, [], [], timeout)
        for item in ready:
            if item == self._wake_fd:
                os.eventfd_read(self._wake_fd)
            elif item in sockets:
                self._check_control(sockets[item])
            else:
                for nic in self.nics:
                    if nic.event_fd == item:
                        nic.arm()

    def _check_control(self, peer: Peer) -> None:
        """The owner never speaks unasked: a readable control connection is its end (or garbage)."""
        try:
            data = peer.sock.recv(1, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            data = b""
            log.debug("rdma: control connection to %s: %s", peer.address, exc)
        what = "closed its control connection (closed or crashed)" if not data else "broke the control protocol"
        self._kill(peer, TransportError(f"{peer.address} {what}"))

    def describe(self) -> str:
        """The engine's state in one line, for logs when something times out."""
        nics = ", ".join(f"{n.port.device}: {n.outstanding} outstanding, event fd {n.event_fd}" for n in self.nics)
        peers = []
        for peer in self._peers.values():
            lanes = " ".join(f"[{lane.nic.port.device} qp {lane.qpn} state {_qp_state(lane.qp)} out {lane.outstanding}"
                             f"{' broken: ' + lane.reason if lane.broken else ''}]" for lane in peer.lanes)
            peers.append(f"{peer.address} {peer.state}{' busy' if peer.busy else ''} queue {len(peer.queue)} {lanes}")
        return f"NICs: {nics}; in flight: {len(self._inflight)}; peers: {'; '.join(peers) or 'none'}"

    def _shutdown(self) -> None:
        closed = ClosedError("transport closed")
        for peer in list(self._peers.values()):
            self._kill(peer, closed)
        for batch in list(self._batches):
            self._fail(batch, closed)
        deadline = time.monotonic() + FLUSH_GRACE_S
        while self._inflight and time.monotonic() < deadline:
            self._poll()
            time.sleep(0.001)
        for batch in list(self._batches):
            if not batch.done:
                self._finish(batch, closed)

    def _fail_everything(self, error: BaseException) -> None:
        self.dead = error
        for peer in list(self._peers.values()):
            try:
                self._kill(peer, error)
            except Exception:
                pass
        for batch in list(self._batches):
            if not batch.done:
                self._finish(batch, error)
        self._stopping = True
        while True:  # commands queued before `dead` was set would otherwise wait forever
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            future = {"submit": lambda c: c[1].future, "connect": lambda c: c[4], "break": lambda c: c[2]}.get(command[0])
            if future is not None and not future(command).done():
                future(command).set_exception(error)



def _qp_state(qp: Any) -> str:
    try:
        import pyverbs.enums as e

        attr, _ = qp.query(e.IBV_QP_STATE)
        return {0: "RESET", 1: "INIT", 2: "RTR", 3: "RTS", 4: "SQD", 5: "SQE", 6: "ERR"}.get(attr.qp_state, str(attr.qp_state))
    except Exception as exc:
        return f"? ({exc})"
