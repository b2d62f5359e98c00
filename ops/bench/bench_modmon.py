#!/usr/bin/env python
"""Benchmark of the `modmon` migration against the in-database aggregation it replaces.

    .venv/bin/python ops/bench/bench_modmon.py --rows 2000000 --repeats 3   # throughput
    .venv/bin/python ops/bench/bench_modmon.py --memory                     # worker peak memory, 200k vs 2M
    .venv/bin/python ops/bench/bench_modmon.py --profile --rows 200000      # where a chunk's time goes

Throughput: per repeat, interleaved so noise hits every method alike,
  reference  two INSERT … SELECT … GROUP BY statements in the database (prediction stats and the
             feature-drift equivalent over jsonb_each), into scratch tables truncated first;
  shuttle-1  `start_run` → report in the ledger, 1 local worker process, empty target tables;
  shuttle-2  the same with 2 worker processes;
  rerun      a second run over the filled target (2 workers); its report must say rows_written == 0.
Rows/s are source rows / wall seconds. Results go to stdout and to a section of ops/bench/RESULTS.md.

Source and target live in one database (as in a real install), the ledger in its own, the broker is
Redis DB 9 (flushed before every run). Everything it touches is dedicated to the benchmark.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import re
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import redis  # noqa: E402
from psycopg import sql  # noqa: E402

from common.connectors.postgres import create_database  # noqa: E402
from common.ledger import Ledger  # noqa: E402
from common.migrations.base import Selection  # noqa: E402
from common.migrations import modmon as modmon_module  # noqa: E402
from common.migrations.modmon import DRIFT_TRACKING, FEATURE_DRIFT, PREDICTION_STATS  # noqa: E402
from common.migrations.modmon_fixtures import build_source  # noqa: E402
from common.settings import Settings, load_settings  # noqa: E402
from producer import commands  # noqa: E402
from producer.local_workers import LocalWorkers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import db, log, machine, process_group_memory, spread  # noqa: E402
from modmon_reference import REF_FEATURES, REF_PREDICTIONS, prepare_reference, run_reference  # noqa: E402

DEFAULT_DB = "postgresql://postgres@127.0.0.1:5432/shuttle_bench"
DEFAULT_LEDGER = "postgresql://postgres@127.0.0.1:5432/shuttle_bench_ledger"
DEFAULT_BROKER = "redis://127.0.0.1:6379/9"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
DEPLOYMENTS = 30
MEMORY_SIZES = (200_000, 2_000_000)
# The engine's per-chunk state table (source fingerprints), when it has one, is emptied with the targets.
TARGET_TABLES = (PREDICTION_STATS.name, FEATURE_DRIFT.name, DRIFT_TRACKING.name,
                 *([modmon_module.CHUNK_STATE.name] if hasattr(modmon_module, "CHUNK_STATE") else []))
TARGETS = ("2 workers reach at least half of that statement's rows/s, and a re-run costs under a third of a "
           "first run; worker peak memory stays flat between 200k and 2M rows.")


# -- the source and the databases ------------------------------------------------------------------

def source_rows(url: str) -> int | None:
    with db(url) as conn:
        if conn.execute("SELECT to_regclass('archived_predictions')").fetchone()[0] is None:
            return None
        return conn.execute("SELECT count(*) FROM archived_predictions").fetchone()[0]


def prepare_source(url: str, rows: int, reuse: bool) -> None:
    if reuse and source_rows(url) == rows:
        log(f"reusing the existing source of {rows:,} rows")
    else:
        log(f"building the source: {rows:,} rows, {DEPLOYMENTS} deployments …")
        started = time.monotonic()
        build_source(url, rows=rows, deployments=DEPLOYMENTS, malformed=False)
        log(f"  built in {time.monotonic() - started:.1f}s")
    # Set hint bits and the visibility map now, so the first method timed does not pay for them.
    with db(url) as conn:
        conn.execute("VACUUM (ANALYZE) archived_predictions")


def reset_ledger(url: str) -> None:
    create_database(url)
    ledger = Ledger(url)
    ledger.ensure_schema()
    ledger.dispose()


def truncate_targets(url: str) -> None:
    with db(url) as conn:
        present = [t for t in TARGET_TABLES if conn.execute("SELECT to_regclass(%s)", (t,)).fetchone()[0]]
        if present:
            conn.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(map(sql.Identifier, present))))


def flush_broker(url: str) -> None:
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()


# -- the reference: the aggregation as two statements inside the database ---------------------------

def shuttle_run(settings: Settings, ledger: Ledger, workers: int, chunk_rows: int, fresh: bool,
                log_dir: Path, label: str, timeout: float) -> dict[str, Any]:
    flush_broker(settings.broker_url)
    if fresh:
        truncate_targets(settings.target_url)
    log_dir.mkdir(parents=True, exist_ok=True)
    pool = LocalWorkers(settings, workers, name=f"bench{label}", log_dir=log_dir)
    with pool:
        started = time.monotonic()
        run = commands.start_run(settings, "modmon", Selection(), chunk_rows, None, reenable_drift_tracking=True)
        planned = time.monotonic()
        deadline = started + timeout
        report = None
        while report is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run.run_id} has no report after {timeout:.0f}s; see {log_dir}")
            time.sleep(0.1)
            report = ledger.get_report(run.run_id)
        ended = time.monotonic()
        memory = [process_group_memory(p.pid) for p in pool.processes]
    totals = report["totals"]
    result = {
        "seconds": ended - started, "plan_s": planned - started, "run_id": run.run_id, "chunks": run.chunk_count,
        "verdict": report["verdict"], "rows_read": totals["rows_read"], "rows_written": totals["rows_written"],
        "rows_unchanged": totals["rows_unchanged"], "chunk_wall_s": report["timing"].get("wall_seconds"),
        "attempts": report["timing"].get("attempts"),
        "worker_hwm_kb": [max((p["hwm_kb"] for p in group), default=0) for group in memory],
        "worker_group_kb": [sum(p["hwm_kb"] for p in group) for group in memory],
        "processes": [len(group) for group in memory],
    }
    result["chunk_s"] = chunk_durations(log_dir, run.run_id)
    return result


def chunk_durations(log_dir: Path, run_id: str) -> list[float]:
    pattern = re.compile(rf"chunk {re.escape(run_id)}:\S+ done in ([0-9.]+)s")
    found = []
    for path in log_dir.glob("worker*.log"):
        found += [float(m.group(1)) for m in pattern.finditer(path.read_text(errors="replace"))]
    return found


def compare_with_reference(url: str) -> str:
    """Shuttle's target against the reference tables: same buckets, same counts."""
    with db(url) as conn:
        rows = conn.execute(f"""
            SELECT (SELECT count(*) FROM {PREDICTION_STATS.name}), (SELECT count(*) FROM {REF_PREDICTIONS}),
                   (SELECT count(*) FROM {FEATURE_DRIFT.name}), (SELECT count(*) FROM {REF_FEATURES}),
                   (SELECT count(*) FROM {PREDICTION_STATS.name} t JOIN {REF_PREDICTIONS} r
                      USING (deployment_id, model_id, hour)
                    WHERE t.prediction_count = r.prediction_count AND t.prediction_histogram = r.prediction_histogram
                      AND abs(t.prediction_sum - r.prediction_sum) < 1e-6 * greatest(1, abs(r.prediction_sum))),
                   (SELECT count(*) FROM {FEATURE_DRIFT.name} t JOIN {REF_FEATURES} r
                      USING (deployment_id, model_id, feature, hour)
                    WHERE t.value_count = r.value_count AND t.null_count = r.null_count
                      AND t.numeric_count = r.numeric_count AND t.histogram = r.histogram)""").fetchone()
    ok = rows[0] == rows[1] == rows[4] and rows[2] == rows[3] == rows[5]
    return (f"{'same' if ok else 'DIFFERENT'} results: prediction buckets shuttle {rows[0]:,} / reference "
            f"{rows[1]:,} / matching {rows[4]:,}; feature buckets {rows[2]:,} / {rows[3]:,} / matching {rows[5]:,}")


