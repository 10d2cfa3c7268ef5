"""The daemons a benchmark starts: real ``pegaflow serve`` processes with a config per scenario."""

from __future__ import annotations

import json

MIB = 1 << 20


def chunk_for(block_bytes: int, capacity: int) -> int:
    """A slab chunk that holds a block, as large as the pool allows (fewer chunks to pin) up to the
    tier's default of 64 MiB."""
    chunk = 4096
    while chunk < block_bytes:
        chunk *= 2
    while chunk < 64 * MIB and chunk * 32 <= capacity:
        chunk *= 2
    return chunk


def dram_config(capacity: int, block_bytes: int, pool_name: str | None = None,
                shm_dir: str | None = None) -> str:
    capacity = max(int(capacity), 4 * chunk_for(block_bytes, capacity))
    tier: dict[str, object] = {"kind": "dram", "capacity": capacity, "chunk": chunk_for(block_bytes, capacity)}
    if pool_name:
        tier["pool_name"] = pool_name
    if shm_dir:
        tier["shm_dir"] = shm_dir
    return _config([tier])


def ssd_config(dram_capacity: int, ssd_dir: str, ssd_capacity: int, block_bytes: int) -> str:
    """A small DRAM tier over an SSD tier: blocks the DRAM tier evicts spill to the SSD, and a hit
    held only there is promoted (the Query answers ``loading`` meanwhile)."""
    segment = 256 * MIB if ssd_capacity >= 16 * 256 * MIB else max(MIB, -(-4 * (block_bytes + 8192) // 4096) * 4096)
    ssd_capacity = max(int(ssd_capacity), 4 * segment)
    tiers = [
        {"kind": "dram", "capacity": int(dram_capacity), "chunk": chunk_for(block_bytes, dram_capacity)},
        {"kind": "ssd", "path": ssd_dir, "capacity": ssd_capacity, "segment_size": segment},
    ]
    return _config(tiers)


def _config(tiers: list[dict[str, object]]) -> str:
    """GPU engines need nothing more: the daemon serves cuda_ipc regions when pegaflow-cuda is
    installed, and the DRAM tier pins its pool where a GPU is present (``pin: auto``)."""
    return json.dumps({"server": {"metrics": None}, "index": {"kind": "local"}, "tiers": tiers})  # JSON is YAML
