"""``pegaflow bench ucx``: batched reads of large blocks between two processes over UcxTransport,
against ``ucx_perftest`` (the same UCX moving the same message size with no Python at all) and a
plain TCP socket copy of the same bytes, all in one run.

The ratios say how much of the fabric our transport delivers (transport / ucx_perftest) and
whether UCX beats the kernel's TCP path on this machine (transport / socket). The helper roles
(the region owner and the socket sender) run as ``python -m pegaflow_ucx.bench <role> ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pegaflow_core.sizes import parse_size

_READY_TIMEOUT_S = 30.0


class UcxBenchmark:
    kind = "ucx"
    help = "batched 2 MiB reads between two processes over UCX, vs ucx_perftest and a plain socket copy"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--block", default="2mb", help="bytes per op and ucx_perftest message (default %(default)s)")
        p.add_argument("--batch", default="256mb", help="bytes per read() batch (default %(default)s)")
        p.add_argument("--iterations", type=int, default=8, help="timed batches (default %(default)s)")
        p.add_argument("--tls", default="", help="UCX_TLS for the transport and ucx_perftest (default: UCX decides)")
        p.add_argument("--seg-size", default="1mb",
                       help="UCX_TCP_{TX,RX}_SEG_SIZE (0: UCX default; default %(default)s)")
        p.add_argument("--perftest", default=None,
                       help="ucx_perftest binary (default: the one on PATH, from Debian's ucx-utils; else the "
                            "one bundled with the libucx wheel)")

    @staticmethod
    def run(args: argparse.Namespace) -> dict[str, Any]:
        block, batch = parse_size(args.block), parse_size(args.batch)
        seg_size = parse_size(args.seg_size)
        if block <= 0 or batch < block or args.iterations < 1:
            raise SystemExit("bench ucx: need --block > 0, --batch >= --block and --iterations >= 1")
        count = batch // block
        batch = count * block
        total = batch * args.iterations
        figures: dict[str, Any] = {}
        baseline: dict[str, Any] = {}
        transport_gbs = _transport_read(block, count, args.iterations, args.tls, seg_size, True)
        figures["transport_read_GBps"] = transport_gbs
        # Without peer error handling UCX may pick shared memory / CMA on one host (see README).
        figures["transport_read_no_error_handling_GBps"] = _transport_read(
            block, count, args.iterations, args.tls, seg_size, False)
        figures["ucx_tls"] = args.tls or "UCX decides (all)"
        figures["load_average_1m"] = os.getloadavg()[0]  # shared machines: read the figures with it
        figures["seg_size"] = seg_size
        perftest, where = _find_perftest(args.perftest)
        if perftest is None:
            baseline["ucx_perftest"] = where
        else:
            baseline["ucx_perftest_binary"] = where
            # tag_bw is what our tagged protocol does; over tcp alone it is what UCX can do with peer
            # error handling on (UCX then excludes sm and cma); ucp_get is the one-sided ceiling.
            runs = (("tag_bw", args.tls), ("tag_bw_tcp", "tcp"), ("ucp_get", args.tls))
            for label, tls in runs:
                try:
                    baseline[f"ucx_perftest_{label}_GBps"] = _perftest(
                        perftest, label.removesuffix("_tcp"), block, total // block, _ucx_env(tls, seg_size))
                except (RuntimeError, subprocess.SubprocessError) as exc:
                    baseline[f"ucx_perftest_{label}"] = f"failed: {exc}"
        baseline["socket_copy_GBps"] = _socket_copy(batch, args.iterations)
        ratios = {}
        pairs = (("transport_read_GBps", "ucx_perftest_tag_bw_tcp_GBps"),
                 ("transport_read_GBps", "socket_copy_GBps"),
                 ("transport_read_no_error_handling_GBps", "ucx_perftest_tag_bw_GBps"),
                 ("transport_read_no_error_handling_GBps", "ucx_perftest_ucp_get_GBps"),
                 ("transport_read_no_error_handling_GBps", "socket_copy_GBps"))
        for ours, theirs in pairs:
            value = baseline.get(theirs)
            if isinstance(value, float) and value > 0:
                ratios[f"{ours.removesuffix('_GBps')}/{theirs.removesuffix('_GBps')}"] = figures[ours] / value
        return {
            "bench": "ucx",
            "description": (f"{args.iterations} batches of {count} reads x {block >> 10} KiB over UcxTransport "
                            f"between two processes (GB = 1e9 bytes)"),
            "figures": figures,
            "baseline": baseline,
            "ratios": ratios,
        }


# -- our transport ------------------------------------------------------------------------------
def _transport_read(block: int, count: int, iterations: int, tls: str, seg_size: int,
                    error_handling: bool) -> float:
    import numpy as np

    from pegaflow_core.transport import RemoteRegion, TransferOp

    from .options import UcxOptions
    from .transport import UcxTransport

    batch = block * count
    owner = subprocess.Popen(
        [sys.executable, "-m", "pegaflow_ucx.bench", "owner", str(batch), tls, str(seg_size), str(int(error_handling))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        line = _readline(owner, "the owner process")
        info = json.loads(line)
        remote = RemoteRegion(info["address"], bytes.fromhex(info["descriptor"]))
        with UcxTransport(UcxOptions(tls=tls, seg_size=seg_size, error_handling=error_handling)) as reader:
            local = reader.register(np.zeros(batch, dtype=np.uint8))
            ops = [TransferOp(local, (count - 1 - i) * block, remote, i * block, block) for i in range(count)]
            reader.read(ops, timeout_s=120).result()  # connect and warm up
            started = time.perf_counter()
            for _ in range(iterations):
                reader.read(ops, timeout_s=120).result()
            elapsed = time.perf_counter() - started
    finally:
        owner.stdin.close()
        try:
            owner.wait(10)
        except subprocess.TimeoutExpired:
            owner.kill()
    return batch * iterations / elapsed / 1e9


def _owner(nbytes: int, tls: str, seg_size: int, error_handling: bool) -> None:
    import numpy as np

    from .options import UcxOptions
    from .transport import UcxTransport

    with UcxTransport(UcxOptions(tls=tls, seg_size=seg_size, error_handling=error_handling)) as transport:
        region = transport.register(np.ones(nbytes, dtype=np.uint8))
        print(json.dumps({"address": transport.address, "descriptor": region.descriptor.hex()}), flush=True)
        sys.stdin.read()


# -- ucx_perftest -------------------------------------------------------------------------------
def _find_perftest(explicit: str | None) -> tuple[str | None, str]:
    if explicit:
        return (explicit, explicit) if os.access(explicit, os.X_OK) else (None, f"not executable: {explicit}")
    found = shutil.which("ucx_perftest")
    if found:
        return found, f"{found} (PATH)"
    try:
        import libucx

        bundled = Path(libucx.__file__).parent / "bin" / "ucx_perftest"
        if os.access(bundled, os.X_OK):
            return str(bundled), f"{bundled} (bundled with the libucx wheel; no ucx_perftest on PATH)"
    except ImportError:
        pass
    return None, "missing: no ucx_perftest on PATH (apt-get install ucx-utils) and none bundled with libucx"


def _ucx_env(tls: str, seg_size: int) -> dict[str, str]:
    env = dict(os.environ)
    if tls:
        env["UCX_TLS"] = tls
    if seg_size:
        env["UCX_TCP_TX_SEG_SIZE"] = env["UCX_TCP_RX_SEG_SIZE"] = str(seg_size)
    env.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    return env


def _perftest(binary: str, test: str, size: int, iterations: int, env: dict[str, str]) -> float:
    """Run a ucx_perftest server and client on loopback; the client's overall bandwidth in GB/s."""
    lib = Path(binary).resolve().parent.parent / "lib"
    if (lib / "libucs.so.0").exists() and not str(lib).startswith("/usr"):
        # The wheel's binary has no rpath: point it at the wheel's UCX, not the system's.
        env = {**env, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(lib), env.get("LD_LIBRARY_PATH")]))}
    port = _free_port()
    server = subprocess.Popen([binary, "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        out = ""
        while time.monotonic() < deadline:
            time.sleep(0.2)
            client = subprocess.run(
                [binary, "127.0.0.1", "-p", str(port), "-t", test, "-s", str(size), "-n", str(iterations),
                 "-w", str(max(2, iterations // 10)), "-v"],
                env=env, capture_output=True, text=True, timeout=120,
            )
            out = client.stdout + client.stderr
            if client.returncode == 0:
                break
            if "connect" not in out.lower() and "refused" not in out.lower():
                break
    finally:
        server.kill()
        server.wait(10)
    # -v prints a CSV header then one line: iterations, lat p50, avg, overall, avg_bw, overall_bw (MB/s = 2^20 B/s)
    rows = [line for line in out.splitlines() if re.match(r"^\s*\d+,", line)]
    if not rows:
        raise RuntimeError(out.strip().splitlines()[-1] if out.strip() else "no output")
    overall_mib_s = float(rows[-1].split(",")[5])
    return overall_mib_s * (1 << 20) / 1e9


# -- plain sockets ------------------------------------------------------------------------------
def _socket_copy(batch: int, iterations: int) -> float:
    """A second process sends ``iterations + 1`` batches over TCP loopback; we receive them into
    one buffer with ``recv_into``. The first batch is the warm-up."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        sender = subprocess.Popen([sys.executable, "-m", "pegaflow_ucx.bench", "socket-sender", str(port),
                                   str(batch), str(iterations + 1)])
        listener.settimeout(_READY_TIMEOUT_S)
        conn, _ = listener.accept()
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        buffer = memoryview(bytearray(batch))
        started = 0.0
        for i in range(iterations + 1):
            got = 0
            while got < batch:
                n = conn.recv_into(buffer[got:])
                if n == 0:
                    raise RuntimeError("socket sender closed early")
                got += n
            if i == 0:
                started = time.perf_counter()
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
        sender.wait(30)
    return batch * iterations / elapsed / 1e9


def _socket_sender(port: int, batch: int, count: int) -> None:
    data = memoryview(bytearray(os.urandom(1 << 20)) * (batch >> 20) + bytearray(batch % (1 << 20)))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        for _ in range(count):
            sock.sendall(data)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _readline(proc: subprocess.Popen[str], what: str) -> str:
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        raise RuntimeError(f"{what} exited with {proc.wait(10)} before it was ready")
    return line


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "owner":
        _owner(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1")
    elif role == "socket-sender":
        _socket_sender(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown role {role!r}; expected 'owner' or 'socket-sender'")
