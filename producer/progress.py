"""The live progress of `run --wait`, `watch` and `resume --wait`, fed from the ledger.

Rows move smoothly: the rows of recorded chunks plus what running chunks have read, as their heartbeats
carry it to the ledger (so it works whatever the broker). The display says how many chunks run, wait
and failed, how many workers consume the queue (and warns within seconds when none does), and which
chunks are retrying, at which attempt and why. On a terminal it redraws in place and fits its width
(ids are never cut); anything else (a file, a pipe, CI) gets one plain line every few seconds.

While it follows a run it also sweeps (common.sweeper), so a run heals even where no worker is left
to do it, and it prints what healed: a stale chunk or a lost message sent again, a coordinator started.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from common.errors import TransientError
from common.ledger import Ledger, Progress
from common.report import RUNNING
from common.run_controls import RunControls, read_controls
from common.sweeper import Sweeper
from producer.worker_watch import WorkerWatch, start_worker_hint

POLL_SECONDS = 0.5
PLAIN_EVERY_SECONDS = 10.0
RATE_WINDOW_SECONDS = 20.0
NO_WORKER_GRACE_SECONDS = 3.0
REPORT_WAIT_SECONDS = 30.0
SHOW_RETRYING = 3
EVENT_WORDS = {"stale": "stale", "lost": "lost", "finalize": "coordinator"}


class HealingLog:
    """Prints each healing event of the run once, above the display."""

    def __init__(self, console: Console, ledger: Ledger, run_id: str) -> None:
        self.console, self.ledger, self.run_id = console, ledger, run_id
        self.seen = max((e["id"] for e in ledger.events_since(run_id)), default=0)

    def show_new(self) -> None:
        for event in self.ledger.events_since(self.run_id, self.seen):
            self.seen = event["id"]
            where = f"chunk {event['chunk_id']}" if event["chunk_id"] else f"run {event['run_id']}"
            self.console.print(f"[yellow]{EVENT_WORDS.get(event['kind'], event['kind'])}:[/] {escape(where)}: "
                               f"{escape(event['detail'])}", soft_wrap=True)


class _Rate:
    """Rows per second over the last few seconds: smooth, and honest when a run stalls."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, rows: int) -> float:
        now = time.monotonic()
        self.samples.append((now, rows))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW_SECONDS:
            self.samples.popleft()
        (t0, r0), (t1, r1) = self.samples[0], self.samples[-1]
        return max(0.0, (r1 - r0) / (t1 - t0)) if t1 > t0 else 0.0


def _eta(remaining: int, rate: float) -> str:
    if remaining <= 0:
        return "0:00:00"
    if rate <= 0:
        return "-:--:--"
    seconds = int(remaining / rate)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def summary_line(progress: Progress, workers: list[str] | None, controls: RunControls | None = None) -> str:
    """Chunk states and live workers: `chunks 3/40 done · 2 running · 35 queued · 0 failed · 2 workers`,
    then `· paused` and `· throttled to N rows/s` when the run is."""
    c = progress.chunks
    text = (f"chunks {c.get('done', 0)}/{progress.chunk_count} done · {c.get('running', 0)} running · "
            f"{c.get('queued', 0)} queued · {c.get('failed', 0)} failed")
    if c.get("cancelled"):
        text += f" · {c['cancelled']} cancelled"
    if progress.retrying:
        text += f" · {len(progress.retrying)} retrying"
    if workers is not None:
        text += f" · {len(workers)} worker{'s' if len(workers) != 1 else ''}"
    if controls is not None and controls.describe():
        text += f" · {controls.describe()}"
    return text


def retry_lines(progress: Progress) -> list[str]:
    lines = [f"retrying {r.chunk_id} (attempt {r.attempt})" + (f": {r.error}" if r.error else "")
             for r in progress.retrying[:SHOW_RETRYING]]
    if len(progress.retrying) > SHOW_RETRYING:
        lines.append(f"… and {len(progress.retrying) - SHOW_RETRYING} more retrying (`shuttle status RUN`)")
    return lines


def _rows_text(rows: int, total: int, rate: float) -> str:
    pct = 100 * rows / total if total else 100.0
    return f"{pct:3.0f}% {rows:,}/{total:,} rows {rate:,.0f}/s ETA {_eta(total - rows, rate)}"


