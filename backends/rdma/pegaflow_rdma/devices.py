"""Which RDMA ports exist here, which of them a transport uses, and whether verbs work at all.

Discovery reads sysfs (``/sys/class/infiniband``), which needs neither pyverbs nor an open device,
so ``pegaflow backends`` can say "no RDMA device found" on any machine in microseconds. Selection
(``devices: auto``) keeps the active ports nearest the GPU on the PCIe tree, else those on the
daemon's NUMA node: a NIC behind the GPU's PCIe switch moves its bytes without crossing the CPU's
interconnect, which is how 8-NIC GPU servers are cabled (one NIC per GPU pair).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pegaflow_core.backend import Availability
from pegaflow_core.errors import TransportError

from .options import parse_devices

NO_DEVICE = "no RDMA device found"


@dataclass(frozen=True)
class Port:
    """One port of an RDMA device as sysfs describes it."""

    device: str
    port: int
    state: str  # "ACTIVE", "DOWN", ... (from "4: ACTIVE")
    link_layer: str  # "Ethernet" (RoCE) or "InfiniBand"
    numa_node: int  # -1 when unknown (soft-RoCE, single-node machines)
    pci_path: str  # resolved sysfs path of the PCI function, "" for software devices

    @property
    def active(self) -> bool:
        return self.state == "ACTIVE"

    def __str__(self) -> str:
        numa = f", NUMA {self.numa_node}" if self.numa_node >= 0 else ""
        return f"{self.device}:{self.port} ({self.state}, {self.link_layer}{numa})"


def scan(sysfs: Path = Path("/sys")) -> list[Port]:
    """Every port of every RDMA device, sorted by device then port; [] when there is none."""
    root = sysfs / "class" / "infiniband"
    try:
        devices = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return []
    ports = []
    for dev in devices:
        numa = _read(dev / "device" / "numa_node", "-1")
        pci = os.path.realpath(dev / "device") if (dev / "device").exists() else ""
        try:
            numbers = sorted(int(p.name) for p in (dev / "ports").iterdir() if p.name.isdigit())
        except OSError:
            continue
        for n in numbers:
            state = _read(dev / "ports" / str(n) / "state", "0: UNKNOWN").partition(":")[2].strip() or "UNKNOWN"
            link = _read(dev / "ports" / str(n) / "link_layer", "unknown")
            ports.append(Port(dev.name, n, state, link, int(numa) if numa.lstrip("-").isdigit() else -1, pci))
    return ports


def select(ports: list[Port], devices: str, numa_node: int = -1, gpu_pci: str = "",
           sysfs: Path = Path("/sys")) -> list[Port]:
    """The ports a transport with these options uses, or TransportError saying why there are none.
    Named devices are taken as given (their port must be active); ``auto`` narrows the active
    ports to those nearest ``gpu_pci``, else to ``numa_node`` (-1: the node this process is pinned
    to, if it is; -2: any)."""
    if not ports:
        raise TransportError(f"{NO_DEVICE} (/sys/class/infiniband lists no device)")
    named = parse_devices(devices)
    if named:
        chosen = []
        for name, port in named:
            candidates = [p for p in ports if p.device == name and (port is None or p.port == port)]
            if not candidates:
                raise TransportError(f"rdma.devices: no RDMA port {name}{'' if port is None else f':{port}'} here "
                                     f"(found: {', '.join(str(p) for p in ports)})")
            active = [p for p in candidates if p.active]
            if not active:
                raise TransportError(f"rdma.devices: {candidates[0]} is not ACTIVE (cable, link or subnet manager)")
            chosen.append(active[0])
        return chosen
    active = [p for p in ports if p.active]
    if not active:
        raise TransportError(f"RDMA devices found but no port is ACTIVE: {', '.join(str(p) for p in ports)}")
    if gpu_pci:
        return _nearest_on_pcie(active, gpu_pci, sysfs)
    target = current_numa_node(sysfs) if numa_node == -1 else numa_node
    if target >= 0:
        local = [p for p in active if p.numa_node == target]
        if local:
            return local
    return active


def _nearest_on_pcie(active: list[Port], gpu_pci: str, sysfs: Path) -> list[Port]:
    address = gpu_pci.lower() if gpu_pci.count(":") == 2 else f"0000:{gpu_pci.lower()}"
    if len(address.split(":")[0]) == 8:  # nvidia-smi prints an 8-digit domain
        address = address[4:]
    gpu = sysfs / "bus" / "pci" / "devices" / address
    if not gpu.exists():
        raise TransportError(f"rdma.gpu_pci: no PCI device {address} here ({gpu} is missing)")
    gpu_parts = Path(os.path.realpath(gpu)).parts

    def shared(port: Port) -> int:
        if not port.pci_path:
            return 0
        n = 0
        for a, b in zip(gpu_parts, Path(port.pci_path).parts):
            if a != b:
                break
            n += 1
        return n

    best = max(shared(p) for p in active)
    return [p for p in active if shared(p) == best]


def current_numa_node(sysfs: Path = Path("/sys")) -> int:
    """The NUMA node this process is pinned to (every CPU it may run on is on that node); -1 when
    it may run on several nodes, or the machine has one node or says nothing."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return -1
    nodes = sysfs / "devices" / "system" / "node"
    try:
        entries = sorted(p for p in nodes.iterdir() if p.name.startswith("node") and p.name[4:].isdigit())
    except OSError:
        return -1
    if len(entries) < 2:
        return -1
    for entry in entries:
        if cpus <= _cpulist(_read(entry / "cpulist", "")):
            return int(entry.name[4:])
    return -1


def _cpulist(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if lo.isdigit():
            cpus.update(range(int(lo), int(hi if hi.isdigit() else lo) + 1))
    return cpus


def _read(path: Path, default: str) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def import_pyverbs() -> None:
    """Import rdma-core's Python binding or say how to get it (it is not on PyPI in a usable form:
    PyPI's pyverbs builds rdma-core from source and must match the system's libibverbs)."""
    try:
        import pyverbs.device  # noqa: F401
    except ImportError as exc:
        raise TransportError(
            f"pyverbs (rdma-core's Python binding) is not importable ({exc}): install the system's "
            "build (Debian/Ubuntu: apt-get install python3-pyverbs; RHEL: python3-pyverbs) and run pegaflow "
            "in a venv made with --system-site-packages"
        ) from None


def availability(sysfs: Path = Path("/sys")) -> Availability:
    """Never raises. Order matters: no device is the common case and needs no import."""
    ports = scan(sysfs)
    if not ports:
        return Availability(False, f"{NO_DEVICE} (/sys/class/infiniband is empty or missing: no RDMA NIC, or its "
                                   "driver / rdma_rxe is not loaded)")
    try:
        import_pyverbs()
        from pyverbs.device import get_device_list

        listed = sorted(d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in get_device_list())
    except TransportError as exc:
        return Availability(False, str(exc))
    except Exception as exc:  # PyverbsRDMAError and friends: the kernel side is not usable
        return Availability(False, f"{NO_DEVICE} by libibverbs ({type(exc).__name__}: {exc}); is ib_uverbs loaded?")
    if not listed:
        return Availability(False, f"{NO_DEVICE} by libibverbs although sysfs lists "
                                   f"{', '.join(sorted({p.device for p in ports}))}: install the provider "
                                   "(ibverbs-providers) and load ib_uverbs")
    active = [p for p in ports if p.active]
    if not active:
        return Availability(False, f"RDMA devices found but no port is ACTIVE: {', '.join(str(p) for p in ports)}")
    return Availability(True, f"pyverbs; ports: {', '.join(str(p) for p in ports)}")
