#!/usr/bin/env python
"""Benchmark of `mlflow-latest-metrics` against MLflow's own approach and the one-statement ceiling.

    .venv/bin/python ops/bench/bench_latest_metrics.py --rows 200000 --runs 2000 --repeats 1   # quick try
    .venv/bin/python ops/bench/bench_latest_metrics.py --rows 2000000 --runs 20000 --repeats 3 # the figures

Per repeat, interleaved so noise hits every method alike:
  mlflow     MLflow's alembic migration 89d4b8295536 as one statement: its three nested max() aggregations
             (max step, then max timestamp at that step, then max value) inserted into latest_metrics,
             emptied first. That is what the migration does: it creates latest_metrics with its primary
             key and foreign key, then adds the rows it computed (through the ORM, here in SQL);
  mlflow-ctas  (information) the same SELECT as `CREATE TABLE … AS` into a new bare table: no key, no
             index, no foreign key, and a parallel plan, which an INSERT cannot use;
  ceiling    one `CREATE TABLE … AS SELECT DISTINCT ON (run_uuid, key) … ORDER BY run_uuid, key,
             step DESC, timestamp DESC, value DESC`;
  ceiling-mlflow-table  (information) the same SELECT inserted into MLflow's own latest_metrics, emptied
             first: what writing the table Shuttle must write (primary key, index, foreign key) costs;
  shuttle-1  `start_run` → report in the ledger, 1 local worker process, latest_metrics emptied first;
  shuttle-2  the same with 2 worker processes;
  rerun      a second run over the filled table (2 workers); its report must say rows_written == 0.
Then once: a run cancelled half-way and resumed, to show the resume redoes only unfinished chunks.
Rows/s are metric rows / wall seconds. Shuttle's table is compared row for row with the ceiling's.

Uses only its own places: database `shuttle_lm_<pid>_bench` (MLflow's schema, filled by
`build_bulk`), ledger `shuttle_lm_<pid>_bench_ledger`, both dropped at the end unless --keep; the
broker is Redis DB 14 with a queue of its own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from common.connectors.postgres import create_database  # noqa: E402
from common.ledger import Ledger  # noqa: E402
from common.migrations.base import Selection  # noqa: E402
from common.migrations.mlflow_metrics_fixtures import build_bulk  # noqa: E402
from common.settings import Settings, load_settings  # noqa: E402
from producer import commands  # noqa: E402
from producer.local_workers import LocalWorkers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import db, log, machine, spread, wait_report  # noqa: E402

PG = "postgresql://postgres@127.0.0.1:5432"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MIGRATION = "mlflow-latest-metrics"
COLUMNS = "key, value, timestamp, step, is_nan, run_uuid"

# MLflow's own computation (mlflow/store/db_migrations/versions/89d4b8295536_create_latest_metrics_table.py),
# its three ORM queries written as the one statement they compose to.
MLFLOW_SELECT = """
SELECT m.run_uuid, m.key, m.step, m.timestamp, max(m.value) AS value, m.is_nan
FROM metrics m JOIN (
    SELECT m2.run_uuid, m2.key, m2.step, max(m2.timestamp) AS timestamp
    FROM metrics m2 JOIN (
        SELECT run_uuid, key, max(step) AS step FROM metrics GROUP BY key, run_uuid
    ) max_step ON m2.step = max_step.step AND m2.run_uuid = max_step.run_uuid AND m2.key = max_step.key
    GROUP BY m2.key, m2.run_uuid, m2.step
) max_ts ON m.timestamp = max_ts.timestamp AND m.run_uuid = max_ts.run_uuid AND m.key = max_ts.key
        AND m.step = max_ts.step
