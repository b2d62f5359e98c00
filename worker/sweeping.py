"""The sweeper's thread in each worker's main process: runs keep healing while any worker is up.

The main process of a prefork worker runs no chunks, so the thread is never starved by one; its ledger
connections are not pooled, so a pool process forked meanwhile inherits none in use.
"""

from __future__ import annotations

import logging
import threading

from common.broker import Broker
from common.ledger import Ledger
from common.settings import Settings
from common.sweeper import Sweeper
from common.urls import mask

log = logging.getLogger("shuttle.sweeper")


class SweeperThread:
    """Sweeps the worker's queue every `sweep_interval` seconds until stopped."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="shuttle sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        ledger, broker = Ledger(self.settings.ledger_url, pooled=False), Broker(self.settings)
        sweeper = Sweeper(ledger, broker, self.settings)
        ready = False
        try:
            while not self._stop.wait(self.settings.sweep_interval):
                try:
                    if not ready:  # a worker may start before any run made the ledger
                        ledger.ensure_schema()
                        ready = True
                    sweeper.sweep()
                except Exception as exc:  # noqa: BLE001 - the next sweep tries again; the thread must live on
                    log.warning("sweeper of queue %s: %s", self.settings.queue, mask(str(exc)))
        finally:
            broker.close()
            ledger.dispose()
