"""The connection-setup channel: a small TCP service per endpoint that makes queue pairs for peers.

Owner side (``ControlServer``): one thread per peer connection answers ``connect`` requests with a
fresh RC queue pair on the matching NIC, brought to RTS towards the peer's, and destroys that
peer's queue pairs when the connection closes. Requester side (``dial``, ``open_lane``): called
from the engine's connector threads, never from the engine itself, since they block on the network.
No data moves here: transfers are one-sided READ/WRITE on the queue pairs.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any

from pegaflow_core.errors import TransportError

from . import protocol as P
from .verbs import Nic

log = logging.getLogger("pegaflow.rdma")
_STOP_TIMEOUT_S = 2.0


@dataclass
class Lane:
    """One connected RC queue pair from a local NIC to a peer's NIC: the unit work requests are
    striped over. Engine-thread state (``outstanding``, ``broken``) lives here too."""

    nic: Nic
    remote_nic: int
    qp: Any
    peer: Any = None
    outstanding: int = 0
    broken: bool = False
    reason: str = ""
    progress: float = 0.0  # monotonic time of the last completion (or of the first post after idle)

    @property
    def qpn(self) -> int:
        return self.qp.qp_num


class ControlServer:
    def __init__(self, host: str, port: int, nics: list[Nic], nonce: int, lock: threading.Lock) -> None:
        self.nics = nics
        self.nonce = nonce
        self._verbs_lock = lock  # QP creation and destruction, shared with the connector threads
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()
        self._closed = False
        try:
            self._listener = socket.create_server((host, port), backlog=64)
        except OSError as exc:
            raise TransportError(f"rdma: cannot listen on {host}:{port} for connection set-up: {exc.strerror or exc}") from None
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"pegaflow-rdma-listen-{self.port}", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._connections.add(sock)
                handler = threading.Thread(target=self._serve, args=(sock,), name=f"pegaflow-rdma-peer-{self.port}",
                                           daemon=True)
                self._handlers.add(handler)
            handler.start()

    def _serve(self, sock: socket.socket) -> None:
        qps: dict[int, Any] = {}
        try:
            hello = P.recv_message(sock)
            if hello is None:
                return
            if hello.get("type") != "hello" or hello.get("version") != P.VERSION:
                P.send_message(sock, {"type": "error", "message": f"expected a version {P.VERSION} hello, got {hello!r}"})
                return
            P.send_message(sock, {"type": "hello", "version": P.VERSION, "nonce": self.nonce, "nics": len(self.nics)})
            while True:
                message = P.recv_message(sock)
                if message is None:
                    return
                if message.get("type") != "connect":
                    P.send_message(sock, {"type": "error", "message": f"unexpected message {message.get('type')!r}"})
                    return
                try:
                    answer = self._accept_qp(message, qps)
                except (TransportError, P.ProtocolError) as exc:
                    answer = {"type": "error", "message": str(exc)}
                P.send_message(sock, answer)
        except (OSError, P.ProtocolError) as exc:
            if not self._closed:
                log.debug("rdma: control connection ended: %s", exc)
        finally:
            with self._verbs_lock:
                for qp in qps.values():
                    qp.close()
            with self._lock:
                self._connections.discard(sock)
                self._handlers.discard(threading.current_thread())
            sock.close()

    def _accept_qp(self, message: dict[str, Any], qps: dict[int, Any]) -> dict[str, Any]:
        remote = P.QpInfo.from_json(message.get("qp") or {})
        index = message.get("nic")
        if not isinstance(index, int) or index < 0:
            raise P.ProtocolError(f"connect without a NIC index: {message!r}")
        nic = self.nics[index % len(self.nics)]
        with self._verbs_lock:
            old = qps.pop(message.get("replaces"), None) if message.get("replaces") is not None else None
            if old is not None:
                old.close()
            qp, psn = nic.create_qp()
            try:
                nic.connect_qp(qp, psn, remote)
            except TransportError:
                qp.close()
                raise
            qps[qp.qp_num] = qp
        return {"type": "accept", "qp": nic.info(qp, psn).to_json()}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections = list(self._connections)
            handlers = list(self._handlers)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the peer sees EOF: its transfers to us fail at once
            except OSError:
                pass
        self._thread.join(_STOP_TIMEOUT_S)
        for handler in handlers:
            handler.join(_STOP_TIMEOUT_S)


# -- requester side (connector threads) ------------------------------------------------------------
def dial(address: str, host: str, port: int, nonce: int, timeout_s: float) -> tuple[socket.socket, int, int]:
    """Open the control connection to ``address``: ``(socket, peer nonce, peer NIC count)``."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError:
        raise TransportError(f"cannot connect to {address}: connection refused (no pegaflow rdma endpoint listens there)") from None
    except TimeoutError:
        raise TransportError(f"cannot connect to {address}: timed out after {timeout_s:g} s") from None
    except OSError as exc:
        raise TransportError(f"cannot connect to {address}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        P.send_message(sock, {"type": "hello", "version": P.VERSION, "nonce": nonce})
        hello = P.recv_message(sock)
        if hello is None or hello.get("type") != "hello":
            raise P.ProtocolError(f"expected a hello, got {hello!r}")
        peer_nonce, nics = hello.get("nonce"), hello.get("nics")
        if not isinstance(peer_nonce, int) or not isinstance(nics, int) or nics < 1:
            raise P.ProtocolError(f"malformed hello {hello!r}")
        return sock, peer_nonce, nics
    except TimeoutError:
        sock.close()
        raise TransportError(f"cannot connect to {address}: no answer to the connection set-up within {timeout_s:g} s") from None
    except (OSError, P.ProtocolError) as exc:
        sock.close()
        raise TransportError(f"cannot connect to {address}: connection set-up failed ({exc}); is it a pegaflow rdma endpoint?") from None


def open_lane(sock: socket.socket, address: str, nic: Nic, remote_nic: int, lock: threading.Lock,
              replaces: int | None = None) -> Lane:
    """Make a queue pair on ``nic``, have the peer make its twin on its NIC ``remote_nic``, and
    connect both; ``replaces`` names a broken queue pair of ours whose twin the peer drops."""
    with lock:
        qp, psn = nic.create_qp()
    try:
        message: dict[str, Any] = {"type": "connect", "nic": remote_nic, "qp": nic.info(qp, psn).to_json()}
        if replaces is not None:
            message["replaces"] = replaces
        P.send_message(sock, message)
        answer = P.recv_message(sock)
        if answer is None:
            raise TransportError(f"{address} closed the control connection during queue-pair set-up")
        if answer.get("type") == "error":
            raise TransportError(f"{address} refused a queue pair: {answer.get('message')}")
        if answer.get("type") != "accept":
            raise P.ProtocolError(f"expected accept, got {answer!r}")
        remote = P.QpInfo.from_json(answer.get("qp") or {})
        with lock:
            nic.connect_qp(qp, psn, remote)
        return Lane(nic, remote_nic, qp)
    except TimeoutError:
        _close(qp, lock)
        raise TransportError(f"{address} did not answer the queue-pair set-up in time") from None
    except (OSError, P.ProtocolError) as exc:
        _close(qp, lock)
        raise TransportError(f"queue-pair set-up with {address} failed: {exc}") from None
    except BaseException:
        _close(qp, lock)
        raise


def _close(qp: Any, lock: threading.Lock) -> None:
    with lock:
        try:
            qp.close()
        except Exception:
            pass
