"""A background queue that seals committed blocks: checksum, then journal.

Checksums cost about as much CPU as the copy that stored the block (pegaflow_core.checksum: ~9 GB/s
on the CI machine, without the GIL), so they are kept off the save path: a block is served as soon
as it is committed and becomes *sealed* — verifiable and remembered across a restart — a moment
later. Under a save rate above what one core can hash, the queue grows and the newest blocks are
the ones a crash would forget, never wrongly remembered.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from pegaflow_core import BlockKey

log = logging.getLogger("pegaflow.dram.sealer")

BATCH = 64


class Sealer:
    def __init__(self, seal_batch: Callable[[list[BlockKey]], None]) -> None:
        self._seal_batch = seal_batch
        self._queue: deque[BlockKey] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="pegaflow-dram-sealer", daemon=True)
        self._thread.start()

    def submit(self, keys: list[BlockKey]) -> None:
        if keys:
            with self._cv:
                self._queue.extend(keys)
                self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self._queue) + self._busy

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """Block until everything submitted so far is sealed (tests, clean shutdown)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._busy, timeout_s)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                self._busy = True
            try:
                self._seal_batch(batch)
            except Exception:
                log.exception("sealing %d blocks failed; they stay unsealed (forgotten at a restart)", len(batch))
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def stop(self) -> None:
        """Seal what is queued, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join()
