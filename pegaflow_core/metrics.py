"""Prometheus metrics of one daemon, in their own registry (several daemons can live in one
test process). Names follow Prometheus conventions; GB/s is ``rate(pegaflow_bytes_total)``."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.query_blocks = Counter("pegaflow_query_blocks", "Blocks asked for by Query, by result", ["result"], registry=r)
        self.bytes = Counter("pegaflow_bytes", "Bytes moved, by tier and direction", ["tier", "direction"], registry=r)
        self.blocks = Counter("pegaflow_blocks", "Blocks moved, by tier and direction", ["tier", "direction"], registry=r)
        self.transfer_seconds = Histogram(
            "pegaflow_transfer_seconds", "Time of one batched save or load copy", ["direction"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.evictions = Counter("pegaflow_evictions", "Blocks evicted, by tier", ["tier"], registry=r)
        self.dropped = Counter("pegaflow_saves_dropped", "Blocks not saved: no room even after eviction", registry=r)
        self.deduplicated = Counter("pegaflow_saves_deduplicated", "Blocks not saved because an identical one is stored", registry=r)
        self.load_failures = Counter("pegaflow_load_failures", "Blocks a load could not deliver (recomputed by the engine)", ["reason"], registry=r)
        self.integrity_failures = Counter("pegaflow_integrity_failures", "Blocks whose checksum did not match", ["tier"], registry=r)
        self.rpc_seconds = Histogram("pegaflow_rpc_seconds", "RPC handling time", ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.rpc_errors = Counter("pegaflow_rpc_errors", "RPCs answered with an error", ["method", "code"], registry=r)
        self.tier_capacity = Gauge("pegaflow_tier_capacity_bytes", "Tier capacity", ["tier"], registry=r)
        self.tier_used = Gauge("pegaflow_tier_used_bytes", "Tier bytes in use", ["tier"], registry=r)
        self.tier_blocks = Gauge("pegaflow_tier_blocks", "Blocks stored in a tier", ["tier"], registry=r)
        self.tier_integrity_failures = Gauge(
            "pegaflow_tier_integrity_failures", "Blocks a tier found corrupt (checksum mismatch) and dropped", ["tier"], registry=r
        )
        self.leases = Gauge("pegaflow_leases_active", "Live leases", registry=r)
        self.pinned = Gauge("pegaflow_pinned_blocks", "Blocks pinned by leases", registry=r)
        self.contexts = Gauge("pegaflow_contexts", "Registered engine contexts", registry=r)
        self.sessions = Gauge("pegaflow_sessions", "Connected client sessions", registry=r)

    def bind_gauge(self, gauge: Gauge, read: Callable[[], float]) -> None:
        gauge.set_function(read)

    def counters(self) -> dict[str, float]:
        """Flat snapshot of every counter sample, e.g. ``bytes_total{tier=dram,direction=save}``."""
        out: dict[str, float] = {}
        for family in self.registry.collect():
            if family.type != "counter":
                continue
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                name = sample.name.removeprefix("pegaflow_")
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{name}{{{labels}}}" if labels else name] = sample.value
        return out

    def serve(self, listen: str) -> tuple[str, int]:
        """Start the /metrics HTTP endpoint; return the bound (host, port)."""
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        self._http = server
        return server.server_address[0], server.server_address[1]

    def close(self) -> None:
        server = getattr(self, "_http", None)
        if server is not None:
            server.shutdown()
            server.server_close()
