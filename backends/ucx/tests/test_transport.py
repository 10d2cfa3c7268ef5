"""UCX-specific behaviour beyond the shared contract: options, availability, plugin registration,
address and descriptor checks, timeouts, mismatched error-handling modes, stale descriptors."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pegaflow_core.config import options_from_mapping
from pegaflow_core.errors import ConfigError, InvalidArgument, TransportError
from pegaflow_core.plugins import get_registry
from pegaflow_core.transport import RemoteRegion, TransferOp
from pegaflow_ucx import UcxOptions, UcxTransport
from pegaflow_ucx import protocol as P

needs_ucx = pytest.mark.skipif(not UcxTransport.availability().ok, reason=UcxTransport.availability().detail)


# -- options ----------------------------------------------------------------------------------
def test_options_from_yaml_mapping() -> None:
    options = options_from_mapping(
        UcxOptions, {"tls": "tcp,cma,sm", "seg_size": "1mb", "timeout": "500ms", "net_devices": "lo"},
        file="stack.yaml", path="transport",
    )
    assert options.seg_size == 1 << 20 and options.timeout == 0.5
    assert options.ucx_config() == {"TLS": "tcp,cma,sm", "NET_DEVICES": "lo",
                                    "TCP_TX_SEG_SIZE": str(1 << 20), "TCP_RX_SEG_SIZE": str(1 << 20)}
    assert UcxOptions(seg_size=0).ucx_config() == {}, "defaults must leave every choice to UCX"


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"port": 70000}, r"transport\.port: expected a port 0\.\.65535"),
        ({"tls": "tcp;rm -rf"}, r"transport\.tls: expected a UCX_TLS list"),
        ({"seg_size": "12"}, r"transport\.seg_size: expected a TCP segment size"),
        ({"timeout": 0}, r"transport\.timeout: expected a duration above 0"),
        ({"error_handling": "yes"}, r"transport\.error_handling: expected true or false"),
        ({"tsl": "tcp"}, r"tsl"),
    ],
)
def test_bad_options_name_the_key(mapping, message) -> None:
    with pytest.raises(ConfigError, match=message):
        options_from_mapping(UcxOptions, mapping, file="stack.yaml", path="transport")


def test_options_checked_in_python_too() -> None:
    with pytest.raises(InvalidArgument, match=r"ucx\.host"):
        UcxOptions(host="")
    with pytest.raises(InvalidArgument, match=r"ucx\.port"):
        UcxOptions(port=-1)


# -- plugin and availability --------------------------------------------------------------------
def test_registered_through_the_entry_point() -> None:
    registry = get_registry(reload=True)
    assert registry.get("transport", "ucx") is UcxTransport
    assert "ucx" in registry.kinds("benchmark")


@needs_ucx
def test_availability_names_the_transports() -> None:
    detail = UcxTransport.availability().detail
    assert "UCX 1." in detail and "tcp" in detail
    assert "RDMA" in detail  # either lists them, or says this build has none


# -- argument checks (no peer needed) ------------------------------------------------------------
@pytest.fixture
def endpoint() -> Iterator[UcxTransport]:
    if not UcxTransport.availability().ok:
        pytest.skip(UcxTransport.availability().detail)
    with UcxTransport() as transport:
        yield transport


def test_address_form(endpoint: UcxTransport) -> None:
    assert endpoint.address.startswith("ucx://127.0.0.1:")
    with pytest.raises(InvalidArgument, match=r"expected a UCX address like 'ucx://127\.0\.0\.1:41234'"):
        endpoint.connect("tcp://127.0.0.1:1")


def test_foreign_descriptor_is_invalid(endpoint: UcxTransport) -> None:
    local = endpoint.register(bytearray(64))
    for descriptor, message in ((b"\x00" * 8, "expected a 32-byte UCX region descriptor"),
                                (b"PFLB" + bytes(28), "not a UCX region descriptor")):
        ghost = RemoteRegion("ucx://127.0.0.1:9", descriptor)
        with pytest.raises(InvalidArgument, match=message):
            endpoint.read([TransferOp(local, 0, ghost, 0, 8)])


def test_closed_transport_refuses_work(endpoint: UcxTransport) -> None:
    region = endpoint.register(bytearray(64))
    endpoint.close()
    with pytest.raises(Exception, match="closed"):
        endpoint.register(bytearray(64))
    with pytest.raises(Exception, match="closed"):
        endpoint.read([TransferOp(region, 0, RemoteRegion(endpoint.address, region.descriptor), 0, 8)])


# -- peers --------------------------------------------------------------------------------------
@needs_ucx
def test_silent_peer_times_out() -> None:
    """A TCP listener that accepts and never speaks UCX: connect and transfers end with
    TransportError at their timeout instead of hanging."""
    with socket.create_server(("127.0.0.1", 0)) as silent, UcxTransport() as a:
        accepted: list[socket.socket] = []
        stop = threading.Event()

        def accept() -> None:
            silent.settimeout(0.1)
            while not stop.is_set():
                try:
                    accepted.append(silent.accept()[0])
                except TimeoutError:
                    continue

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            address = f"ucx://127.0.0.1:{silent.getsockname()[1]}"
            started = time.monotonic()
            with pytest.raises(TransportError, match="cannot connect"):
                a.connect(address, timeout_s=1.0)
            assert time.monotonic() - started < 4
            local = a.register(bytearray(64))
            ghost = RemoteRegion(address, P.DESCRIPTOR.pack(P.MAGIC, P.SCHEME_TAGGED, 1, 1, 64))
            with pytest.raises(TransportError):
                a.read([TransferOp(local, 0, ghost, 0, 8)], timeout_s=1.0).result(timeout=5)
        finally:
            stop.set()
            thread.join(2)
            for sock in accepted:
                sock.close()


@needs_ucx
def test_timeout_option_is_the_default_timeout() -> None:
    """A transfer with no timeout_s ends at the ``timeout`` option, not at the interface's 30 s."""
    with socket.create_server(("127.0.0.1", 0)) as silent, UcxTransport(UcxOptions(timeout=0.5)) as a:
        address = f"ucx://127.0.0.1:{silent.getsockname()[1]}"  # accepts (backlog), never answers
        local = a.register(bytearray(64))
        ghost = RemoteRegion(address, P.DESCRIPTOR.pack(P.MAGIC, P.SCHEME_TAGGED, 1, 1, 64))
        started = time.monotonic()
        with pytest.raises(TransportError, match="timed out"):
            a.read([TransferOp(local, 0, ghost, 0, 8)]).result(timeout=10)
        assert time.monotonic() - started < 3


