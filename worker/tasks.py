"""The Celery tasks: thin wrappers that decode ids, call plain code and return tiny outcomes.

Arguments are ids only (run id, chunk id, and on a retry the attempt's token), never rows or
credentials; Flower shows their readable `argsrepr`, kept on every retry. Celery states mean what they
say: a chunk that fails for good ends as FAILURE (after the ledger recorded it), a running one is in
PROGRESS with its rows done and estimate as task meta, and the coordinator's result is the verdict.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from celery import Task

from common.celery_config import COPY_CHUNK, FINALIZE_RUN
from common.errors import ChunkFailed, TransientError
from common.urls import mask
from worker.app import app, context, settings
from worker.coordinator import finalize
from worker.runner import RetryChunk, fail_chunk, hold_for_retry, run_chunk

log = logging.getLogger("shuttle.worker")


def _backoff(retries: int) -> float:
    """Exponential backoff with jitter, capped: 1s, 2s, 4s … up to retry_backoff_max."""
    return min(settings.retry_backoff_max, 2 ** retries) * random.uniform(0.75, 1.25)


# `throws`: a chunk failed for good is an expected outcome, logged as one line, not a traceback.
@app.task(name=COPY_CHUNK, bind=True, max_retries=settings.task_max_retries, throws=(ChunkFailed,))
def copy_chunk(self: Task, run_id: str, chunk_id: str, reclaim: str | None = None) -> dict[str, Any]:
    """Copy one chunk; retried with backoff on transient errors only, never on bad data."""

    def progress(rows: int, est_rows: int) -> None:
        publish_progress(self, run_id, chunk_id, rows, est_rows)

    try:
        result = run_chunk(context, chunk_id, progress, reclaim)
    except RetryChunk as retry:
        if self.request.retries >= self.max_retries:
            message = f"gave up after {self.request.retries} retries: {retry.message}"
            log.error("Worker %s: chunk %s %s", context.name, chunk_id, message)
            try:
                if fail_chunk(context, chunk_id, retry.token, message):
                    enqueue_finalize(run_id)
            except RetryChunk as again:  # the ledger is still away: the sweeper finds the chunk stale later
                log.error("Worker %s: chunk %s not marked failed: %s", context.name, chunk_id, again.cause)
            show_result(self, chunk_id, f"failed: {message}")
            raise ChunkFailed(message) from None
        countdown = _backoff(self.request.retries)
        hold_for_retry(context, chunk_id, retry.token, countdown, retry.message)
        log.warning("Worker %s: chunk %s transient error, retrying in %.0fs: %s", context.name, chunk_id,
                    countdown, retry.message)
        raise self.retry(exc=retry.cause, countdown=countdown, kwargs={"reclaim": retry.token},
                         argsrepr=getattr(self.request, "argsrepr", None), kwargsrepr="{}") from None
    if result.run_finished:
        enqueue_finalize(run_id)
    if "failed" in result.summary:  # recorded in the ledger already: now Celery says so too
        show_result(self, chunk_id, f"failed: {result.summary['failed']}")
        raise ChunkFailed(result.summary["failed"])
    return result.summary


def publish_progress(task: Task, run_id: str, chunk_id: str, rows: int, est_rows: int) -> None:
    """A running chunk's rows done and estimate: PROGRESS task meta in the result backend (what Flower's
    `/api/task/result` and `AsyncResult.info` answer), and a `task-progress` event whose `result` field
    Flower's task list, task page and `/api/task/info` show while the chunk runs.

    Best effort: a broker or backend that is away for a moment must never fail the chunk it reports on."""
    meta = {"rows": rows, "est_rows": est_rows}
    try:
        task.update_state(state="PROGRESS", meta=meta)
        task.send_event("task-progress", retry=False, run_id=run_id, rows=rows, est_rows=est_rows, result=repr(meta))
    except Exception as exc:  # noqa: BLE001 - kombu and redis raise several kinds here
        log.debug("Worker %s: progress of %s not sent: %s", context.name, chunk_id, exc)


@app.task(name=FINALIZE_RUN, bind=True, max_retries=settings.task_max_retries)
def finalize_run(self: Task, run_id: str) -> dict[str, Any]:
    """The coordinator: aggregate the ledger into the run's report and close the run."""
    try:
        report = finalize(context, run_id)
    except TransientError as exc:
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from None
    totals = report.get("totals", {})
    return {"run_id": run_id, "verdict": report["verdict"], "status": report.get("status"),
            "chunks": report.get("chunks", {}),
            "rows": {key: totals.get(key, 0) for key in ("source_rows", "rows_read", "rows_written", "rows_unchanged",
                                                         "rows_deleted", "rows_rejected")}}


def show_result(task: Task, chunk_id: str, text: str) -> None:
    """Replace the last progress Flower shows in a chunk's result column (the failed event does not), so a
    failed chunk reads as its error there. Best effort, like progress."""
    try:
        task.send_event("task-progress", retry=False, result=text)
    except Exception as exc:  # noqa: BLE001 - kombu and redis raise several kinds here
        log.debug("Worker %s: result of %s not shown: %s", context.name, chunk_id, exc)


def enqueue_finalize(run_id: str) -> None:
    """Start the coordinator; if the broker is away, the sweeper starts it once it is back."""
    try:
        finalize_run.apply_async(args=[run_id], task_id=f"{run_id}:finalize", argsrepr=repr(run_id))
    except Exception as exc:  # noqa: BLE001 - kombu raises several kinds; the ledger still says who finalizes
        log.warning("Worker %s: coordinator of run %s not started now (%s); the sweeper will", context.name,
                    run_id, mask(str(exc)))
