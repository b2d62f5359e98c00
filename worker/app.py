"""The Celery app of the workers, configured once from the environment (SHUTTLE_*).

Importing this module connects to nothing: the ledger and database connections are opened lazily
inside each worker process, after Celery has forked it.
"""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import celeryd_after_setup, worker_process_shutdown, worker_ready, worker_shutting_down

from common.celery_config import celery_config
from common.settings import load_settings
from worker.context import WorkerContext
from worker.sweeping import SweeperThread

settings = load_settings()
app = Celery("shuttle")
app.conf.update(celery_config(settings))
app.conf.include = ["worker.tasks"]
context = WorkerContext(settings)

logging.getLogger("shuttle").setLevel(logging.INFO)


sweeper = SweeperThread(settings)


@celeryd_after_setup.connect
def _name_worker(sender: str, **_: object) -> None:
    # Before the pool forks, so every pool process inherits the node name.
    context.node = sender


@worker_ready.connect
def _start_sweeper(**_: object) -> None:
    if settings.sweeper:
        sweeper.start()


@worker_shutting_down.connect
def _stop_sweeper(**_: object) -> None:
    sweeper.stop()


@worker_process_shutdown.connect
def _close_connections(**_: object) -> None:
    context.close()