# -- reporting --------------------------------------------------------------------------------------

def engine_version() -> str:
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--", "common", "producer", "worker")
    return f"{git('rev-parse', '--short', 'HEAD') or 'unknown'}{' + uncommitted engine changes' if dirty else ''}"


@contextmanager
def exclusive(url: str) -> Iterator[None]:
    """One benchmark at a time: two would flush each other's broker and rebuild each other's source."""
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT pg_try_advisory_lock(hashtext('shuttle-bench'))").fetchone()[0]:
            sys.exit("another bench_modmon.py is running on this PostgreSQL (it uses the same databases and "
                     "Redis DB); wait for it to finish")
        yield


def fmt_rate(values: list[float]) -> str:
    low, mid, high = spread(values)
    return f"{mid:,.0f} | {low:,.0f} | {high:,.0f}"


def fmt_secs(values: list[float]) -> str:
    low, mid, high = spread(values)
    return f"{mid:.1f} ({low:.1f}–{high:.1f})"


def throughput_table(rows: int, results: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| method | rows/s median | min | max | seconds median (min–max) | note |",
             "|---|---:|---:|---:|---|---|"]
    names = {"reference": "reference: 2 in-database `INSERT … SELECT … GROUP BY` statements",
             "shuttle-1": "Shuttle, 1 worker process, fresh target",
             "shuttle-2": "Shuttle, 2 worker processes, fresh target",
             "rerun": "Shuttle re-run, 2 workers, target already filled"}
    for key, label in names.items():
        runs = results[key]
        seconds = [r["seconds"] for r in runs]
        note = ""
        if key == "reference":
            note = f"predictions {statistics.median(r['predictions_s'] for r in runs):.1f}s + " \
                   f"features {statistics.median(r['features_s'] for r in runs):.1f}s"
        else:
            written = ", ".join(f"{r['rows_written']:,}" for r in runs)
            note = f"{runs[0]['chunks']} chunks; plan {statistics.median(r['plan_s'] for r in runs):.1f}s; " \
                   f"rows_written {written}"
        lines.append(f"| {label} | {fmt_rate([rows / s for s in seconds])} | {fmt_secs(seconds)} | {note} |")
    return lines


