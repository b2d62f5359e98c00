"""What the progress display and the per-table check say, from plain values (no services)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from rich.console import Console

from common.ledger import Progress, Retrying, RunRecord
from common.run_controls import RunControls
from producer.display import show_check_summary, show_runs
from producer.progress import _view, retry_lines, summary_line


def progress(**chunks: int) -> Progress:
    return Progress(total_rows=1000, rows_done=400, chunks=chunks, rows_in_flight=150,
                    retrying=(Retrying("run-1:predictions:" + "a" * 24 + ":20260601T00-20260602T00", 3,
                                       "retrying after: target db: deadlock detected"),))


def test_summary_names_running_queued_failed_retrying_and_workers():
    line = summary_line(progress(done=4, running=2, queued=5, failed=1), ["w1@h", "w2@h"])
    assert line == "chunks 4/12 done · 2 running · 5 queued · 1 failed · 1 retrying · 2 workers"
    assert summary_line(progress(queued=3), None).endswith("1 retrying"), "workers unknown: not claimed"
    (retry,) = retry_lines(progress(running=1))
    assert retry.startswith("retrying run-1:predictions:") and "(attempt 3)" in retry and "deadlock" in retry


def test_the_live_view_fits_80_columns_and_keeps_ids_whole():
    console = Console(width=80, record=True, force_terminal=True, color_system=None)
    p = progress(done=4, running=2, queued=5)
    console.print(_view(80, p, 550, 1234.5, ["w1@h"]))
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "55% 550/1,000 rows 1,234/s ETA 0:00:00" in lines[0] and "━" in lines[0]
    text = "".join(line.strip() for line in lines[2:])
    assert p.retrying[0].chunk_id in text, "a folded chunk id is still whole once joined"


def test_the_check_summary_sums_every_failing_partition():
    checks = [{"entity": "prediction_stats_hourly", "partition": p, "ok": ok, "source_rows": s, "target_rows": t,
               "rejected_rows": 0, "detail": d}
              for p, ok, s, t, d in (("d1", False, 100, 60, "40 rows missing"), ("d2", False, 50, 20, "30 rows missing"),
                                     ("d3", True, 10, 10, ""))]
    console = Console(width=200, record=True, color_system=None)
    show_check_summary(console, checks)
    out = console.export_text()
    assert "2 of 3 partitions disagree: source 150, target 80" in out and "first: 40 rows missing" in out


def test_the_run_list_shows_how_long_a_finished_run_took_and_a_running_one_has_run():
    now = datetime.now(timezone.utc)

    def run(run_id: str, status: str, started_ago: float, took: float | None) -> RunRecord:
        created = now - timedelta(seconds=started_ago)
        return RunRecord(run_id, "modmon", status, {}, {}, "postgresql://db/src", "postgresql://db/dst", 60_007, 1, None,
                         created_at=created, finished_at=created + timedelta(seconds=took) if took else None)

    console = Console(width=80, record=True, force_terminal=True, color_system=None)
    live = run("modmon-20261202T132309-7260", "running", 125, None)
    show_runs(console, [live, run("modmon-done", "completed", 900, 61)], {"modmon-done": "clean"},
              {live.run_id: RunControls(max_rows_per_second=2000, paused_at=now)})
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines)
    rows = {line.split()[1]: line for line in lines if "modmon-" in line}
    rows["modmon-live"] = rows.pop(live.run_id)
    assert "60,007" in rows["modmon-live"], "the rows are not cut"
    verdict_cells = " ".join(line.split("│")[2].strip() for line in lines if line.count("│") > 2)
    assert "running, paused, ≤2,000/s" in verdict_cells, "the verdict wraps rather than being cut"
    assert "2m0" in rows["modmon-live"], "a running run shows its time so far"
    assert "1m01s" in rows["modmon-done"]
