#!/usr/bin/env python
"""What Shuttle, pgloader and dlt do when a copy is interrupted and started again (the comparison
table's "resume" cells): not a benchmark, a behaviour check, on a smaller table.

    .venv/bin/python ops/bench/declarative_behaviour.py --rows 400000

Each tool copies the same `archived_predictions` (bench_declarative.py's shape) into an empty target
and is stopped part-way:
  shuttle    the migration file with 1 worker; `cancel` once a third of the chunks are done, then
             `resume` with the worker running; the ledger says which chunks ran again;
  pgloader   killed (SIGKILL: it finishes its load on SIGTERM) half-way through a whole run's time, then run again;
  dlt        killed (SIGTERM) half-way through the time a whole run takes, then run again.
Printed, and written to the `behaviour` section of ops/bench/RESULTS.md. Databases shuttle_declbehav*.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_declarative as bench  # noqa: E402  (puts the project root on sys.path too)
from benchlib import db, log  # noqa: E402

from common.ledger import Ledger  # noqa: E402
from common.migrations.base import Selection  # noqa: E402
from common.settings import load_settings  # noqa: E402
from producer import commands  # noqa: E402
from producer.local_workers import LocalWorkers  # noqa: E402


def count(database: str, table: str) -> int:
    with db(bench.url(database)) as conn:
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
            return 0
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def shuttle_resume(rows: int, work: Path, chunk_rows: int) -> dict[str, Any]:
    P = bench.PLACES
    broker = "redis://127.0.0.1:6379/10"
    settings = load_settings(source_url=bench.url(P.source), target_url=bench.url(P.target),
                             ledger_url=bench.url(P.ledger), broker_url=broker, result_backend=broker,
                             queue=f"shuttle-declbehav-{os.getpid()}")
    ledger = Ledger(bench.url(P.ledger))
    ledger.ensure_schema()
    toml = work / "declbehav.toml"
    toml.write_text(bench.MIGRATION_FILE.format(table=bench.SHUTTLE_TABLE))
    with db(bench.url(P.target)) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {bench.SHUTTLE_TABLE}")

    def states(run_id: str) -> dict[str, int]:
        with db(bench.url(P.ledger)) as conn:
            return dict(conn.execute("SELECT state, count(*) FROM shuttle.chunks WHERE run_id = %s GROUP BY 1",
                                     (run_id,)).fetchall())

    (work / "workers").mkdir(parents=True, exist_ok=True)
    with LocalWorkers(settings, 1, name="declbehav", log_dir=work / "workers"):
        run = commands.start_run(settings, str(toml), Selection(), chunk_rows, None,
                                 source_url=bench.url(P.source), target_url=bench.url(P.target))
        total = run.chunk_count
        wait_until(lambda: states(run.run_id).get("done", 0) >= total // 3, 600)
        commands.cancel(settings, run.run_id)
        # As a user would: resume once the cancelled run is closed (its report written), not while it closes.
        wait_until(lambda: (ledger.get_report(run.run_id) or {}).get("verdict") == "cancelled", 600, 0.1)
        before = states(run.run_id)
        rows_before = count(P.target, bench.SHUTTLE_TABLE)
        commands.resume(settings, run.run_id)
        wait_until(lambda: states(run.run_id).get("done", 0) == total, 900, 0.2)
        # The cancel's own report is replaced once the resumed run ends.
        wait_until(lambda: (ledger.get_report(run.run_id) or {}).get("verdict") in ("clean", "failed"), 300, 0.2)
        report = ledger.get_report(run.run_id)
    with db(bench.url(P.ledger)) as conn:
        attempts = conn.execute("SELECT count(*) FILTER (WHERE attempts > 1), count(*) FROM shuttle.chunks"
                                " WHERE run_id = %s", (run.run_id,)).fetchone()
    ledger.dispose()
    return {"chunks": total, "done_before_resume": before.get("done", 0), "states_at_cancel": before,
            "target_rows_at_cancel": rows_before, "verdict": report["verdict"],
            "rows_read": report["totals"]["rows_read"], "rows_written": report["totals"]["rows_written"],
            "target_rows": count(P.target, bench.SHUTTLE_TABLE), "chunks_run_twice": attempts[0], "source_rows": rows}


def pgloader_resume(rows: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    P = bench.PLACES
    bench.recreate(P.pgloader)
    command = bench.pgloader_file(work, "behaviour", args.pgloader_with)
    full = bench.pgloader_run(command, args.pgloader_heap_mb, 900)
    bench.recreate(P.pgloader)
    process = subprocess.Popen(["pgloader", "--dynamic-space-size", str(args.pgloader_heap_mb), str(command)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    # Its rows become visible only as its COPY commits, so the stop is timed: half of a whole run.
    time.sleep(full["seconds"] / 2)
    # SIGKILL, as a crash or an OOM kill would: pgloader finishes its load on a SIGTERM.
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    table = f"public.{bench.TABLE}"
    at_stop = count(P.pgloader, table)
    again = bench.pgloader_run(command, args.pgloader_heap_mb, 900)
    return {"full_run_seconds": round(full["seconds"], 1), "stopped_after_seconds": round(full["seconds"] / 2, 1),
            "stopped_at_rows": at_stop, "second_run_rows_copied": again["rows_reported"],
            "second_run_exit": again["exit"], "second_run_seconds": round(again["seconds"], 1),
            "target_rows": again["target_rows"], "source_rows": rows}


def dlt_resume(rows: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    P = bench.PLACES
    bench.recreate(P.dlt)
    full = bench.dlt_run(work / "dlt-full", True, args.dlt_chunk_size, 1800)
    with db(bench.url(P.dlt)) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {bench.DLT_SCHEMA} CASCADE")
    dlt_dir = work / "dlt"
    dlt_dir.mkdir(parents=True, exist_ok=True)
    target = f"postgresql://postgres:unused@127.0.0.1:5432/{P.dlt}"
    argv = [sys.executable, "-c", bench.DLT_SCRIPT, str(dlt_dir), bench.url(P.source), target, bench.TABLE,
            str(args.dlt_chunk_size), bench.DLT_SCHEMA]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=dlt_dir)
    time.sleep(full["process_seconds"] / 2)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    at_stop = count(P.dlt, f"{bench.DLT_SCHEMA}.{bench.TABLE}")
    again = bench.dlt_run(dlt_dir, False, args.dlt_chunk_size, 1800)
    return {"full_run_seconds": round(full["seconds"], 1), "stopped_after_seconds": round(full["process_seconds"] / 2, 1),
            "target_rows_at_stop": at_stop, "second_run_rows_extracted": again["rows_normalized"],
            "second_run_seconds": round(again["seconds"], 1), "target_rows": again["target_rows"],
            "source_rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--chunk-rows", type=int, default=20_000)
    parser.add_argument("--pgloader-heap-mb", type=int, default=4096)
    parser.add_argument("--pgloader-with", default="prefetch rows = 10000, batch rows = 10000, workers = 2, "
                        "concurrency = 1")
    parser.add_argument("--dlt-chunk-size", type=int, default=50_000)
    parser.add_argument("--db-prefix", default="shuttle_declbehav")
    parser.add_argument("--reuse-source", action="store_true")
    parser.add_argument("--results", type=Path, default=bench.RESULTS)
    args = parser.parse_args()
    bench.PLACES = bench.Places(args.db_prefix)
    work = Path(f"/tmp/shuttle-declbehav-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    bench.prepare_source(args.rows, args.reuse_source)
    for database in (bench.PLACES.target, bench.PLACES.pgloader, bench.PLACES.dlt, bench.PLACES.ledger):
        bench.recreate(database)
    found = {}
    for name, probe in (("shuttle", lambda: shuttle_resume(args.rows, work, args.chunk_rows)),
                        ("pgloader", lambda: pgloader_resume(args.rows, work, args)),
                        ("dlt", lambda: dlt_resume(args.rows, work, args))):
        log(f"{name} …")
        found[name] = probe()
        log(f"  {found[name]}")
    s, p, d = found["shuttle"], found["pgloader"], found["dlt"]
    body = [f"## Interrupted and started again ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC)", "",
            f"Command: `.venv/bin/python ops/bench/declarative_behaviour.py {' '.join(sys.argv[1:])}` "
            f"({args.rows:,} rows; a behaviour check, not a timing).", "",
            "| tool | stopped how | in the target when stopped | what the next run did | end state |",
            "|---|---|---|---|---|",
            f"| Shuttle (migration file, 1 worker) | `cancel` after {s['done_before_resume']} of {s['chunks']} chunks "
            f"were done | {s['target_rows_at_cancel']:,} rows | `resume` ran only the chunks not done; chunks run "
            f"twice: {s['chunks_run_twice']} | verdict {s['verdict']}, {s['target_rows']:,} of {s['source_rows']:,} "
            "rows |",
            f"| pgloader | SIGKILL after {p['stopped_after_seconds']}s (a whole run: {p['full_run_seconds']}s) | {p['stopped_at_rows']:,} rows | started over (its "
            f"default `include drop, create tables`): copied {p['second_run_rows_copied'] or 0:,} rows in {p['second_run_seconds']}s "
            f"(exit {p['second_run_exit']}) | {p['target_rows']:,} of {p['source_rows']:,} rows |",
            f"| dlt | SIGTERM after {d['stopped_after_seconds']}s (a whole run: {d['full_run_seconds']}s in "
            f"`pipeline.run`) | {d['target_rows_at_stop']:,} rows | extracted {d['second_run_rows_extracted'] or 0:,} "
            f"rows again, {d['second_run_seconds']}s | {d['target_rows']:,} of {d['source_rows']:,} rows |"]
    print("\n" + "\n".join(body) + "\n")
    text = args.results.read_text() if args.results.exists() else ""
    start, end = "<!-- section:declarative-behaviour -->\n", "<!-- /section:declarative-behaviour -->\n"
    section = start + "\n".join(body) + f"\n\n<!-- data: {json.dumps(found, default=str)} -->\n" + end
    if start in text and end in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    args.results.write_text(text)
    log(f"wrote {args.results}")


if __name__ == "__main__":
    main()