def _view(width: int, progress: Progress, rows: int, rate: float, workers: list[str] | None,
          controls: RunControls | None = None) -> Group:
    text = " " + _rows_text(rows, progress.total_rows, rate)
    bar = Table.grid()
    bar.add_column(no_wrap=True)
    bar.add_column(no_wrap=True)
    bar.add_row(ProgressBar(total=max(progress.total_rows, 1), completed=rows, width=max(10, width - len(text) - 1)),
                Text(text))
    lines = [bar, Text(summary_line(progress, workers, controls), overflow="fold")]
    lines += [Text(line, style="yellow", overflow="fold") for line in retry_lines(progress)]
    return Group(*lines)


def follow(console: Console, ledger: Ledger, run_id: str, finalize_here: Callable[[str], dict[str, Any]],
           sweeper: Sweeper | None = None, workers: WorkerWatch | None = None) -> dict[str, Any]:
    """Show rows done of total, rows/s, ETA, chunk states and workers until every chunk ended; return the report.

    The coordinator task writes the report; if none arrives shortly after the last chunk (say, no
    worker picked the finalize task up), it is built here, from the same ledger. A ledger that cannot be
    reached for a while is waited for, not a failure of the run.
    """
    first = ledger.progress(run_id)
    if first.finished:
        stored = ledger.get_report(run_id)
        if stored is not None and stored["verdict"] != RUNNING:
            return stored  # an ended run: its report, not a bar at 0 rows/s
    events = HealingLog(console, ledger, run_id)
    queue = sweeper.queue if sweeper is not None else (workers.broker.settings.queue if workers else "shuttle")
    state = {"warned": False, "next_sweep": time.monotonic(), "next_plain": time.monotonic(), "unreachable": False,
             "controls": None}
    rate = _Rate()

    def poll() -> tuple[Progress, int, float] | None:
        try:
            if sweeper is not None and time.monotonic() >= state["next_sweep"]:
                sweeper.sweep()
                state["next_sweep"] = time.monotonic() + sweeper.settings.sweep_interval
            progress = ledger.progress(run_id)
            state["controls"] = read_controls(ledger, run_id)
            events.show_new()
        except TransientError as exc:
            if not state["unreachable"]:
                console.print(f"[yellow]waiting for the ledger:[/] {escape(str(exc))}", soft_wrap=True)
            state["unreachable"] = True
            return None
        state["unreachable"] = False
        rows = min(progress.total_rows, progress.rows_done + progress.rows_in_flight) if progress.total_rows \
            else progress.rows_done
        _warn_without_workers(console, progress, workers, queue, state)
        return progress, rows, rate.add(rows)

    if console.is_terminal:
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            while True:
                polled = poll()
                if polled is not None:
                    progress, rows, speed = polled
                    live.update(_view(console.width, progress, rows, speed, workers.workers if workers else None,
                                      state["controls"]))
                    if progress.finished:
                        break
                time.sleep(POLL_SECONDS)
    else:
        while True:
            polled = poll()
            if polled is not None:
                progress, rows, speed = polled
                if progress.finished or time.monotonic() >= state["next_plain"]:
                    state["next_plain"] = time.monotonic() + PLAIN_EVERY_SECONDS
                    console.print(f"{run_id}: {_rows_text(rows, progress.total_rows, speed)}; "
                                  f"{summary_line(progress, workers.workers if workers else None, state['controls'])}",
                                  soft_wrap=True, markup=False)
                    for line in retry_lines(progress):
                        console.print(line, soft_wrap=True, markup=False)
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


def _warn_without_workers(console: Console, progress: Progress, workers: WorkerWatch | None, queue: str,
                          state: dict[str, Any]) -> None:
    """Once, within seconds: no worker consumes the queue while chunks wait; and once more when one comes."""
    if workers is None or workers.workers is None:
        return
    waiting = progress.chunks.get("queued", 0) + progress.chunks.get("running", 0)
    if not workers.workers and waiting and not state["warned"] \
            and time.monotonic() - workers.started >= NO_WORKER_GRACE_SECONDS:
        state["warned"] = True
        console.print(f"[bold yellow]no worker consumes queue '{escape(queue)}':[/] the run waits; "
                      f"{escape(start_worker_hint(queue))}", soft_wrap=True)
    elif workers.workers and state["warned"]:
        state["warned"] = False
        console.print(f"workers online on queue '{escape(queue)}': {escape(', '.join(workers.workers))}",
                      soft_wrap=True)
