"""Sending chunk tasks by name: the producer never imports worker code or its drivers."""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError

from common.celery_config import COPY_CHUNK, FINALIZE_RUN, celery_config
from common.errors import ServiceUnavailable
from common.ledger import ChunkRecord
from common.settings import Settings
from common.urls import mask


class Broker:
    """A send-only Celery app configured like the workers'."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = Celery("shuttle-producer")
        self.app.conf.update(celery_config(settings))

    def check_reachable(self) -> None:
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=5)
        except (KombuOperationalError, OSError) as exc:
            raise ServiceUnavailable(
                f"broker {mask(self.settings.broker_url)} is unreachable ({exc.__class__.__name__}: {mask(str(exc))}); "
                "check SHUTTLE_BROKER_URL and that Redis or RabbitMQ is running") from None

    def enqueue_chunks(self, run_id: str, chunks: Sequence[ChunkRecord]) -> int:
        """One message per chunk, task id = chunk id, short argument repr for Flower."""
        try:
            with self.app.producer_or_acquire() as producer:
                for chunk in chunks:
                    spec = chunk.spec
                    self.app.send_task(
                        COPY_CHUNK, args=[run_id, chunk.chunk_id], task_id=chunk.chunk_id, producer=producer,
                        argsrepr=f"{spec.entity} {spec.partition} [{spec.lo}, {spec.hi}) ~{spec.est_rows} rows",
                        kwargsrepr="{}")
        except (KombuOperationalError, OSError) as exc:
            raise ServiceUnavailable(
                f"broker {mask(self.settings.broker_url)} failed while enqueueing run {run_id}: {mask(str(exc))}; "
                f"once it is back, `shuttle resume {run_id}` enqueues what is missing") from None
        return len(chunks)

    def enqueue_finalize(self, run_id: str) -> None:
        self.app.send_task(FINALIZE_RUN, args=[run_id], task_id=f"{run_id}:finalize", argsrepr=repr(run_id))

    def running_chunk_ids(self, timeout: float = 1.0) -> set[str]:
        """Ids of the chunks live workers are running now (a chunk's task id is its id).

        Asked of every worker over the broker; a worker that is gone does not answer, so its chunks are
        not in the set. Empty when no worker answers or the broker cannot say."""
        try:
            replies = self.app.control.inspect(timeout=timeout).active() or {}
        except Exception:  # noqa: BLE001 - unknown means "assume nothing runs": resume then re-enqueues
            return set()
        return {task["id"] for tasks in replies.values() for task in tasks or ()}

    def workers_online(self, timeout: float = 1.0) -> list[str]:
        """Names of workers answering a ping (empty when none, or the broker cannot say)."""
        try:
            replies = self.app.control.ping(timeout=timeout) or []
        except Exception:  # noqa: BLE001 - only informational
            return []
        return sorted(name for reply in replies for name in reply)
