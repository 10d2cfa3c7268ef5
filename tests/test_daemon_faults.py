"""Crash isolation: clients killed mid-operation, and the daemon itself restarting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from pegaflow_core.client import PegaflowClient
from pegaflow_core.launcher import DaemonProcess, free_port
from pegaflow_core.sim_engine import SimulatedEngine

from daemon_helpers import SMALL, dram_config, wait_for

CLIENT = textwrap.dedent(
    """
    import random, sys, dataclasses
    sys.path.insert(0, {tests!r})
    from daemon_helpers import SMALL
    from pegaflow_core.client import PegaflowClient
    from pegaflow_core.sim_engine import SimulatedEngine, block_hashes
    client = PegaflowClient({endpoint!r}, timeout_s=30)
    engine = SimulatedEngine(client, dataclasses.replace(SMALL, num_blocks=512), model="crash", instance_id="victim")
    def prompt(seed):
        rng = random.Random(seed)
        return [rng.randrange(32000) for _ in range(16 * 200)]
    engine.prefill(prompt(0))
    lease = client.query(engine.handle, block_hashes(prompt(0), 16))
    print("READY", lease.hit_blocks, flush=True)
    seed = 1
    while {keep_saving}:
        engine.prefill(prompt(seed))
        print("SAVED", seed, flush=True)
        seed += 1
    sys.stdin.read()
    """
)


def spawn_client(endpoint: str, keep_saving: bool) -> subprocess.Popen[str]:
    code = CLIENT.format(tests=os.path.dirname(__file__), endpoint=endpoint, keep_saving=keep_saving)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("READY 200"), line
    return proc


def test_killed_client_frees_its_leases_and_contexts():
    with DaemonProcess(dram_config("64mb")) as d, PegaflowClient(d.endpoint) as watcher:
        proc = spawn_client(d.endpoint, keep_saving=False)
        stats = watcher.stats()
        assert stats.leases == 1 and stats.pinned_blocks == 200 and stats.contexts == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_for(lambda: watcher.stats().leases == 0)
        stats = watcher.stats()
        assert stats.pinned_blocks == 0 and stats.contexts == 0 and stats.sessions == 1  # only the watcher


def test_client_killed_mid_save_never_exposes_partial_blocks():
    with DaemonProcess(dram_config("64mb")) as d, PegaflowClient(d.endpoint, timeout_s=30) as c:
        proc = spawn_client(d.endpoint, keep_saving=True)
        proc.stdout.readline()  # one full save done, the next is under way
        time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        import dataclasses
        import random

        engine = SimulatedEngine(c, dataclasses.replace(SMALL, num_blocks=512), model="crash", instance_id="checker")
        hits = 0
        for seed in range(0, 6):
            rng = random.Random(seed)
            prompt = [rng.randrange(32000) for _ in range(16 * 200)]
            hits += engine.prefill(prompt, verify=True).hit_blocks  # raises if any hit block is wrong
        assert hits >= 200  # at least the acknowledged saves are there
        assert c.health().status == "serving"
        engine.close()


def test_daemon_restart_clients_reregister_transparently(tmp_path):
    port = free_port()
    config = dram_config() + f"server: {{listen: '127.0.0.1:{port}'}}\n"
    first = DaemonProcess(config, workdir=tmp_path).start()
    client = PegaflowClient(first.endpoint, timeout_s=2)
    engine = SimulatedEngine(client, SMALL, model="restart")
    prompt = list(range(16 * 5))
    engine.prefill(prompt)
    old_id = engine.handle.context_id
    first.kill()
    assert engine.prefill(prompt).daemon_down  # a miss, not an error
    second = DaemonProcess(config, workdir=tmp_path).start()
    try:
        wait_for(lambda: client.daemon_id and engine.handle.context_id != old_id)
        cold = engine.prefill(prompt)
        assert not cold.daemon_down and cold.hit_blocks == 0  # the new daemon starts empty (for now)
        assert engine.prefill(prompt, verify=True).hit_blocks == 5
    finally:
        engine.close()
        client.close()
        second.close()


def test_a_killed_launcher_takes_its_daemon_with_it():
    code = (
        "from pegaflow_core.launcher import DaemonProcess\n"
        "d = DaemonProcess('tiers: [{kind: dram, capacity: 8mb, chunk: 1mb}]').start()\n"
        "print(d.proc.pid, flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    daemon_pid = int(launcher.stdout.readline())
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()

    def gone() -> bool:
        try:
            os.kill(daemon_pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone)


def test_engine_threads_and_the_session_thread_register_again_once(tmp_path):
    """After a daemon restart the session thread re-registers every context while engine threads
    whose calls failed with 'unknown context' try too; the daemon refuses a second registration of
    one instance and rank in a session, so exactly one of them may do it (seen once in CI as an
    engine process dying with InvalidArgument)."""
    import threading

    from pegaflow_core.errors import DaemonUnavailable

    port = free_port()
    config = dram_config() + f"server: {{listen: '127.0.0.1:{port}'}}\n"
    daemon = DaemonProcess(config, workdir=tmp_path).start()
    client = PegaflowClient(daemon.endpoint, timeout_s=2)
    engines = [SimulatedEngine(client, SMALL, model="race", instance_id=f"race-{i}") for i in range(4)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer(engine: SimulatedEngine, n: int) -> None:
        hashes = [f"race-{n}-{i}".encode().ljust(32, b".") for i in range(4)]
        calls[n] = 0
        while not stop.is_set():
            try:
                hit = client.query(engine.handle, hashes)
                if hit.lease_id:
                    client.release([hit.lease_id])
                calls[n] += 1
            except DaemonUnavailable:
                time.sleep(0.01)
            except BaseException as exc:  # noqa: BLE001 - any other error is the bug
                errors.append(exc)
                return

    calls: dict[int, int] = {}
    threads = [threading.Thread(target=hammer, args=(e, 2 * k + j)) for k, e in enumerate(engines) for j in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(4):
            time.sleep(0.3)
            daemon.kill()
            daemon = DaemonProcess(config, workdir=tmp_path).start()
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for engine in engines:
            engine.close()
        client.close()
        daemon.close()
    assert not errors, errors[:3]
    assert len(calls) == 8 and all(calls.values())  # every thread ran and got answers


def _gone(pid: int) -> bool:
    """Exited (or a zombie nobody has reaped yet: its parent was killed)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_a_daemon_dies_with_the_process_that_launched_it(tmp_path):
    """A killed test run or benchmark leaves no daemon behind. The daemon asks for it itself at
    start (PR_SET_PDEATHSIG from its environment), not in a preexec_fn: Python run between fork
    and exec, while the launcher's gRPC threads were busy, aborted daemons at start."""
    script = textwrap.dedent(f"""
        import time
        from pegaflow_core.launcher import DaemonProcess
        daemon = DaemonProcess(None, workdir={str(tmp_path)!r}).start()
        print(daemon.proc.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert not _gone(pid)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid), "the daemon outlived the process that launched it"