@needs_ucx
def test_stale_descriptor_from_a_closed_endpoint() -> None:
    """A descriptor kept from an endpoint that closed must not address a later endpoint's regions,
    even one on the same port."""
    old = UcxTransport()
    stale = old.register(bytearray(64))
    port = int(old.address.rsplit(":", 1)[1])
    old.close()
    with UcxTransport(UcxOptions(port=port)) as new, UcxTransport() as reader:
        new.register(bytearray(b"\x07" * 64))  # same region id as the stale one
        local_buffer = bytearray(64)
        local = reader.register(local_buffer)
        with pytest.raises(TransportError, match="no longer exists"):
            reader.read([TransferOp(local, 0, RemoteRegion(new.address, stale.descriptor), 0, 8)],
                        timeout_s=5).result(timeout=10)
        assert local_buffer == bytearray(64)


@needs_ucx
def test_mismatched_error_handling_is_refused_clearly() -> None:
    with UcxTransport(UcxOptions(error_handling=False)) as owner, UcxTransport() as reader:
        with pytest.raises(TransportError, match="error_handling"):
            reader.connect(owner.address, timeout_s=5)


@needs_ucx
def test_without_error_handling_bytes_still_move() -> None:
    """error_handling: false lets UCX pick shared memory / CMA; the protocol is the same."""
    options = UcxOptions(error_handling=False)
    with UcxTransport(options) as owner, UcxTransport(options) as reader:
        source = bytearray(range(256)) * 4096  # 1 MiB
        remote = RemoteRegion(owner.address, owner.register(source).descriptor)
        target = bytearray(len(source))
        local = reader.register(target)
        reader.read([TransferOp(local, 0, remote, 0, len(source))], timeout_s=10).result(timeout=15)
        assert target == source
