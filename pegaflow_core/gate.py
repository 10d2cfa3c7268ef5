"""Keeps an engine serving while the daemon is down: after a failed call, answer 'miss' without
asking again for a while, and log the outage once (and its end once), not once per request.
Shared by the engine connectors (vLLM, SGLang)."""

from __future__ import annotations

import logging
import threading
import time


class DaemonGate:
    def __init__(self, endpoint: str, retry_interval_s: float, who: str, logger: logging.Logger | None = None) -> None:
        self.endpoint = endpoint
        self.log = logger or logging.getLogger("pegaflow.client")
        self.retry_interval_s = retry_interval_s
        self.who = who
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self.down = False

    def open(self) -> bool:
        """Whether a call is worth making now."""
        return time.monotonic() >= self._retry_at

    def failed(self, exc: Exception) -> None:
        with self._lock:
            self._retry_at = time.monotonic() + self.retry_interval_s
            if self.down:
                return
            self.down = True
        self.log.warning("pegaflow daemon at %s unavailable for the %s (%s); serving without the cache "
                         "(misses) and retrying every %.1fs", self.endpoint, self.who, exc, self.retry_interval_s)

    def succeeded(self) -> None:
        if not self.down:
            return
        with self._lock:
            if not self.down:
                return
            self.down = False
        self.log.warning("pegaflow daemon at %s is reachable again for the %s", self.endpoint, self.who)
