"""The live progress bar of `run --wait`, `watch` and `resume --wait`, fed from the ledger.

While it follows a run it also sweeps (common.sweeper), so a run heals even where no worker is left
to do it, and it prints what healed: a stale chunk or a lost message sent again, a coordinator started.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from common.errors import TransientError
from common.ledger import Ledger
from common.report import RUNNING
from common.sweeper import Sweeper

POLL_SECONDS = 0.5
REPORT_WAIT_SECONDS = 30.0
EVENT_WORDS = {"stale": "stale", "lost": "lost", "finalize": "coordinator"}


class HealingLog:
    """Prints each healing event of the run once, above the bar."""

    def __init__(self, console: Console, ledger: Ledger, run_id: str) -> None:
        self.console, self.ledger, self.run_id = console, ledger, run_id
        self.seen = max((e["id"] for e in ledger.events_since(run_id)), default=0)

    def show_new(self) -> None:
        for event in self.ledger.events_since(self.run_id, self.seen):
            self.seen = event["id"]
            where = f"chunk {event['chunk_id']}" if event["chunk_id"] else f"run {event['run_id']}"
            self.console.print(f"[yellow]{EVENT_WORDS.get(event['kind'], event['kind'])}:[/] {escape(where)}: "
                               f"{escape(event['detail'])}")


def follow(console: Console, ledger: Ledger, run_id: str, finalize_here: Callable[[str], dict[str, Any]],
           sweeper: Sweeper | None = None) -> dict[str, Any]:
    """Show rows done of total, rows/s, ETA and chunk states until every chunk ended; return the report.

    The coordinator task writes the report; if none arrives shortly after the last chunk (say, no
    worker picked the finalize task up), it is built here, from the same ledger. A ledger that cannot be
    reached for a while is waited for, not a failure of the run.
    """
    first = ledger.progress(run_id)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.completed:,.0f}/{task.total:,.0f} rows"), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
               TextColumn("chunks {task.fields[done]}/{task.fields[chunks]} done, {task.fields[running]} running, "
                          "{task.fields[failed]} failed"))
    started, start_rows = time.monotonic(), first.rows_done
    events = HealingLog(console, ledger, run_id)
    next_sweep = time.monotonic()
    unreachable = False
    with Progress(*columns, console=console, transient=False, refresh_per_second=4) as bar:
        task = bar.add_task(run_id, total=max(first.total_rows, 1), rate="", done=0, failed=0, running=0,
                            chunks=first.chunk_count)
        while True:
            try:
                if sweeper is not None and time.monotonic() >= next_sweep:
                    sweeper.sweep()
                    next_sweep = time.monotonic() + sweeper.settings.sweep_interval
                progress = ledger.progress(run_id)
                events.show_new()
            except TransientError as exc:
                if not unreachable:
                    console.print(f"[yellow]waiting for the ledger:[/] {escape(str(exc))}")
                unreachable = True
                time.sleep(POLL_SECONDS)
                continue
            unreachable = False
            elapsed = time.monotonic() - started
            rate = (progress.rows_done - start_rows) / elapsed if elapsed > 0 else 0.0
            bar.update(task, completed=progress.rows_done, rate=f"{rate:,.0f} rows/s",
                       done=progress.chunks.get("done", 0), failed=progress.chunks.get("failed", 0),
                       running=progress.chunks.get("running", 0))
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
