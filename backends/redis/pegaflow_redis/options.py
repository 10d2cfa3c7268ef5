"""Options of the ``redis`` index (``index: {kind: redis, url: ..., ...}``)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pegaflow_core.sizes import Duration


def check_url(value: str) -> None:
    """Raise ValueError unless ``value`` is a URL redis-py can open."""
    scheme = urlsplit(value).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"expected a Redis URL like 'redis://127.0.0.1:6379/0', 'rediss://host:6380/0' or "
            f"'unix:///run/redis.sock', got {value!r}"
        )


def check_name(value: str) -> None:
    """Node ids and key prefixes become parts of Redis keys and of packed location records, whose
    separators are control characters."""
    if not value.strip():
        raise ValueError("expected a non-empty string, got ''")
    if any(ord(ch) < 0x20 for ch in value):
        raise ValueError(f"expected a string without control characters, got {value!r}")


def check_positive(value: float) -> None:
    if not value > 0:
        raise ValueError(f"expected a duration above 0, got {value}")


@dataclass(frozen=True)
class RedisIndexOptions:
    """Where the cluster index lives and how this node takes part in it."""

    url: str = field(
        default="redis://127.0.0.1:6379/0",
        metadata={"help": "Redis server URL (redis://, rediss:// or unix://), the same for every daemon of a cluster",
                  "check": check_url},
    )
    node: str = field(
        default_factory=socket.gethostname,
        metadata={"help": "this daemon's node id in the cluster (default: the hostname); must be unique per daemon",
                  "check": check_name},
    )
    key_prefix: str = field(
        default="pegaflow",
        metadata={"help": "prefix of every Redis key, so several clusters (or tests) can share one server",
                  "check": check_name},
    )
    heartbeat: Duration = field(
        default=Duration(1.0),
        metadata={"help": "how often this node renews its membership (and republishes after a Redis restart)",
                  "check": check_positive},
    )
    node_ttl: Duration = field(
        default=Duration(5.0),
        metadata={"help": "a node that has not renewed its membership for this long is dead: its blocks are hidden",
                  "check": check_positive},
    )
    socket_timeout: Duration = field(
        default=Duration(1.0),
        metadata={"help": "connect and reply timeout of every Redis call; keeps a dead server from hanging queries",
                  "check": check_positive},
    )

    def __post_init__(self) -> None:
        # Also checked here so options built in code (not from YAML) are held to the same rules.
        check_url(self.url)
        check_name(self.node)
        check_name(self.key_prefix)
        for name in ("heartbeat", "node_ttl", "socket_timeout"):
            check_positive(getattr(self, name))
        if self.node_ttl <= self.heartbeat:
            raise ValueError(
                f"node_ttl ({self.node_ttl:g}s) must be longer than heartbeat ({self.heartbeat:g}s), "
                "or a live node would keep expiring between two heartbeats; 3-5 heartbeats is typical"
            )
