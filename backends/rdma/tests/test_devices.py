"""Device discovery and selection on sysfs trees built in tmp_path, and what a machine without an
RDMA device says: `pegaflow backends`, and a daemon whose config asks for rdma."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pegaflow_core.errors import TransportError
from pegaflow_rdma import RdmaOptions, RdmaTransport
from pegaflow_rdma import devices as D

HAS_RDMA = RdmaTransport.availability().ok


def fake_sysfs(root: Path, nics: dict[str, dict], gpus: dict[str, str] | None = None, nodes: dict[int, str] | None = None) -> Path:
    """``nics``: name -> {ports: {n: state}, link: ..., numa: int, pci: "pci0000:00/0000:00:01.0/0000:17:00.0"}."""
    for name, spec in nics.items():
        dev = root / "class" / "infiniband" / name
        for n, state in spec["ports"].items():
            port = dev / "ports" / str(n)
            port.mkdir(parents=True)
            (port / "state").write_text(f"{4 if state == 'ACTIVE' else 1}: {state}\n")
            (port / "link_layer").write_text(spec.get("link", "Ethernet") + "\n")
        if "pci" in spec:
            target = root / "devices" / spec["pci"]
            target.mkdir(parents=True, exist_ok=True)
            (target / "numa_node").write_text(f"{spec.get('numa', -1)}\n")
            (dev / "device").symlink_to(target)
    for address, path in (gpus or {}).items():
        target = root / "devices" / path
        target.mkdir(parents=True, exist_ok=True)
        link = root / "bus" / "pci" / "devices" / address
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    for node, cpus in (nodes or {}).items():
        entry = root / "devices" / "system" / "node" / f"node{node}"
        entry.mkdir(parents=True)
        (entry / "cpulist").write_text(cpus + "\n")
    return root


EIGHT_GPU_BOX = {
    "mlx5_0": {"ports": {1: "ACTIVE"}, "numa": 0, "pci": "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0"},
    "mlx5_1": {"ports": {1: "ACTIVE"}, "numa": 0, "pci": "pci0000:00/0000:00:03.0/0000:05:00.0/0000:06:00.0"},
    "mlx5_2": {"ports": {1: "ACTIVE"}, "numa": 1, "pci": "pci0000:80/0000:80:01.0/0000:81:00.0/0000:82:00.0"},
    "mlx5_3": {"ports": {1: "DOWN"}, "numa": 1, "pci": "pci0000:80/0000:80:03.0/0000:85:00.0/0000:86:00.0"},
}
GPUS = {"0000:03:00.0": "pci0000:00/0000:00:01.0/0000:01:00.0/0000:03:00.0",  # behind mlx5_0's switch
        "0000:87:00.0": "pci0000:80/0000:80:03.0/0000:85:00.0/0000:87:00.0"}  # behind mlx5_3's (down)


def test_scan_reads_ports_states_and_numa(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, {**EIGHT_GPU_BOX, "rxe0": {"ports": {1: "ACTIVE"}}})
    ports = {f"{p.device}:{p.port}": p for p in D.scan(root)}
    assert sorted(ports) == ["mlx5_0:1", "mlx5_1:1", "mlx5_2:1", "mlx5_3:1", "rxe0:1"]
    assert ports["mlx5_2:1"].numa_node == 1 and ports["mlx5_3:1"].state == "DOWN" and not ports["mlx5_3:1"].active
    assert ports["rxe0:1"].numa_node == -1 and ports["rxe0:1"].pci_path == ""
    assert str(ports["mlx5_2:1"]) == "mlx5_2:1 (ACTIVE, Ethernet, NUMA 1)"
    assert D.scan(tmp_path / "nothing") == []


def test_auto_prefers_the_nic_behind_the_gpus_switch(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, EIGHT_GPU_BOX, GPUS)
    ports = D.scan(root)
    assert [p.device for p in D.select(ports, "auto", gpu_pci="0000:03:00.0", sysfs=root)] == ["mlx5_0"]
    assert [p.device for p in D.select(ports, "auto", gpu_pci="00000000:03:00.0", sysfs=root)] == ["mlx5_0"]
    # the NIC behind that GPU is down: the closest active ones are those under the same root complex
    assert [p.device for p in D.select(ports, "auto", gpu_pci="0000:87:00.0", sysfs=root)] == ["mlx5_2"]
    with pytest.raises(TransportError, match=r"rdma\.gpu_pci: no PCI device 0000:44:00\.0 here"):
        D.select(ports, "auto", gpu_pci="44:00.0", sysfs=root)


def test_auto_narrows_to_a_numa_node(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, EIGHT_GPU_BOX, nodes={0: "0-3", 1: "4-7"})
    ports = D.scan(root)
    assert [p.device for p in D.select(ports, "auto", numa_node=1, sysfs=root)] == ["mlx5_2"]
    assert [p.device for p in D.select(ports, "auto", numa_node=0, sysfs=root)] == ["mlx5_0", "mlx5_1"]
    assert [p.device for p in D.select(ports, "auto", numa_node=-2, sysfs=root)] == ["mlx5_0", "mlx5_1", "mlx5_2"]
    assert [p.device for p in D.select(ports, "auto", numa_node=5, sysfs=root)] == ["mlx5_0", "mlx5_1", "mlx5_2"]
    cpus = os.sched_getaffinity(0)  # this process: pinned to one fake node, or spanning several
    expected = 0 if cpus <= set(range(4)) else 1 if cpus <= set(range(4, 8)) else -1
    assert D.current_numa_node(root) == expected
    if len(cpus) > 1:
        os.sched_setaffinity(0, {min(cpus)})  # pinned: numactl --physcpubind
        try:
            assert D.current_numa_node(root) == (0 if min(cpus) <= 3 else 1 if min(cpus) <= 7 else -1)
        finally:
            os.sched_setaffinity(0, cpus)


def test_named_devices_are_checked(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, EIGHT_GPU_BOX)
    ports = D.scan(root)
    assert [p.device for p in D.select(ports, "mlx5_2,mlx5_0:1", sysfs=root)] == ["mlx5_2", "mlx5_0"]
    with pytest.raises(TransportError, match=r"rdma\.devices: no RDMA port mlx5_9 here \(found: mlx5_0:1"):
        D.select(ports, "mlx5_9", sysfs=root)
    with pytest.raises(TransportError, match=r"rdma\.devices: no RDMA port mlx5_0:2 here"):
        D.select(ports, "mlx5_0:2", sysfs=root)
    with pytest.raises(TransportError, match=r"rdma\.devices: mlx5_3:1 \(DOWN, Ethernet, NUMA 1\) is not ACTIVE"):
        D.select(ports, "mlx5_3", sysfs=root)
    with pytest.raises(TransportError, match="no RDMA device found"):
        D.select([], "auto", sysfs=root)
    with pytest.raises(TransportError, match="no port is ACTIVE"):
        D.select([p for p in ports if not p.active], "auto", sysfs=root)


def test_availability_without_a_device(tmp_path: Path) -> None:
    availability = D.availability(tmp_path)
    assert not availability.ok and availability.detail.startswith("no RDMA device found")


@pytest.mark.skipif(HAS_RDMA, reason="this machine has pyverbs and a device")
def test_availability_with_a_device_but_no_pyverbs(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    try:
        import pyverbs  # noqa: F401
        pytest.skip("pyverbs is importable here")
    except ImportError:
        pass
    availability = D.availability(fake_sysfs(tmp_path, {"mlx5_0": {"ports": {1: "ACTIVE"}}}))
    assert not availability.ok
    assert "pyverbs (rdma-core's Python binding) is not importable" in availability.detail
    assert "apt-get install python3-pyverbs" in availability.detail


@pytest.mark.skipif(HAS_RDMA, reason="this machine has an RDMA device")
def test_building_the_transport_says_no_device() -> None:
    with pytest.raises(TransportError, match="no RDMA device found"):
        RdmaTransport(RdmaOptions())


@pytest.mark.skipif(HAS_RDMA, reason="this machine has an RDMA device")
def test_pegaflow_backends_says_no_rdma_device() -> None:
    out = subprocess.run([sys.executable, "-m", "pegaflow_core", "backends"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    [line] = [row for row in out.stdout.splitlines() if row.split()[:2] == ["transport", "rdma"]]
    assert "pegaflow-rdma" in line and "unavailable: no RDMA device found" in line


@pytest.mark.skipif(HAS_RDMA, reason="this machine has an RDMA device")
def test_a_daemon_asked_for_rdma_fails_at_start_with_that_message(tmp_path: Path) -> None:
    config = tmp_path / "stack.yaml"
    config.write_text("server: {listen: 127.0.0.1:0, metrics: null}\ntransport: {kind: rdma, devices: auto}\n"
                      "tiers:\n  - {kind: dram, capacity: 8mb}\n  - {kind: remote}\n")
    out = subprocess.run([sys.executable, "-m", "pegaflow_core", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert f"{config}: transport: backend 'rdma' is unavailable on this machine: no RDMA device found" in out.stderr
