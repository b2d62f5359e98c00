"""The coordinator: turns the ledger of a run whose chunks have all ended into its report."""

from __future__ import annotations

import logging
from typing import Any

from common.report import build_report, close_run
from worker.context import WorkerContext

log = logging.getLogger("shuttle.worker")


def finalize(context: WorkerContext, run_id: str) -> dict[str, Any]:
    run = context.ledger.get_run(run_id)
    if run is None:
        raise LookupError(f"run {run_id} is not in the ledger")
    migration = context.migration_for(run)
    report = close_run(context.ledger, run, migration, build_report(context.ledger, run, migration))
    log.info("Worker %s: run %s finalized: %s", context.name, run_id, report["verdict"])
    context.forget(run_id)
    return report
