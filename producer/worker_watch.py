"""Which workers consume a run's queue, asked in the background so the progress display never waits on it.

A run with no worker on its queue waits for ever, silently: `watch` and `run --wait` use this to say so
within seconds, and how to start one.
"""

from __future__ import annotations

import threading
import time

from common.broker import Broker

ASK_EVERY_S = 5.0


class WorkerWatch:
    """Asks the broker every `interval` seconds; `workers` is the last answer (None: not known yet)."""

    def __init__(self, broker: Broker, interval: float = ASK_EVERY_S) -> None:
        self.broker = broker
        self.interval = interval
        self.workers: list[str] | None = None
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="shuttle worker watch", daemon=True)

    def __enter__(self) -> WorkerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            answer = self.broker.workers_consuming(timeout=2.0)
            if answer is not None:
                self.workers = answer
            self._stop.wait(self.interval)


def start_worker_hint(queue: str) -> str:
    """How to start a worker on `queue`, as the warning and the README say it."""
    return (f"start one with `celery -A worker worker --queues {queue} --events` (with the same SHUTTLE_* "
            "settings), or `docker compose up -d worker`")
