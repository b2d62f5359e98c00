"""Runs one chunk: claim it in the ledger, copy it, record the outcome. Plain code, no Celery.

The task body only decodes arguments and calls `run_chunk`; everything here can be tested by
calling it directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.errors import TransientError
from common.ledger import ChunkRecord
from common.urls import mask
from worker.context import WorkerContext

log = logging.getLogger("shuttle.worker")


@dataclass(frozen=True)
class ChunkResult:
    """What a task returns and whether it must start the coordinator."""

    summary: dict[str, Any]
    run_finished: bool


def run_chunk(context: WorkerContext, chunk_id: str, progress: Callable[[int, int], None]) -> ChunkResult:
    """Copy one chunk idempotently. TransientError propagates (the task retries); other errors fail it."""
    claimed = context.ledger.claim_chunk(chunk_id, context.name)
    if claimed is None:
        log.info("Worker %s: skipping %s (done already, run cancelled, or unknown)", context.name, chunk_id)
        return ChunkResult({"skipped": True}, run_finished=_finish_if_last(context, chunk_id))
    run, chunk = claimed
    started = time.monotonic()
    migration = context.migration_for(run)
    try:
        outcome = migration.run_chunk(chunk.spec, lambda rows: progress(rows, chunk.spec.est_rows))
    except TransientError:
        raise
    except Exception as exc:  # noqa: BLE001 - any other error is final for this chunk: record it
        context.forget(run.run_id)
        message = mask(f"{type(exc).__name__}: {exc}")
        log.error("Worker %s: chunk %s failed: %s", context.name, chunk_id, message)
        return ChunkResult({"failed": message}, run_finished=context.ledger.record_failure(chunk, message))
    duration = time.monotonic() - started
    last = context.ledger.record_outcome(chunk, outcome, duration)
    summary = outcome.summary()
    log.info("Worker %s: chunk %s done in %.2fs: %s", context.name, chunk_id, duration, summary)
    return ChunkResult(summary, run_finished=last)


def fail_chunk(context: WorkerContext, chunk_id: str, error: str) -> bool:
    """Record a chunk as failed after its retries ran out; True when the run has nothing left."""
    chunk = _chunk(context, chunk_id)
    return context.ledger.record_failure(chunk, error) if chunk else False


def _finish_if_last(context: WorkerContext, chunk_id: str) -> bool:
    # A skipped chunk of a cancelled run may be the last one to end: it must start the coordinator too.
    chunk = _chunk(context, chunk_id)
    return context.ledger.claim_finalize(chunk.run_id) if chunk else False


def _chunk(context: WorkerContext, chunk_id: str) -> ChunkRecord | None:
    return context.ledger.get_chunk(chunk_id)
