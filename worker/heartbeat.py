"""The heartbeat of a running chunk: a thread that renews its attempt's hold in the ledger.

The sweeper takes a chunk whose heartbeat went silent for its worker gone and sends it again, so the
heartbeat must keep going however long the chunk's reads and writes take; and it must never fail the
chunk itself: a ledger that cannot be reached for a moment only delays the next beat.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

from common.ledger import Ledger
from common.urls import mask

log = logging.getLogger("shuttle.worker")
ROWS_EVERY_S = 1.0


class Heartbeat:
    """`with Heartbeat(ledger, chunk_id, token, interval):` beats every `interval` seconds until the block ends.

    Each beat also records the rows read so far (`rows`), so `watch` and the metrics see a chunk move
    before it ends, from the ledger alone."""

    def __init__(self, ledger: Ledger, chunk_id: str, token: str, interval: float) -> None:
        self.ledger = ledger
        self.chunk_id = chunk_id
        self.token = token
        self.interval = interval
        self.lost = False  # the sweeper gave the chunk to another attempt: this one will record nothing
        self.rows = 0  # rows read so far, set by the chunk's progress; each beat carries it to the ledger
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {chunk_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 15)

    def _beat(self) -> None:
        # A beat is due every `interval`, and sooner (at most once a second) when the rows read moved,
        # so progress in the ledger is smooth even for chunks shorter than the interval.
        step = min(self.interval, ROWS_EVERY_S)
        last_beat, last_rows = time.monotonic(), self.rows
        while not self._stop.wait(step):
            if self.rows == last_rows and time.monotonic() - last_beat < self.interval:
                continue
            last_beat, last_rows = time.monotonic(), self.rows
            try:
                if not self.ledger.heartbeat(self.chunk_id, self.token, rows_done=self.rows) and not self.lost:
                    self.lost = True
                    log.warning("chunk %s: this attempt no longer holds it (sent again after going silent); "
                                "its outcome will not be recorded", self.chunk_id)
            except Exception as exc:  # noqa: BLE001 - a missed beat is only late; it must not end the chunk
                log.warning("chunk %s: heartbeat not written (%s); trying again", self.chunk_id, mask(str(exc)))