def ratios(rows: int, results: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in results.items()}
    return {"shuttle2_over_reference": med["reference"] / med["shuttle-2"],
            "shuttle1_over_reference": med["reference"] / med["shuttle-1"],
            "rerun_over_fresh": med["rerun"] / med["shuttle-2"],
            "per_repeat_shuttle2_over_reference": [r["seconds"] / s["seconds"] for r, s in
                                                   zip(results["reference"], results["shuttle-2"])],
            "per_repeat_rerun_over_fresh": [r["seconds"] / s["seconds"] for r, s in
                                            zip(results["rerun"], results["shuttle-2"])]}


HEADER_TITLE = "# `modmon` benchmark results"
MODMON_SECTIONS = ("throughput", "memory", "profile", "notes")  # "notes": hand-written, kept as is


def write_section(path: Path, name: str, body: list[str], data: dict[str, Any]) -> None:
    """Replace one of this benchmark's sections (or add it after the others) and re-render the header.

    Everything else in the file (other benchmarks' sections and notes) is kept where it is."""
    text = path.read_text() if path.exists() else ""
    block = "\n".join(body) + f"\n\n<!-- data: {json.dumps(data)} -->\n"
    pattern = re.compile(rf"(<!-- section:{name} -->\n).*?(<!-- /section:{name} -->\n)", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda m: m.group(1) + block + m.group(2), text)
    else:
        ends = [m.end() for key in MODMON_SECTIONS for m in re.finditer(rf"<!-- /section:{key} -->\n", text)]
        at = max(ends, default=len(text))
        text = text[:at] + f"\n<!-- section:{name} -->\n{block}<!-- /section:{name} -->\n" + text[at:]
    sections = dict(re.findall(r"<!-- section:(\w+) -->\n(.*?)<!-- /section:\1 -->\n", text, re.S))
    first = text.find("\n<!-- section:")
    # The header is the text before the first section, when the file is this benchmark's; else it goes on top.
    rest = text[first:] if text.startswith(HEADER_TITLE) and first >= 0 else "\n" + text
    path.write_text(render_header(sections) + rest)
    log(f"wrote {path}")


def section_data(sections: dict[str, str], name: str) -> dict[str, Any] | None:
    found = re.search(r"<!-- data: (.*?) -->", sections.get(name, ""))
    return json.loads(found.group(1)) if found else None


