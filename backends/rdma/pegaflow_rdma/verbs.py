"""Thin layer over pyverbs: one opened NIC port (context, protection domain, completion channel and
completion queue), memory registration, and RC queue pairs brought from RESET to RTS.

Only the transport's engine and its connection handlers call into here; pyverbs is imported when
the first ``Nic`` is opened, never at plugin import.
"""

from __future__ import annotations

import os
import secrets
import threading
from typing import Any

from pegaflow_core.errors import TransportError

from .devices import Port, import_pyverbs
from .options import RdmaOptions
from .protocol import QpInfo

CQ_ENTRIES = 8192  # per NIC, shared by every QP on it; posting never lets more WRs be outstanding
_CHANNEL_LOCK = threading.Lock()  # serialises completion-channel creation (see _open_channel)


def _verbs() -> Any:
    import_pyverbs()
    import pyverbs.enums as e

    return e


class Nic:
    """One port of one RDMA device, opened for this transport. ``index`` is its position in the
    transport's NIC list, which is how both sides of a connection pair NICs (i with i mod n)."""

    def __init__(self, port: Port, index: int, options: RdmaOptions) -> None:
        e = _verbs()
        from pyverbs.cq import CQ
        from pyverbs.device import Context
        from pyverbs.pd import PD

        self.port = port
        self.index = index
        self.options = options
        try:
            self.ctx = Context(name=port.device)
        except Exception as exc:
            raise TransportError(f"rdma: cannot open {port.device}: {exc}") from None
        try:
            dev = self.ctx.query_device()
            attr = self.ctx.query_port(port.port)
            if attr.state != e.IBV_PORT_ACTIVE:
                raise TransportError(f"rdma: {port} is not ACTIVE")
            self.ethernet = attr.link_layer == e.IBV_LINK_LAYER_ETHERNET
            self.lid = attr.lid
            self.mtu = attr.active_mtu
            self.gid_index, self.gid = self._pick_gid(attr.gid_tbl_len)
            self.max_mr_size = dev.max_mr_size
            self.depth = max(1, min(options.queue_depth, dev.max_qp_wr))
            self.max_sge = max(1, min(options.max_sge, dev.max_sge))
            self.rd_atomic = max(1, min(dev.max_qp_rd_atom, dev.max_qp_init_rd_atom))
            self.cq_entries = max(self.depth, min(CQ_ENTRIES, dev.max_cqe))
            self.pd = PD(self.ctx)
            self.channel, self.event_fd = _open_channel(self.ctx)
            self.cq = CQ(self.ctx, self.cq_entries, None, self.channel, 0)
            self.cq.req_notify()
        except TransportError:
            self.ctx.close()
            raise
        except Exception as exc:
            self.ctx.close()
            raise TransportError(f"rdma: cannot set up {port.device}: {type(exc).__name__}: {exc}") from None
        self.outstanding = 0  # WRs posted on any QP of this NIC and not yet polled (engine thread)

    def __repr__(self) -> str:
        return f"Nic({self.port.device}:{self.port.port}, gid[{self.gid_index}]={self.gid})"

    def _pick_gid(self, table_len: int) -> tuple[int, str]:
        """RoCE: a RoCE v2 GID holding an IPv4 address routes over UDP/IP like the rest of the
        cluster does (NCCL picks the same); else any RoCE v2, else the first. InfiniBand: index 0."""
        e = _verbs()
        wanted = self.options.gid_index
        if wanted >= 0:
            if wanted >= table_len:
                raise TransportError(f"rdma.gid_index: {wanted} is beyond the GID table of {self.port} ({table_len} entries)")
            return wanted, self.ctx.query_gid(self.port.port, wanted).gid
        entries = [g for g in self.ctx.query_gid_table(max(1, table_len)) if g.port_num == self.port.port]
        entries = [g for g in entries if int(g.gid_str().replace(":", ""), 16)]
        if not entries:
            raise TransportError(f"rdma: {self.port} has no GID (RoCE: does its netdev have an IP address?)")
        v2 = [g for g in entries if g.gid_type == e.IBV_GID_TYPE_ROCE_V2]
        ipv4 = [g for g in v2 if g.gid_str().startswith("0000:0000:0000:0000:0000:ffff:")]
        best = (ipv4 or v2 or sorted(entries, key=lambda g: g.gid_index))[0]
        return best.gid_index, best.gid_str()

    # -- memory ------------------------------------------------------------------------------
    def register(self, addr: int, length: int) -> Any:
        from pyverbs.mr import MR

        e = _verbs()
        access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ | e.IBV_ACCESS_REMOTE_WRITE
        try:
            return MR(self.pd, length, access, address=addr)
        except Exception as exc:
            hint = ""
            if "12" in str(exc) or "ENOMEM" in str(exc) or "Cannot allocate" in str(exc):
                hint = " (locked-memory limit: raise `ulimit -l` / LimitMEMLOCK=infinity, see docs/rdma.md)"
            raise TransportError(f"rdma: cannot register {length} bytes on {self.port.device}: {exc}{hint}") from None

    # -- queue pairs ---------------------------------------------------------------------------
    def create_qp(self) -> tuple[Any, int]:
        """A new RC QP in INIT, and the PSN its send queue will start at."""
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr

        e = _verbs()
        cap = QPCap(max_send_wr=self.depth, max_recv_wr=1, max_send_sge=self.max_sge, max_recv_sge=1)
        init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap, sq_sig_all=0)
        attr = QPAttr(port_num=self.port.port)
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ | e.IBV_ACCESS_REMOTE_WRITE
        attr.pkey_index = 0
        try:
            qp = QP(self.pd, init, attr)
        except Exception as exc:
            raise TransportError(f"rdma: cannot create a queue pair on {self.port.device}: {exc}") from None
        return qp, secrets.randbits(24)

    def info(self, qp: Any, psn: int) -> QpInfo:
        return QpInfo(self.gid, self.lid, qp.qp_num, psn, self.mtu, self.rd_atomic)

    def connect_qp(self, qp: Any, psn: int, remote: QpInfo) -> None:
        """INIT -> RTR -> RTS towards ``remote``."""
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        from pyverbs.qp import QPAttr

        rd_atomic = max(1, min(self.rd_atomic, remote.rd_atomic))
        attr = QPAttr(port_num=self.port.port)
        attr.qp_access_flags = 0
        attr.path_mtu = min(self.mtu, remote.mtu)
        attr.dest_qp_num = remote.qpn
        attr.rq_psn = remote.psn
        attr.max_dest_rd_atomic = rd_atomic
        attr.min_rnr_timer = 12
        if self.ethernet:
            route = GlobalRoute(dgid=GID(remote.gid), sgid_index=self.gid_index, hop_limit=64)
            attr.ah_attr = AHAttr(port_num=self.port.port, is_global=1, gr=route)
        else:
            attr.ah_attr = AHAttr(port_num=self.port.port, dlid=remote.lid, is_global=0)
        attr.timeout = self.options.ack_timeout
        attr.retry_cnt = self.options.retry_cnt
        attr.rnr_retry = 7
        attr.sq_psn = psn
        attr.max_rd_atomic = rd_atomic
        try:
            qp.to_rts(attr)
        except Exception as exc:
            raise TransportError(f"rdma: cannot connect a queue pair on {self.port.device} to QP {remote.qpn} "
                                 f"at GID {remote.gid}: {exc}") from None

    def break_qp(self, qp: Any) -> None:
        """Move ``qp`` to ERR: the device stops it and flushes every WR still queued on it (each
        completes with WR_FLUSH_ERR), after which no byte of them moves any more."""
        from pyverbs.qp import QPAttr

        e = _verbs()
        attr = QPAttr()
        attr.qp_state = e.IBV_QPS_ERR
        try:
            qp.modify(attr, e.IBV_QP_STATE)
        except Exception:
            pass  # already in error, or destroyed

    # -- completions ---------------------------------------------------------------------------
    def arm(self) -> None:
        """After an event: consume it and ask for the next one (the engine then polls the CQ, so a
        completion that raced the re-arm is still seen)."""
        if self.event_fd is None:
            return
        self.channel.get_cq_event(self.cq)
        self.cq.ack_events(1)
        self.cq.req_notify()

    def close(self) -> None:
        try:
            self.ctx.close()  # closes QPs, MRs, the CQ, the channel and the PD it owns
        except Exception:
            pass


def _open_channel(ctx: Any) -> tuple[Any, int | None]:
    """A completion channel and its file descriptor. pyverbs does not expose the descriptor, and
    ``get_cq_event`` blocks while holding the GIL, so the engine must only call it once the
    descriptor is readable: we find the descriptor as the ``[infinibandevent]`` one that appeared
    while the channel was created (under a lock, so two channels never race). None when it cannot
    be told; the engine then polls the CQ on a short timer instead."""
    from pyverbs.cq import CompChannel

    with _CHANNEL_LOCK:
        before = _event_fds()
        channel = CompChannel(ctx)
        new = sorted(_event_fds() - before)
    return channel, (new[0] if len(new) == 1 else None)


def _event_fds() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if "infinibandevent" in os.readlink(f"/proc/self/fd/{name}"):
                fds.add(int(name))
        except OSError:
            continue
    return fds
