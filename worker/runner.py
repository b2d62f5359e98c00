"""Runs one attempt at a chunk: claim it in the ledger, copy it under a heartbeat, record the outcome.
Plain code, no Celery.

The task body only decodes arguments and calls `run_chunk`; everything here can be tested by calling
it directly. Every ledger or connection problem surfaces as `RetryChunk`, carrying the attempt's token
so that the retry continues the same claim, and a chunk is never acknowledged without its outcome.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.errors import TransientError
from common.ledger import ChunkRecord, Claim, Skipped
from common.service_errors import on_worker
from common.urls import mask
from worker.context import WorkerContext
from worker.heartbeat import Heartbeat

log = logging.getLogger("shuttle.worker")


@dataclass(frozen=True)
class ChunkResult:
    """What a task returns and whether it must start the coordinator."""

    summary: dict[str, Any]
    run_finished: bool


class RetryChunk(Exception):
    """A transient error during an attempt: retry the task, continuing the claim `token` (None: none held)."""

    def __init__(self, token: str | None, cause: TransientError, migration: str | None = None) -> None:
        super().__init__(str(cause))
        self.token = token
        self.cause = cause
        # What the logs, `watch` and the ledger say: a connection failure names what to fix on this worker.
        self.message = mask(on_worker(str(cause), migration))


def run_chunk(context: WorkerContext, chunk_id: str, progress: Callable[[int, int], None],
              reclaim: str | None = None) -> ChunkResult:
    """Copy one chunk idempotently. Transient errors raise RetryChunk; any other error fails the chunk."""
    ledger, settings = context.ledger, context.settings
    try:
        claimed = ledger.claim_chunk(chunk_id, context.name, settings.stale_after, reclaim, holder_gone)
    except TransientError as exc:
        raise RetryChunk(reclaim, exc) from None
    if isinstance(claimed, Skipped):
        log.info("Worker %s: skipping %s: %s", context.name, chunk_id, claimed.reason)
        return ChunkResult({"skipped": claimed.reason}, run_finished=_finish_if_last(context, chunk_id, reclaim))
    claim: Claim = claimed
    started = time.monotonic()
    report = best_effort(progress, chunk_id)
    try:
        migration = context.migration_for(claim.run)
        throttle = context.throttle_for(claim.run)
        with Heartbeat(ledger, chunk_id, claim.token, settings.heartbeat_interval) as heartbeat:
            def on_rows(rows: int) -> None:
                heartbeat.rows = rows
                report(rows, claim.chunk.spec.est_rows)
                throttle.advance(rows)  # the run's shared row rate (worker.throttle); the heartbeat beats on

            throttle.hold()  # while the source is over its load bound, if the run set one
            outcome = migration.run_chunk(claim.chunk.spec, on_rows)
    except TransientError as exc:
        raise RetryChunk(claim.token, exc, claim.run.migration) from None
    except Exception as exc:  # noqa: BLE001 - any other error is final for this chunk: record it
        context.forget(claim.run.run_id)
        message = mask(f"{type(exc).__name__}: {on_worker(str(exc), claim.run.migration)}")
        log.error("Worker %s: chunk %s failed: %s", context.name, chunk_id, message)
        return ChunkResult({"failed": message}, run_finished=_record_failure(context, claim.chunk, claim.token, message))
    duration = time.monotonic() - started
    try:
        recorded = ledger.record_outcome(claim.chunk, claim.token, outcome, duration)
    except TransientError as exc:
        raise RetryChunk(claim.token, exc) from None
    summary = outcome.summary()
    if not recorded.stored:
        log.warning("Worker %s: chunk %s done in %.2fs but another attempt holds it now; not recorded",
                    context.name, chunk_id, duration)
        return ChunkResult({"superseded": True, **summary}, run_finished=False)
    log.info("Worker %s: chunk %s done in %.2fs: %s", context.name, chunk_id, duration, summary)
    return ChunkResult(summary, run_finished=recorded.run_finished)


def fail_chunk(context: WorkerContext, chunk_id: str, token: str | None, error: str) -> bool:
    """Record a chunk as failed after its retries ran out; True when the run has nothing left.

    Without a claim (the ledger never answered), nothing is recorded: the chunk stays open in the
    ledger, and the sweeper sends it again."""
    chunk = context.ledger.get_chunk(chunk_id) if token else None
    return _record_failure(context, chunk, token, error) if chunk and token else False


def hold_for_retry(context: WorkerContext, chunk_id: str, token: str | None, countdown: float,
                   error: str = "") -> None:
    """Keep the claim through a retry's backoff, so the sweeper does not take the chunk for stale meanwhile,
    and note the error it retries after, so `watch` can say why it is retrying.

    Best effort: if the ledger cannot be reached, the chunk may be sent again once stale, which is safe."""
    if token is None:
        return
    try:
        context.ledger.heartbeat(chunk_id, token, extend_s=countdown, error=f"retrying after: {error}")
    except TransientError as exc:
        log.warning("Worker %s: chunk %s: claim not extended for the retry (%s)", context.name, chunk_id, exc)


def best_effort(progress: Callable[[int, int], None], chunk_id: str) -> Callable[[int, int], None]:
    """The progress callback, made harmless: a broker away for a moment must never fail the chunk it
    reports on (events and task state go through the broker and the result backend)."""
    def report(rows: int, est_rows: int) -> None:
        try:
            progress(rows, est_rows)
        except Exception as exc:  # noqa: BLE001 - kombu, redis and the backends raise several kinds here
            log.debug("chunk %s: progress not sent: %s", chunk_id, exc)
    return report


def holder_gone(worker: str) -> bool:
    """Whether the attempt named in the ledger (`name@host:pid`, or `host:pid` before workers had names)
    is over: its process no longer runs on this host, or it is this very process, which runs one chunk
    at a time (a prefork pool process).

    Lets a chunk whose pool process was killed, or whose claim this process made before a lost
    connection hid the answer, be taken over at once rather than after its heartbeat goes stale."""
    node, _, pid = worker.rpartition(":")
    host = node.rpartition("@")[2]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _record_failure(context: WorkerContext, chunk: ChunkRecord, token: str, message: str) -> bool:
    try:
        return context.ledger.record_failure(chunk, token, message).run_finished
    except TransientError as exc:
        raise RetryChunk(token, exc) from None


def _finish_if_last(context: WorkerContext, chunk_id: str, reclaim: str | None) -> bool:
    # A skipped chunk of a cancelled run may be the last one to end: it must start the coordinator too.
    try:
        chunk = context.ledger.get_chunk(chunk_id)
        return context.ledger.claim_finalize(chunk.run_id) if chunk else False
    except TransientError as exc:
        raise RetryChunk(reclaim, exc) from None