def render_header(sections: dict[str, str]) -> str:
    info = machine()
    lines = [HEADER_TITLE, "",
             "Written by `ops/bench/bench_modmon.py` (see README.md beside it); each section below says when",
             "and with which command it was measured.", "",
             "## Machine", "",
             f"- CPUs: {info['nproc']} ({info['cpu']})", f"- memory: {info['memory']}",
             f"- database: {info['postgres']}", f"- {info['python']}",
             "- source and target in one database, ledger in another, broker Redis DB 9; all on this machine", "",
             "## Targets", "", f"> {TARGETS}", ""]
    throughput, memory = section_data(sections, "throughput"), section_data(sections, "memory")
    if throughput:
        r = throughput["ratios"]
        met = r["shuttle2_over_reference"] >= 0.5
        lines.append(f"- 2 workers ≥ ½ of the reference's rows/s: **{'met' if met else 'NOT met'}** — "
                     f"{r['shuttle2_over_reference']:.2f}× the reference (median of {throughput['repeats']} "
                     f"repeats at {throughput['rows']:,} rows; per repeat: "
                     f"{', '.join(f'{x:.2f}' for x in r['per_repeat_shuttle2_over_reference'])})")
        met = r["rerun_over_fresh"] < 1 / 3
        clean = throughput["rerun_writes_zero"]
        lines.append(f"- re-run < ⅓ of a first run: **{'met' if met else 'NOT met'}** — re-run/fresh time "
                     f"{r['rerun_over_fresh']:.2f} (per repeat: "
                     f"{', '.join(f'{x:.2f}' for x in r['per_repeat_rerun_over_fresh'])}); re-runs wrote "
                     f"{'0 rows, as required' if clean else 'ROWS (rows_written != 0)'}")
    else:
        lines.append("- throughput targets: not measured yet")
    if memory:
        low, high = memory["peak_kb"][str(MEMORY_SIZES[0])], memory["peak_kb"][str(MEMORY_SIZES[1])]
        growth = high / low - 1
        met = growth <= 0.10
        lines.append(f"- worker peak memory flat from 200k to 2M rows: **{'met' if met else 'NOT met'}** — "
                     f"largest worker process {low / 1024:.0f} MiB → {high / 1024:.0f} MiB ({growth:+.1%}; "
                     "flat taken as within 10%)")
    else:
        lines.append("- memory target: not measured yet")
    return "\n".join(lines) + "\n"


# -- modes ------------------------------------------------------------------------------------------

