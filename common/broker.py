"""Sending chunk tasks by name, and asking the broker what it holds: the producer never imports worker
code or its drivers, and the sweeper (in workers and in `watch`) re-sends through the same class."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError

from common.celery_config import COPY_CHUNK, FINALIZE_RUN, celery_config
from common.errors import ServiceUnavailable
from common.ledger import ChunkRecord
from common.service_errors import service_unavailable
from common.settings import Settings
from common.urls import mask

log = logging.getLogger("shuttle.broker")


def chunk_label(chunk: ChunkRecord) -> str:
    """The short argument repr Flower shows for a chunk task: what it is, never rows or credentials."""
    spec = chunk.spec
    return f"{spec.entity} {spec.partition} [{spec.lo}, {spec.hi}) ~{spec.est_rows} rows"


class Broker:
    """A send-only Celery app configured like the workers'."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = Celery("shuttle-producer")
        self.app.conf.update(celery_config(settings))

    def close(self) -> None:
        self.app.close()

    def check_reachable(self) -> None:
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=5)
        except (KombuOperationalError, OSError) as exc:
            raise service_unavailable("broker", mask(self.settings.broker_url),
                                      f"{exc.__class__.__name__}: {mask(str(exc))}") from None

    def enqueue_chunks(self, run_id: str, chunks: Sequence[ChunkRecord]) -> int:
        """One message per chunk, task id = chunk id, short argument repr for Flower."""
        try:
            with self.app.producer_or_acquire() as producer:
                for chunk in chunks:
                    self.app.send_task(
                        COPY_CHUNK, args=[run_id, chunk.chunk_id], task_id=chunk.chunk_id, producer=producer,
                        argsrepr=chunk_label(chunk), kwargsrepr="{}")
        except (KombuOperationalError, OSError) as exc:
            raise ServiceUnavailable(
                f"broker {mask(self.settings.broker_url)} failed while enqueueing run {run_id}: {mask(str(exc))}; "
                "the chunks stay queued in the ledger and are sent again once it is back") from None
        return len(chunks)

    def enqueue_finalize(self, run_id: str) -> None:
        try:
            self.app.send_task(FINALIZE_RUN, args=[run_id], task_id=f"{run_id}:finalize", argsrepr=repr(run_id))
        except (KombuOperationalError, OSError) as exc:
            raise ServiceUnavailable(f"broker {mask(self.settings.broker_url)} failed while starting the "
                                     f"coordinator of run {run_id}: {mask(str(exc))}") from None

    def queue_depth(self) -> int | None:
        """Messages waiting in the run queue (not those a worker holds), or None when the broker cannot say."""
        try:
            with self.app.connection_for_read() as conn:
                conn.ensure_connection(max_retries=1, timeout=5)
                channel = conn.channel()
                try:
                    return int(channel.queue_declare(queue=self.settings.queue, passive=True)[1])
                except conn.channel_errors:
                    return 0  # no such queue: nothing was ever sent to it, or its last message was taken
                finally:
                    try:
                        channel.close()
                    except conn.connection_errors + conn.channel_errors:
                        pass
        except (KombuOperationalError, OSError) as exc:
            log.warning("broker %s: queue depth unknown (%s)", mask(self.settings.broker_url), mask(str(exc)))
            return None

    def held_by_workers(self, task_ids: Sequence[str], timeout: float = 2.0) -> set[str] | None:
        """Which of `task_ids` live workers hold now: running, prefetched, or waiting for a retry's countdown.

        One broadcast (`query_task`) answered by every worker; a worker that is gone (or stopped) does not
        answer, so its tasks are not in the set. None when the broker cannot be asked."""
        if not task_ids:
            return set()
        try:
            replies = self.app.control.inspect(timeout=timeout).query_task(*task_ids) or {}
        except Exception as exc:  # noqa: BLE001 - unknown is said as None: the caller then re-sends nothing
            log.warning("broker %s: workers could not be asked (%s)", mask(self.settings.broker_url), mask(str(exc)))
            return None
        return {task_id for held in replies.values() for task_id in held or {}}

    def workers_online(self, timeout: float = 1.0) -> list[str]:
        """Names of workers answering a ping (empty when none, or the broker cannot say)."""
        try:
            replies = self.app.control.ping(timeout=timeout) or []
        except Exception:  # noqa: BLE001 - only informational
            return []
        return sorted(name for reply in replies for name in reply)

    def workers_consuming(self, timeout: float = 2.0) -> list[str] | None:
        """Names of live workers that consume this queue; None when the broker cannot be asked.

        One broadcast answered by every worker with the queues it reads: a worker of another queue, or
        one that is gone, is not counted."""
        try:
            replies = self.app.control.inspect(timeout=timeout).active_queues() or {}
        except Exception as exc:  # noqa: BLE001 - unknown is said as None: the caller then warns of nothing
            log.debug("broker %s: workers could not be asked (%s)", mask(self.settings.broker_url), mask(str(exc)))
            return None
        return sorted(name for name, queues in replies.items()
                      if any(q.get("name") == self.settings.queue for q in queues or []))
