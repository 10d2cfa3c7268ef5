"""The local fast path (local_rpc.py) against real daemon processes: a client on the daemon's
machine sends Save/Query/Release/Health/Load over its Unix socket, every other client keeps using
gRPC, the socket file is created private, replaced when stale, refused when live, and removed at stop."""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct

import grpc
import pytest

from pegaflow_core._proto import pegaflow_pb2 as pb
from pegaflow_core._proto import pegaflow_pb2_grpc as pb_grpc
from pegaflow_core.client import PegaflowClient
from pegaflow_core.errors import DaemonUnavailable, NotFound, PegaflowError
from pegaflow_core.launcher import DaemonProcess, free_port
from pegaflow_core.sim_engine import SimulatedEngine, block_hashes

from daemon_helpers import SMALL, dram_config

HASHES = block_hashes(list(range(16 * 6)), 16)


class _Recorder(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """The names of the unary and server-streaming RPCs that went over gRPC."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        self.methods.append(details.method.rsplit("/", 1)[-1])
        return continuation(details, request)

    intercept_unary_stream = intercept_unary_unary


def recording(client: PegaflowClient) -> _Recorder:
    recorder = _Recorder()
    client._stub = pb_grpc.PegaflowStub(grpc.intercept_channel(client._channel, recorder))
    return recorder


def one_step(client: PegaflowClient, engine: SimulatedEngine) -> None:
    """What an engine sends per step, checked for the right answers."""
    first = client.save(engine.handle, engine.allocate(6), HASHES)
    assert first.stored + first.already_present == 6
    assert client.save(engine.handle, engine.allocate(6), HASHES).already_present == 6
    hit = client.query(engine.handle, HASHES)
    assert hit.hit_blocks == 6
    load = client.load(engine.handle, hit.lease_id, engine.allocate(6), release_after=False)
    load.wait_layer(0)  # layer by layer, as over gRPC
    result = load.wait()
    assert not result.failed_block_ids and result.bytes == 6 * SMALL.block_bytes
    assert client.release([hit.lease_id]) == 1
    assert client.health().status == "serving"


def socket_config(path: str | None, port: int | None = None) -> str:
    listen = f"listen: '127.0.0.1:{port}', " if port else ""
    return dram_config() + f"server: {{{listen}local_socket: {path if path else 'null'}}}\n"


def test_a_client_on_the_daemons_machine_uses_its_socket(client, make_engine):
    engine = make_engine(model="local")
    path = client.health().local_socket
    assert path and client.local_socket == path
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600  # this user only
    recorder = recording(client)
    one_step(client, engine)
    assert recorder.methods == []  # none of the step's calls went over gRPC
    client.stats()
    assert recorder.methods == ["Stats"]  # the rest still does


def test_a_client_that_does_not_use_the_socket_gets_the_same_answers_over_grpc(grpc_client, make_engine):
    engine = make_engine(model="remote", on=grpc_client)
    recorder = recording(grpc_client)
    one_step(grpc_client, engine)
    assert grpc_client.local_socket is None
    assert recorder.methods == ["Save", "Save", "Query", "Load", "Release", "Health"]


def test_errors_over_the_socket_are_the_grpc_ones(client, make_engine):
    engine = make_engine(model="errors")
    assert client.local_socket
    with pytest.raises(PegaflowError, match=r"save: block_ids has 2 entries but block_hashes has 6"):
        client.save(engine.handle, [0, 1], HASHES)
    with pytest.raises(NotFound, match=r"query: unknown context 'nope'"):
        client._call("Query", pb.QueryRequest(context_id="nope", block_hashes=HASHES), "query")
    with pytest.raises(NotFound, match=r"load: unknown or expired lease 'nope'"):
        client.load(engine.handle, "nope", [0]).wait()
    one_step(client, engine)  # the connection that carried the failed load serves again


def test_a_socket_of_another_daemon_is_not_used(tmp_path):
    """A remote daemon's socket path may exist on this machine too, served by this machine's
    daemon: the client checks which daemon answers there before it sends anything."""
    a_path, b_path = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    with DaemonProcess(socket_config(a_path), workdir=workdir(tmp_path, "a")) as a, \
            DaemonProcess(socket_config(b_path), workdir=workdir(tmp_path, "b")) as b, \
            PegaflowClient(a.endpoint, timeout_s=5) as client:
        engine = SimulatedEngine(client, SMALL, model="other")
        assert client.local_socket == a_path
        client._use_local(b_path, client.health().daemon_id)  # as if a's socket were b_path
        assert client.local_socket is None
        one_step(client, engine)  # over gRPC, to a
        assert PegaflowClient(b.endpoint).health().daemon_id != client.health().daemon_id
        engine.close()


def test_a_daemon_without_a_socket_serves_everyone_over_grpc(tmp_path):
    with DaemonProcess(socket_config(None), workdir=tmp_path) as d, PegaflowClient(d.endpoint, timeout_s=5) as client:
        engine = SimulatedEngine(client, SMALL, model="none")
        assert client.health().local_socket == "" and client.local_socket is None
        one_step(client, engine)
        engine.close()


def workdir(tmp_path, name: str):  # type: ignore[no-untyped-def]
    path = tmp_path / name
    path.mkdir()
    return path


def stale_socket(path: str) -> None:
    """A socket file nobody listens on: what a daemon killed with -9 leaves."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()


def test_a_stale_socket_is_replaced_and_the_file_removed_at_stop(tmp_path):
    path = str(tmp_path / "rpc.sock")
    stale_socket(path)
    stale_inode = os.stat(path).st_ino
    with DaemonProcess(socket_config(path), workdir=workdir(tmp_path, "d")) as d, PegaflowClient(d.endpoint, timeout_s=5) as client:
        engine = SimulatedEngine(client, SMALL, model="stale")
        assert client.local_socket == path and os.stat(path).st_ino != stale_inode
        one_step(client, engine)
        engine.close()
    assert not os.path.exists(path)


def test_auto_sockets_of_killed_daemons_are_reaped(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    stale_socket(str(state / "rpc-127.0.0.1-1.sock"))
    config = dram_config() + f"server: {{state_dir: '{state}'}}\n"
    with DaemonProcess(config, workdir=workdir(tmp_path, "d")) as d, PegaflowClient(d.endpoint, timeout_s=5) as client:
        port = d.endpoint.rpartition(":")[2]
        assert client.health().local_socket == str(state / f"rpc-127.0.0.1-{port}.sock")
        assert sorted(os.listdir(state)) == [f"rpc-127.0.0.1-{port}.sock"]


def test_a_live_socket_or_a_plain_file_is_never_taken_over(tmp_path):
    path = str(tmp_path / "rpc.sock")
    with DaemonProcess(socket_config(path), workdir=workdir(tmp_path, "a")):
        with pytest.raises(PegaflowError, match=r"server\.local_socket: cannot serve the local socket: .*rpc\.sock: "
                                                r"another daemon is serving on this socket"):
            DaemonProcess(socket_config(path), workdir=workdir(tmp_path, "b")).start()
    plain = tmp_path / "plain"
    plain.write_text("keep me")
    with pytest.raises(PegaflowError, match=r"plain exists and is not a socket: remove it or set server\.local_socket"):
        DaemonProcess(socket_config(str(plain)), workdir=workdir(tmp_path, "c")).start()
    assert plain.read_text() == "keep me"


def test_auto_falls_back_to_grpc_when_the_socket_cannot_be_made(tmp_path):
    state = tmp_path / "state"
    state.write_text("a file where the state directory should be")
    config = dram_config() + f"server: {{state_dir: '{state}'}}\n"
    with DaemonProcess(config, workdir=workdir(tmp_path, "d")) as d, PegaflowClient(d.endpoint, timeout_s=5) as client:
        engine = SimulatedEngine(client, SMALL, model="fallback")
        assert client.local_socket is None
        one_step(client, engine)
        engine.close()
        assert "no local socket (server.local_socket: auto)" in d.log()


def test_a_restarted_daemon_replaces_the_socket_and_the_client_follows(tmp_path):
    config = socket_config(str(tmp_path / "rpc.sock"), port=free_port())
    first = DaemonProcess(config, workdir=tmp_path).start()
    client = PegaflowClient(first.endpoint, timeout_s=2)
    engine = SimulatedEngine(client, SMALL, model="restart")
    try:
        one_step(client, engine)
        first.kill()  # the socket file stays behind
        with pytest.raises(DaemonUnavailable):
            client.save(engine.handle, engine.allocate(6), HASHES)
        assert client.local_socket is None
        second = DaemonProcess(config, workdir=tmp_path).start()
        try:
            assert client.save(engine.handle, engine.allocate(6), HASHES).stored == 6  # registered again
            assert client.local_socket == str(tmp_path / "rpc.sock")
            one_step(client, engine)
        finally:
            engine.close()
            second.close()
    finally:
        client.close()


def test_a_daemon_that_stops_answering_times_out(daemon, client, make_engine):
    engine = make_engine(model="stopped")
    assert client.local_socket
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(DaemonUnavailable, match=r"gave no reply within 0\.3s"):
            client._call("Query", pb.QueryRequest(context_id=engine.handle.context_id, block_hashes=HASHES), "query", 0.3)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    one_step(client, engine)  # a fresh connection: the late reply never answers another call


def raw_call(path: str, frame: bytes) -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(frame)
        length, status = struct.unpack("<IB", sock.recv(5, socket.MSG_WAITALL))
        return status, sock.recv(length, socket.MSG_WAITALL)


def test_malformed_frames_get_precise_errors(client, make_engine):
    make_engine(model="frames")
    path = client.local_socket
    status, text = raw_call(path, struct.pack("<IB", 0, 99))
    assert status == grpc.StatusCode.UNIMPLEMENTED.value[0] and text == b"unknown local method id 99"
    status, text = raw_call(path, struct.pack("<IB", 3, 2) + b"\xff\xff\xff")
    assert status == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert text.startswith(b"Save: the request is not a valid SaveRequest")
    status, text = raw_call(path, struct.pack("<IB", 1 << 30, 2))
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert text == b"request of 1073741824 bytes exceeds the limit of 67108864"
    status, text = raw_call(path, struct.pack("<IB", 0, 1))
    assert status == 0 and pb.HealthResponse.FromString(text).local_socket == path
