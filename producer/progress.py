"""The live progress bar of `run --wait`, `watch` and `resume --wait`, fed from the ledger."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from common.ledger import Ledger
from common.report import RUNNING

POLL_SECONDS = 0.5
REPORT_WAIT_SECONDS = 30.0


def follow(console: Console, ledger: Ledger, run_id: str, finalize_here: Any) -> dict[str, Any]:
    """Show rows done of total, rows/s, ETA and chunk states until every chunk ended; return the report.

    The coordinator task writes the report; if none arrives shortly after the last chunk (say, no
    worker picked the finalize task up), it is built here, from the same ledger.
    """
    first = ledger.progress(run_id)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.completed:,.0f}/{task.total:,.0f} rows"), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
               TextColumn("chunks {task.fields[done]}/{task.fields[chunks]} done, {task.fields[failed]} failed"))
    started, start_rows = time.monotonic(), first.rows_done
    with Progress(*columns, console=console, transient=False, refresh_per_second=4) as bar:
        task = bar.add_task(run_id, total=max(first.total_rows, 1), rate="", done=0, failed=0,
                            chunks=first.chunk_count)
        while True:
            progress = ledger.progress(run_id)
            elapsed = time.monotonic() - started
            rate = (progress.rows_done - start_rows) / elapsed if elapsed > 0 else 0.0
            bar.update(task, completed=progress.rows_done, rate=f"{rate:,.0f} rows/s",
                       done=progress.chunks.get("done", 0), failed=progress.chunks.get("failed", 0))
            if progress.finished:
                break
            time.sleep(POLL_SECONDS)
    deadline = time.monotonic() + REPORT_WAIT_SECONDS
    while time.monotonic() < deadline:
        report = ledger.get_report(run_id)
        if report is not None and report["verdict"] != RUNNING:
            return report
        time.sleep(POLL_SECONDS)
    return finalize_here(run_id)