GROUP BY m.run_uuid, m.key, m.step, m.timestamp, m.is_nan
"""
# (a): the migration's table is created with its primary key and foreign key, then filled.
MLFLOW_INTO_LATEST_METRICS = f"INSERT INTO latest_metrics (run_uuid, key, step, timestamp, value, is_nan) {MLFLOW_SELECT}"
# (a′), information: the same SELECT into a new table without key, index or foreign key.
MLFLOW_ALEMBIC = f"CREATE TABLE bench_mlflow_alembic AS {MLFLOW_SELECT}"
CEILING = f"""
CREATE TABLE bench_ceiling AS
SELECT DISTINCT ON (run_uuid, key) {COLUMNS} FROM metrics
ORDER BY run_uuid, key, step DESC, timestamp DESC, value DESC
"""


CEILING_INTO_LATEST_METRICS = f"""
INSERT INTO latest_metrics ({COLUMNS})
SELECT DISTINCT ON (run_uuid, key) {COLUMNS} FROM metrics
ORDER BY run_uuid, key, step DESC, timestamp DESC, value DESC
"""


def timed_into_latest_metrics(url: str, statement: str) -> float:
    with db(url) as conn:
        conn.execute("TRUNCATE latest_metrics")
        started = time.monotonic()
        conn.execute(statement)
        return time.monotonic() - started


def timed_statement(url: str, table: str, statement: str) -> float:
    with db(url) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        started = time.monotonic()
        conn.execute(statement)
        return time.monotonic() - started


def differences(url: str, table: str) -> int:
    """Rows in latest_metrics and `table` that are not in both (0 = identical tables)."""
    with db(url) as conn:
        return conn.execute(f"""SELECT (SELECT count(*) FROM (SELECT {COLUMNS} FROM latest_metrics
                                        EXCEPT ALL SELECT {COLUMNS} FROM {table}) a)
                                     + (SELECT count(*) FROM (SELECT {COLUMNS} FROM {table}
                                        EXCEPT ALL SELECT {COLUMNS} FROM latest_metrics) b)""").fetchone()[0]


def shuttle_run(settings: Settings, ledger: Ledger, workers: int, chunk_rows: int, fresh: bool,
                log_dir: Path) -> dict[str, Any]:
    if fresh:
        with db(settings.target_url) as conn:
            conn.execute("TRUNCATE latest_metrics")
    with LocalWorkers(settings, workers, name=f"lmbench{workers}", log_dir=log_dir):
        started = time.monotonic()
        run = commands.start_run(settings, MIGRATION, Selection(), chunk_rows, None,
                                 source_url=settings.source_url, target_url=settings.target_url)
        planned = time.monotonic()
        report = wait_report(ledger, run.run_id)
        ended = time.monotonic()
    totals = report["totals"]
    return {"seconds": ended - started, "plan_s": planned - started, "chunks": run.chunk_count,
            "verdict": report["verdict"], "rows_read": totals["rows_read"], "rows_written": totals["rows_written"],
            "chunk_wall_s": report["timing"].get("wall_seconds")}


def resume_scenario(settings: Settings, ledger: Ledger, chunk_rows: int, log_dir: Path) -> dict[str, Any]:
    """Cancel a 2-worker run once about half its chunks are done, then resume it and time the rest."""
    with db(settings.target_url) as conn:
        conn.execute("TRUNCATE latest_metrics")
    with LocalWorkers(settings, 2, name="lmbenchresume", log_dir=log_dir):
        run = commands.start_run(settings, MIGRATION, Selection(), chunk_rows, None,
                                 source_url=settings.source_url, target_url=settings.target_url)
        while len(ledger.chunks_of(run.run_id, states=["done"])) < run.chunk_count // 2:
            time.sleep(0.01)
        commands.cancel(settings, run.run_id)
        first = wait_report(ledger, run.run_id)
        done_before = {c.chunk_id for c in ledger.chunks_of(run.run_id, states=["done"])}
        started = time.monotonic()
        queued = commands.resume(settings, run.run_id).requeued
        report = wait_report(ledger, run.run_id)
        seconds = time.monotonic() - started
    with db(settings.ledger_url) as conn:
        attempts = dict(conn.execute("SELECT chunk_id, attempts FROM shuttle.chunks WHERE run_id = %s",
                                     (run.run_id,)).fetchall())
    return {"chunks": run.chunk_count, "first_verdict": first["verdict"], "done_before": len(done_before),
            "requeued": queued, "redone_done_chunks": sum(1 for c in done_before if attempts[c] > 1),
            "verdict": report["verdict"], "resume_seconds": seconds,
            "differences": differences(settings.target_url, "bench_ceiling")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000, help="metric rows (default 2,000,000)")
    parser.add_argument("--runs", type=int, default=20_000, help="MLflow runs (default 20,000)")
    parser.add_argument("--experiments", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-rows", type=int, default=None, help="default: the settings' chunk_rows")
    parser.add_argument("--url", default=None, help=f"MLflow database to use (default {PG}/shuttle_lm_<pid>_bench, built)")
    parser.add_argument("--keep", action="store_true", help="keep the databases afterwards")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to append the section to")
    parser.add_argument("--log-dir", type=Path, default=Path(f"/tmp/shuttle-lm-bench-{os.getpid()}"))
    args = parser.parse_args()
    pid = os.getpid()
    url = args.url or f"{PG}/shuttle_lm_{pid}_bench"
    ledger_url = f"{PG}/shuttle_lm_{pid}_bench_ledger"
    broker = f"redis://127.0.0.1:6379/{os.environ.get('SHUTTLE_TEST_REDIS_DB', '14')}"
    queue = f"shuttle-lm-bench-{pid}"
    settings = load_settings(source_url=url, target_url=url, ledger_url=ledger_url, broker_url=broker,
                             result_backend=broker, queue=queue)
    chunk_rows = args.chunk_rows or settings.chunk_rows
    args.log_dir.mkdir(parents=True, exist_ok=True)
    built = None
    if args.url is None:
        create_database(url)
        log(f"building {url}: {args.rows:,} metric rows over {args.runs:,} runs …")
        started = time.monotonic()
        built = build_bulk(url, runs=args.runs, rows=args.rows, experiments=args.experiments)
        log(f"  built in {time.monotonic() - started:.1f}s")
    create_database(ledger_url)
    ledger = Ledger(ledger_url)
    ledger.ensure_schema()
    with db(url) as conn:
        rows = conn.execute("SELECT count(*) FROM metrics").fetchone()[0]
        runs = conn.execute("SELECT count(DISTINCT run_uuid) FROM metrics").fetchone()[0]
        pairs = conn.execute("SELECT count(*) FROM (SELECT DISTINCT run_uuid, key FROM metrics) p").fetchone()[0]
    results: dict[str, list[dict[str, Any]]] = {
        k: [] for k in ("mlflow", "mlflow-ctas", "ceiling", "ceiling-mlflow-table", "shuttle-1", "shuttle-2", "rerun")}
    args.load = [os.getloadavg()[0]]  # other work on a shared 2-CPU machine skews every method; say how much
    try:
        for repeat in range(1, args.repeats + 1):
            log(f"repeat {repeat}/{args.repeats}")
            results["mlflow"].append({"seconds": timed_into_latest_metrics(url, MLFLOW_INTO_LATEST_METRICS)})
            results["mlflow-ctas"].append({"seconds": timed_statement(url, "bench_mlflow_alembic", MLFLOW_ALEMBIC)})
            results["ceiling"].append({"seconds": timed_statement(url, "bench_ceiling", CEILING)})
            results["ceiling-mlflow-table"].append({"seconds": timed_into_latest_metrics(url, CEILING_INTO_LATEST_METRICS)})
            for label, workers, fresh in (("shuttle-1", 1, True), ("shuttle-2", 2, True), ("rerun", 2, False)):
                result = shuttle_run(settings, ledger, workers, chunk_rows, fresh, args.log_dir)
                result["differences"] = differences(url, "bench_ceiling")
                results[label].append(result)
            for label, values in results.items():
                log(f"  {label}: {values[-1]['seconds']:.2f}s "
                    + " ".join(f"{k}={v}" for k, v in values[-1].items() if k != "seconds"))
        args.load.append(os.getloadavg()[0])
        log("resume scenario")
        resumed = resume_scenario(settings, ledger, chunk_rows, args.log_dir)
        log(f"  {resumed}")
        with db(url) as conn:
            mlflow_rows = conn.execute("SELECT count(*) FROM bench_mlflow_alembic").fetchone()[0]
        section = render(args, rows, runs, pairs, chunk_rows, results, resumed, mlflow_rows, built)
        print("\n" + section)
        with args.results.open("a") as out:
            out.write("\n" + section)
        log(f"appended to {args.results}")
    finally:
        ledger.dispose()
        redis.Redis.from_url(broker).delete(queue)
        if not args.keep:
            with db(f"{PG}/postgres") as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "shuttle_lm_{pid}_bench_ledger" WITH (FORCE)')
                if args.url is None:
                    conn.execute(f'DROP DATABASE IF EXISTS "shuttle_lm_{pid}_bench" WITH (FORCE)')


def render(args: argparse.Namespace, rows: int, runs: int, pairs: int, chunk_rows: int,
           results: dict[str, list[dict[str, Any]]], resumed: dict[str, Any], mlflow_rows: int,
           built: int | None) -> str:
    rate = {k: statistics.median(rows / r["seconds"] for r in v) for k, v in results.items()}
    notes = {
        "mlflow": "MLflow's alembic migration as one statement: its 3 nested max() aggregations inserted into "
                  "latest_metrics (emptied), the table it creates with primary key and foreign key",
        "mlflow-ctas": "the same SELECT as `CREATE TABLE … AS`: a bare new table (no key, index or foreign key), "
                       "parallel plan",
        "ceiling": "one `SELECT DISTINCT ON` statement into a table",
        "ceiling-mlflow-table": "the same statement as `INSERT INTO latest_metrics` (emptied): MLflow's table, "
                                "with its primary key, index and foreign key, the table Shuttle writes",
    }
    for label in ("shuttle-1", "shuttle-2", "rerun"):
        r = results[label]
        written = ", ".join(format(x["rows_written"], ",") for x in r)
        verdicts = ", ".join(x["verdict"] for x in r)
        differing = ", ".join(str(x["differences"]) for x in r)
        notes[label] = (f"{r[0]['chunks']} chunks; plan {statistics.median(x['plan_s'] for x in r):.1f}s; chunk phase "
                        f"{statistics.median(x['chunk_wall_s'] or 0 for x in r):.1f}s; rows_written {written}; "
                        f"verdicts {verdicts}; rows differing from the ceiling's table {differing}")
    names = {"mlflow": "(a) MLflow's approach", "mlflow-ctas": "(a′) MLflow's SELECT into a bare table (information)",
             "ceiling": "(b) the ceiling",
             "ceiling-mlflow-table": "(b′) the ceiling into MLflow's table (information)",
             "shuttle-1": "Shuttle, 1 worker process, emptied table", "shuttle-2": "Shuttle, 2 worker processes, emptied table",
             "rerun": "Shuttle re-run, 2 workers, table already filled"}
    table = ["| method | rows/s median | min | max | seconds median (min–max) | note |", "|---|---:|---:|---:|---|---|"]
    for label, values in results.items():
        secs = [v["seconds"] for v in values]
        low, mid, high = spread([rows / s for s in secs])
        s_low, s_mid, s_high = spread(secs)
        table.append(f"| {names[label]} | {mid:,.0f} | {low:,.0f} | {high:,.0f} | {s_mid:.2f} ({s_low:.2f}–{s_high:.2f}) "
                     f"| {notes[label]} |")
    vs_mlflow, vs_ceiling = rate["shuttle-2"] / rate["mlflow"], rate["shuttle-2"] / rate["ceiling"]
    m = machine()
    dataset = (f"`build_bulk(runs={args.runs:,}, rows={args.rows:,}, experiments={args.experiments})`" if built
               else f"existing database {args.url}")
    return "\n".join([
        f"## `mlflow-latest-metrics` ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
        f"Command: `.venv/bin/python ops/bench/bench_latest_metrics.py --rows {args.rows} --runs {args.runs} "
        f"--repeats {args.repeats}`", "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']}; {m['postgres']}; {m['python']}. Source and target "
        "are one MLflow database (rebuilt in place), ledger in another, broker Redis; all on this machine.", "",
        f"Dataset: {dataset} — {rows:,} metric rows, {runs:,} runs, {pairs:,} (run, key) pairs; MLflow created the "
        "schema, rows generated in PostgreSQL straight into its tables (~2% NaN, some ±Inf as MLflow stores them, "
        f"shared timestamps); chunk_rows {chunk_rows:,}. Repeats: {args.repeats}, methods interleaved in the order "
        "listed. Shuttle is timed from `start_run` until the report is in the ledger (planning, enqueueing, all "
        "chunks, the coordinator's verification); worker start-up is not timed. Load average (1 min) before and "
        f"after the repeats: {args.load[0]:.2f} / {args.load[-1]:.2f} on {m['nproc']} CPUs (above ~0.5 means other "
        "processes shared the machine and the figures are noisier).", "",
        *table, "",
        f"- Targets: 2 workers ≥ (a): **{'met' if vs_mlflow >= 1 else 'NOT met'}** — {vs_mlflow:.2f}× (a); "
        f"2 workers ≥ 60% of (b): **{'met' if vs_ceiling >= 0.6 else 'NOT met'}** — {vs_ceiling:.0%} of (b) "
        f"(1 worker: {rate['shuttle-1'] / rate['ceiling']:.0%} of (b)).",
        "- Paired, repeat by repeat ((a) and Shuttle ran back to back, so each pair saw the same machine): "
        "(a) seconds ÷ Shuttle 2-worker seconds = "
        + ", ".join(f"{a['seconds'] / s['seconds']:.2f}" for a, s in zip(results["mlflow"], results["shuttle-2"]))
        + f"; Shuttle faster in {sum(a['seconds'] > s['seconds'] for a, s in zip(results['mlflow'], results['shuttle-2']))}"
        f" of {len(results['shuttle-2'])}.",
        f"- Against (b′), one statement writing MLflow's own table: 2 workers {rate['shuttle-2'] / rate['ceiling-mlflow-table']:.0%}; "
        f"(b′) itself is {rate['ceiling-mlflow-table'] / rate['ceiling']:.0%} of (b) and "
        f"{rate['ceiling-mlflow-table'] / rate['mlflow']:.2f}× (a).",
        f"- Against (a′), MLflow's SELECT written to a bare new table instead of latest_metrics: 2 workers "
        f"{rate['shuttle-2'] / rate['mlflow-ctas']:.2f}×; (a′) is {rate['mlflow-ctas'] / rate['mlflow']:.2f}× (a).",
        f"- MLflow's SELECT produced {mlflow_rows:,} rows for {pairs:,} pairs (counted in (a′)'s table). It emits one row "
        "per is_nan value when a NaN and a non-NaN tie at the greatest (step, timestamp), which would make (a)'s INSERT "
        "fail on the primary key; this dataset has no such tie, so equal counts are expected.",
        f"- Resume: a 2-worker run of {resumed['chunks']} chunks cancelled after {resumed['done_before']} were done "
        f"(verdict `{resumed['first_verdict']}`); `resume` enqueued {resumed['requeued']} chunks, re-ran "
        f"{resumed['redone_done_chunks']} of the done ones, finished `{resumed['verdict']}` in "
        f"{resumed['resume_seconds']:.2f}s; rows differing from the ceiling's table afterwards: {resumed['differences']}.",
        "",
    ])


if __name__ == "__main__":
    main()