def bench_throughput(args: argparse.Namespace, settings: Settings) -> None:
    prepare_source(args.url, args.rows, args.reuse_source)
    reset_ledger(args.ledger_url)
    prepare_reference(args.url)
    ledger = Ledger(args.ledger_url)
    timeout = max(900.0, args.rows / 500)
    results: dict[str, list[dict[str, Any]]] = {"reference": [], "shuttle-1": [], "shuttle-2": [], "rerun": []}
    problems: list[str] = []
    try:
        for repeat in range(1, args.repeats + 1):
            log(f"repeat {repeat}/{args.repeats}")
            ref = run_reference(args.url)
            results["reference"].append(ref)
            log(f"  reference  {ref['seconds']:6.1f}s  {args.rows / ref['seconds']:>9,.0f} rows/s  "
                f"(predictions {ref['predictions_s']:.1f}s, features {ref['features_s']:.1f}s)")
            for key, workers, fresh in (("shuttle-1", 1, True), ("shuttle-2", 2, True), ("rerun", 2, False)):
                res = shuttle_run(settings, ledger, workers, args.chunk_rows, fresh, args.log_dir / f"r{repeat}-{key}",
                                  key.replace("-", ""), timeout)
                results[key].append(res)
                busy = sum(res["chunk_s"])
                log(f"  {key:<10} {res['seconds']:6.1f}s  {args.rows / res['seconds']:>9,.0f} rows/s  "
                    f"verdict {res['verdict']}, written {res['rows_written']:,}, unchanged {res['rows_unchanged']:,}; "
                    f"plan {res['plan_s']:.1f}s, chunk wall {res['chunk_wall_s'] or 0:.1f}s, "
                    f"chunks {res['chunks']} (sum {busy:.1f}s, max "
                    f"{max(res['chunk_s'], default=0):.1f}s), worker peak RSS "
                    f"{', '.join(f'{k / 1024:.0f}' for k in res['worker_hwm_kb'])} MiB")
                if res["verdict"] != "clean" or res["rows_read"] != args.rows:
                    problems.append(f"{key} repeat {repeat}: verdict {res['verdict']}, read {res['rows_read']:,}")
                if key == "rerun" and res["rows_written"] != 0:
                    problems.append(f"rerun repeat {repeat} wrote {res['rows_written']:,} rows (expected 0)")
                if key == "shuttle-2" and repeat == 1:
                    log("  " + compare_with_reference(args.url))
    finally:
        ledger.dispose()

    table = throughput_table(args.rows, results)
    rat = ratios(args.rows, results)
    rerun_zero = all(r["rows_written"] == 0 for r in results["rerun"])
    body = [f"## Throughput ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
            f"Command: `.venv/bin/python ops/bench/bench_modmon.py {' '.join(sys.argv[1:])}` "
            f"(engine at commit {engine_version()})", "",
            f"Dataset: `build_source(rows={args.rows:,}, deployments={DEPLOYMENTS}, malformed=False)` — "
            f"{args.rows:,} archived predictions over 7 days, Zipf-sized deployments, 6 JSON features per row "
            f"(→ {results['reference'][0]['target_rows']['predictions']:,} prediction buckets and "
            f"{results['reference'][0]['target_rows']['features']:,} feature buckets); chunk_rows "
            f"{args.chunk_rows:,}. Repeats: {args.repeats}, methods interleaved in each repeat in the order "
            "reference, shuttle-1, shuttle-2, rerun. The reference runs with `SET LOCAL enable_sort = off` (its "
            "best plan: the planner misestimates the feature groups and otherwise sorts 1 GB on disk, ~35s "
            "instead of ~22s at 2M rows). Shuttle is timed from `start_run` until the report is in the "
            "ledger (planning, enqueueing, all chunks, the coordinator's verification); worker start-up is not "
            "timed.", "", *table, "",
            f"- Shuttle-2 / reference rows/s: **{rat['shuttle2_over_reference']:.2f}** (Shuttle-1: "
            f"{rat['shuttle1_over_reference']:.2f})",
            f"- Re-run time / fresh time (2 workers): **{rat['rerun_over_fresh']:.2f}**; re-runs wrote "
            f"{'0 rows' if rerun_zero else 'rows'} (report `rows_written`)",
            "- Worker peak RSS (VmHWM, largest process of a worker): "
            + "; ".join(f"{k} {max(max(r['worker_hwm_kb']) for r in v) / 1024:.0f} MiB"
                        for k, v in results.items() if k != "reference"),
            "- Chunk time summed over chunks (median over repeats): "
            + "; ".join(f"{k} {statistics.median(sum(r['chunk_s']) for r in v):.1f}s"
                        for k, v in results.items() if k != "reference")]
    if problems:
        body += ["", "Problems: " + "; ".join(problems)]
    print("\n" + "\n".join(body) + "\n")
    data = {"rows": args.rows, "repeats": args.repeats, "ratios": rat, "rerun_writes_zero": rerun_zero,
            "seconds": {k: [r["seconds"] for r in v] for k, v in results.items()}}
    write_section(args.results, "throughput", body, data)


