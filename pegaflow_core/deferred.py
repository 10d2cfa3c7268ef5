"""Work a fetch leaves behind (telling the cluster index what arrived, ending the owner's pin),
done a moment later on a thread of its own, in batches.

Why later: on the 2-core VM each of these costs ~0.7 ms of Python under the GIL. Done on the
fetching thread right after the blocks arrive, it delayed the Query's answer by as much; done on
a thread that starts at once, it competed with that answer for the GIL and took just as long
(docs/benchmarks.md, session 16). Waiting a few milliseconds puts it after the answer, and what
queued up meanwhile (several engines' fetches) goes out as one batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger("pegaflow.deferred")

Item = TypeVar("Item")


class Deferred(Generic[Item]):
    """Items handed to ``run`` ``delay_s`` after the first of them was queued, together with
    those queued by then, on one daemon thread started on first use. ``close`` runs what is
    still queued and stops the thread; items queued after it are dropped (callers use this
    for best-effort work that has a fallback: a pin that expires, a re-publish)."""

    def __init__(self, name: str, run: Callable[[list[Item]], None], delay_s: float) -> None:
        self._name = name
        self._run = run
        self._delay_s = delay_s
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def put(self, item: Item) -> None:
        with self._lock:
            if self._closed:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put(item)

    def close(self, timeout_s: float = 2.0) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=timeout_s)

    def _loop(self) -> None:
        stop = False
        while not stop and (first := self._queue.get()) is not None:
            time.sleep(self._delay_s)
            batch = [first]
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                self._run(batch)
            except Exception:  # best effort: the next batch must still go out
                log.exception("%s: deferred work failed", self._name)
