"""Start and stop real daemon processes: used by the demo, the benchmarks and the tests, which
all talk to a daemon over gRPC exactly as engines do."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .client import PegaflowClient
from .errors import DaemonUnavailable, PegaflowError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class DaemonProcess:
    """``pegaflow serve`` in a child process. ``config_yaml`` may leave out ``server.listen``:
    a free loopback port is chosen and written into the config. ``None`` runs the embedded
    default config on a free port."""

    def __init__(self, config_yaml: str | None, workdir: str | os.PathLike | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="pegaflow-daemon-")
        self.workdir = Path(workdir or self._tmp.name)
        self.config_path: Path | None = None
        if config_yaml is None:
            self.endpoint = f"127.0.0.1:{free_port()}"
            self.args = ("--listen", self.endpoint, "--metrics", "off")
        else:
            text, self.endpoint = _with_listen(config_yaml, f"127.0.0.1:{free_port()}")
            self.config_path = self.workdir / "pegaflow.yaml"
            self.config_path.write_text(text)
            self.args = ("--config", str(self.config_path))
        self.log_path = self.workdir / "daemon.log"
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> DaemonProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pegaflow_core", "serve", *self.args, *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=die_with_parent_env(signal.SIGTERM),
        )
        log.close()
        client = PegaflowClient(self.endpoint, timeout_s=1.0, description="launcher")
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if self.proc.poll() is not None:
                    raise PegaflowError(f"daemon exited with {self.proc.returncode} at start:\n{self.log()}")
                try:
                    client.health(timeout_s=0.5)
                    return self
                except DaemonUnavailable:
                    if time.monotonic() > deadline:
                        raise PegaflowError(f"daemon did not answer within {timeout_s}s:\n{self.log()}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """kill -9: what a crash looks like."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


_PARENT_ENV = "PEGAFLOW_DIE_WITH_PARENT"


def die_with_parent_env(sig: int) -> dict[str, str]:
    """The environment for a child that must get ``sig`` when this process dies, so a killed test
    run, demo or benchmark never leaves daemons or engines behind. The child arranges it itself at
    start (``die_with_parent``): a ``preexec_fn`` doing it would run Python between fork and exec,
    where gRPC's fork handlers, with this process's gRPC threads busy, aborted the child ("exited
    with -6": epoll_wait on a descriptor of the parent's poller)."""
    return {**os.environ, _PARENT_ENV: f"{os.getpid()}:{int(sig)}"}


def die_with_parent() -> None:
    """In a child started with ``die_with_parent_env``: ask the kernel for the signal when the
    parent dies (PR_SET_PDEATHSIG), and take it now if the parent is gone already."""
    value = os.environ.pop(_PARENT_ENV, "")
    if not value:
        return
    import ctypes

    parent, sig = (int(part) for part in value.split(":"))
    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, sig, 0, 0, 0)
    if os.getppid() != parent:  # it died before the prctl: nobody would send the signal
        os.kill(os.getpid(), sig)


def _with_listen(config_yaml: str, endpoint: str) -> tuple[str, str]:
    """The config with ``server.listen`` defaulted to ``endpoint`` (and metrics off unless set);
    returns it and the endpoint clients should use."""
    import yaml

    data = yaml.safe_load(config_yaml) or {}
    server = data.get("server") or {}
    data["server"] = server
    server.setdefault("listen", endpoint)
    server.setdefault("metrics", None)
    return yaml.safe_dump(data, sort_keys=False), server["listen"]