def bench_memory(args: argparse.Namespace, settings: Settings) -> None:
    reset_ledger(args.ledger_url)
    ledger = Ledger(args.ledger_url)
    measured: dict[int, dict[str, Any]] = {}
    try:
        for size in MEMORY_SIZES:
            prepare_source(args.url, size, args.reuse_source)
            res = shuttle_run(settings, ledger, 1, args.chunk_rows, True, args.log_dir / f"memory-{size}", "mem",
                              max(900.0, size / 500))
            measured[size] = res
            log(f"  {size:>9,} rows: {res['seconds']:.1f}s, {res['chunks']} chunks, verdict {res['verdict']}, "
                f"largest worker process {res['worker_hwm_kb'][0] / 1024:.0f} MiB, whole worker "
                f"({res['processes'][0]} processes) {res['worker_group_kb'][0] / 1024:.0f} MiB")
    finally:
        ledger.dispose()
    body = [f"## Worker peak memory ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
            f"Command: `.venv/bin/python ops/bench/bench_modmon.py {' '.join(sys.argv[1:])}` "
            f"(engine at commit {engine_version()})", "",
            f"One fresh run per size, 1 worker (Celery main process + 1 pool process), chunk_rows "
            f"{args.chunk_rows:,}; VmHWM (peak RSS) from /proc of every process in the worker's process group, "
            "read just before the worker is stopped.", "",
            "| source rows | chunks | run seconds | largest process peak RSS | sum over the worker's processes |",
            "|---:|---:|---:|---:|---:|"]
    for size, res in measured.items():
        body.append(f"| {size:,} | {res['chunks']} | {res['seconds']:.1f} | {res['worker_hwm_kb'][0] / 1024:.1f} MiB "
                    f"| {res['worker_group_kb'][0] / 1024:.1f} MiB |")
    print("\n" + "\n".join(body) + "\n")
    data = {"peak_kb": {str(s): r["worker_hwm_kb"][0] for s, r in measured.items()},
            "group_kb": {str(s): r["worker_group_kb"][0] for s, r in measured.items()}}
    write_section(args.results, "memory", body, data)


def bench_profile(args: argparse.Namespace, settings: Settings) -> None:
    """One large chunk in this process: phases timed, then the same chunk under cProfile."""
    from common.connectors import postgres
    from common.migrations import modmon
    from common.migrations.base import Selection as Sel
    from common.model import ChunkSpec

    prepare_source(args.url, args.rows, args.reuse_source)
    options = modmon.Modmon.plan_options(reenable_drift_tracking=True)
    migration = modmon.Modmon(args.url, args.url, options)
    migration.prepare_target()
    specs: list[ChunkSpec] = sorted(migration.plan_chunks(Sel(), args.chunk_rows), key=lambda s: -s.est_rows)
    spec = specs[0]
    log(f"profiling chunk {spec.chunk_key} (~{spec.est_rows:,} rows) of {len(specs)} chunks")
    timers = {"source stream (COPY out + decode)": 0.0, "aggregate (python, excl. stream)": 0.0,
              "upsert (COPY in + INSERT … ON CONFLICT)": 0.0}

    original_stream, original_aggregate = postgres.Source.stream, modmon.Modmon._aggregate
    original_upsert = postgres.Sink.upsert_together

    def stream(self, statement, types) -> Iterator[tuple]:
        inner = original_stream(self, statement, types)
        while True:
            t = time.perf_counter()
            try:
                row = next(inner)
            except StopIteration:
                timers["source stream (COPY out + decode)"] += time.perf_counter() - t
                return
            timers["source stream (COPY out + decode)"] += time.perf_counter() - t
            yield row

    def aggregate(self, rows, outcome, progress):
        t, before = time.perf_counter(), timers["source stream (COPY out + decode)"]
        result = original_aggregate(self, rows, outcome, progress)
        timers["aggregate (python, excl. stream)"] += (time.perf_counter() - t
                                                       - (timers["source stream (COPY out + decode)"] - before))
        return result

    def upsert(self, batches):
        t = time.perf_counter()
        result = original_upsert(self, batches)
        timers["upsert (COPY in + INSERT … ON CONFLICT)"] += time.perf_counter() - t
        return result

    @contextmanager
    def patched() -> Iterator[None]:
        postgres.Source.stream, modmon.Modmon._aggregate, postgres.Sink.upsert_together = stream, aggregate, upsert
        try:
            yield
        finally:
            postgres.Source.stream, modmon.Modmon._aggregate = original_stream, original_aggregate
            postgres.Sink.upsert_together = original_upsert

    truncate_targets(args.url)
    migration.run_chunk(spec, lambda n: None)  # warm-up: connections, temp tables, caches
    results = []
    for label, fresh in (("fresh (empty target)", True), ("re-run (same rows present)", False)):
        if fresh:
            truncate_targets(args.url)
        for k in timers:
            timers[k] = 0.0
        with patched():
            t = time.perf_counter()
            outcome = migration.run_chunk(spec, lambda n: None)
            total = time.perf_counter() - t
        other = total - sum(timers.values())
        results.append((label, total, dict(timers), other, outcome.rows_read))
    # A bare COPY of the same rows with no per-row Python, and the chunk query's plan.
    query = sql.SQL(
        "SELECT id, model_id, floor(extract(epoch FROM ts) / 3600)::int8, prediction, actual,"
        " association_id IS NOT NULL, features FROM archived_predictions WHERE deployment_id = {} AND {}"
        " ORDER BY ts, id").format(sql.Literal(spec.partition), modmon._in_range("ts", *modmon.chunk_hours(spec)))
    with db(args.url) as conn:
        t = time.perf_counter()
        with conn.cursor().copy(sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(query)) as copy:
            raw_bytes = sum(len(block) for block in copy)
        raw_copy = time.perf_counter() - t
        plan = [r[0] for r in conn.execute(sql.SQL("EXPLAIN (ANALYZE, TIMING OFF) {}").format(query)).fetchall()]
    truncate_targets(args.url)
    migration.run_chunk(spec, lambda n: None)
    profiler = cProfile.Profile()
    truncate_targets(args.url)
    profiler.enable()
    migration.run_chunk(spec, lambda n: None)
    profiler.disable()
    migration.close()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(14)

    body = [f"## Where a chunk's time goes ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
            f"Command: `.venv/bin/python ops/bench/bench_modmon.py {' '.join(sys.argv[1:])}` "
            f"(engine at commit {engine_version()})", "",
            f"The largest chunk ({spec.est_rows:,} rows, one deployment) run in the benchmark process, phases timed "
            "by wrapping `Source.stream`, `Modmon._aggregate` and `Sink.upsert_together`.", "",
            "| run | total s | rows/s | " + " | ".join(timers) + " | other (row building, sorting) |",
            "|---|---:|---:|" + "---:|" * (len(timers) + 1)]
    for label, total, phase, other, read in results:
        body.append(f"| {label} | {total:.2f} | {read / total:,.0f} | "
                    + " | ".join(f"{v:.2f} ({v / total:.0%})" for v in phase.values()) + f" | {other:.2f} |")
    body += ["", f"Bare binary COPY of the same query, bytes only, no row decoding: {raw_copy:.2f}s "
             f"({raw_bytes / 1e6:.1f} MB, {spec.est_rows / raw_copy:,.0f} rows/s).", "",
             "Chunk query plan:", "", "```", *plan, "```", "", "cProfile of a fresh chunk (top 14 by own time):", "",
             "```", *[line for line in out.getvalue().splitlines() if line.strip()][:40], "```"]
    print("\n" + "\n".join(body) + "\n")
    write_section(args.results, "profile", body, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000, help="source rows (default 2,000,000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="peak worker memory at 200k and 2M rows instead")
    parser.add_argument("--profile", action="store_true", help="time the phases of the largest chunk instead")
    parser.add_argument("--chunk-rows", type=int, default=None, help="default: the settings' chunk_rows")
    parser.add_argument("--url", default=DEFAULT_DB, help="source = target database (dedicated, rebuilt)")
    parser.add_argument("--ledger-url", default=DEFAULT_LEDGER)
    parser.add_argument("--broker-url", default=DEFAULT_BROKER, help="flushed before every run")
    parser.add_argument("--reuse-source", action="store_true", help="keep the source if it has --rows rows")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to update")
    parser.add_argument("--log-dir", type=Path, default=Path(f"/tmp/shuttle-bench-logs/{os.getpid()}"),
                        help="worker logs")
    args = parser.parse_args()
    settings = load_settings(source_url=args.url, target_url=args.url, ledger_url=args.ledger_url,
                             broker_url=args.broker_url, result_backend=args.broker_url,
                             queue=f"shuttle-bench-{os.getpid()}")
    args.chunk_rows = args.chunk_rows or settings.chunk_rows
    with exclusive(args.url):
        create_database(args.url)
        if args.memory:
            bench_memory(args, settings)
        elif args.profile:
            bench_profile(args, settings)
        else:
            bench_throughput(args, settings)


if __name__ == "__main__":
    main()
