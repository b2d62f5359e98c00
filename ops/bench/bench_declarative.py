#!/usr/bin/env python
"""A declared PostgreSQL → PostgreSQL copy (a TOML migration file) against the ceiling, pgloader and dlt.

    flock /tmp/shuttle-bench.lock .venv/bin/python ops/bench/bench_declarative.py --rows 2000000 --repeats 3
    flock /tmp/shuttle-bench.lock .venv/bin/python ops/bench/bench_declarative.py --rows 100000 --repeats 1  # try

The source is `archived_predictions` as DESIGN §6 shapes it (`build_source(…, malformed=False)`: 8 columns,
primary key `id`, NOT NULL `deployment_id` and `ts`, an index on (deployment_id, ts)), copied as it is, keyed
on `id`. Per repeat, interleaved so noise hits every method alike, each fresh (empty target) then re-run
(same data, target already filled):

  ceiling    one statement in the source database: `INSERT … SELECT … ON CONFLICT (id) DO UPDATE … WHERE
             (row) IS DISTINCT FROM (EXCLUDED row)` into a table with the primary key only;
  shuttle-1  `start_run` of the migration file → its report in the ledger, 1 local worker process; the target
  shuttle-2  in its own database, created by the run (create = true); the same with 2 worker processes;
  pgloader   Debian's pgloader, database to database (`--dynamic-space-size`, `prefetch rows`, `batch rows`
             set so it stays in its heap; its default settings are probed once with --probe-pgloader-defaults);
             a re-run is what pgloader does when run again: drop, create, reload;
  dlt        `sql_table` (pyarrow backend) → postgres with write_disposition merge (upsert) on `id`, CSV
             load files (its fastest configuration here); a re-run merges every row again.

Rows/s are source rows / wall seconds. Then, once, what each tool leaves in its target (NOT NULL, primary
key, indexes, column types) is read from the catalogue: the comparison table's "constraints kept" cells.
Results are printed and written to a section of ops/bench/RESULTS.md.

Places it uses (dedicated): databases shuttle_declbench (source and ceiling), shuttle_declbench_target,
shuttle_declbench_pgl, shuttle_declbench_dlt, shuttle_declbench_ledger; Redis DB --redis-db with a queue
of its own (only that queue's keys are removed); files under /tmp/shuttle-declbench-<pid>.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from psycopg import sql  # noqa: E402

from common.connectors.postgres import create_database  # noqa: E402
from common.ledger import Ledger  # noqa: E402
from common.migrations.base import Selection  # noqa: E402
from common.migrations.modmon_fixtures import build_source  # noqa: E402
from common.settings import Settings, load_settings  # noqa: E402
from producer import commands  # noqa: E402
from producer.local_workers import LocalWorkers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import db, log, machine, spread, wait_report  # noqa: E402

SERVER = "postgresql://postgres@127.0.0.1:5432"


@dataclass(frozen=True)
class Places:
    """The benchmark's own databases, all named from one prefix (--db-prefix)."""

    prefix: str = "shuttle_declbench"

    @property
    def source(self) -> str:
        return self.prefix

    @property
    def target(self) -> str:
        return f"{self.prefix}_target"

    @property
    def pgloader(self) -> str:
        return f"{self.prefix}_pgl"

    @property
    def dlt(self) -> str:
        return f"{self.prefix}_dlt"

    @property
    def ledger(self) -> str:
        return f"{self.prefix}_ledger"


PLACES = Places()
TABLE = "archived_predictions"
COLUMNS = ("id", "deployment_id", "model_id", "ts", "prediction", "actual", "association_id", "features")
SHUTTLE_TABLE = "copied.archived_predictions"
CEILING_TABLE = "ceiling.archived_predictions"
DLT_SCHEMA = "dlt_target"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
DEPLOYMENTS = 30
TARGETS = ("Shuttle with 2 workers ≥ 0.65 of the ceiling's rows/s, ≥ 2× pgloader fresh, ≥ 5× dlt; "
           "a re-run costs ≤ ⅓ of a fresh run.")

MIGRATION_FILE = """\
[migration]
name = "declbench-copy"
summary = "archived_predictions copied as it is, keyed on id (bench_declarative.py)"

[source]
table = "archived_predictions"
key = ["id"]
partition = "deployment_id"
chunk_by = "id"

[target]
table = "{table}"
create = true

[validate]
counts = true
sample = 100
"""

PGLOADER_FILE = """\
LOAD DATABASE
  FROM {source}
  INTO {target}
{with_clause}  INCLUDING ONLY TABLE NAMES MATCHING '{table}' IN SCHEMA 'public'
;
"""


def url(database: str) -> str:
    return f"{SERVER}/{database}"


# -- the source -------------------------------------------------------------------------------------

def prepare_source(rows: int, reuse: bool) -> None:
    with db(url("postgres")) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PLACES.source,)).fetchone()
    have = None
    if exists:
        with db(url(PLACES.source)) as conn:
            if conn.execute("SELECT to_regclass(%s)", (TABLE,)).fetchone()[0]:
                have = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]
    if reuse and have == rows:
        log(f"reusing the existing source of {rows:,} rows")
    else:
        log(f"building the source: {rows:,} rows, {DEPLOYMENTS} deployments …")
        started = time.monotonic()
        build_source(url(PLACES.source), rows=rows, deployments=DEPLOYMENTS, malformed=False)
        log(f"  built in {time.monotonic() - started:.1f}s")
    with db(url(PLACES.source)) as conn:
        conn.execute(f"VACUUM (ANALYZE) {TABLE}")  # hint bits and visibility map set before anything is timed


def recreate(database: str) -> None:
    with db(url("postgres")) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


# -- the ceiling: one statement inside the source database -------------------------------------------

def ceiling_run(fresh: bool) -> dict[str, Any]:
    cols = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
    data = [c for c in COLUMNS if c != "id"]
    statement = sql.SQL(
        "INSERT INTO ceiling.archived_predictions AS t ({cols}) SELECT {cols} FROM public.archived_predictions"
        " ON CONFLICT (id) DO UPDATE SET {sets} WHERE ({old}) IS DISTINCT FROM ({new})").format(
        cols=cols, sets=sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in data),
        old=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in data),
        new=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in data))
    with db(url(PLACES.source)) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS ceiling")
        if fresh:
            conn.execute(f"DROP TABLE IF EXISTS {CEILING_TABLE}")
            conn.execute(f"CREATE TABLE {CEILING_TABLE} (LIKE public.{TABLE} INCLUDING DEFAULTS INCLUDING "
                         "CONSTRAINTS, PRIMARY KEY (id))")
            conn.execute("CHECKPOINT")
        started = time.monotonic()
        written = conn.execute(statement).rowcount
        seconds = time.monotonic() - started
    return {"seconds": seconds, "rows_written": written}


# -- Shuttle: the migration file through start_run, with local workers --------------------------------

def shuttle_run(settings: Settings, ledger: Ledger, toml: Path, workers: int, chunk_rows: int, fresh: bool,
                log_dir: Path, timeout: float) -> dict[str, Any]:
    if fresh:
        with db(url(PLACES.target)) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {SHUTTLE_TABLE}")
            conn.execute("CHECKPOINT")
    log_dir.mkdir(parents=True, exist_ok=True)
    with LocalWorkers(settings, workers, name=f"declbench{workers}", log_dir=log_dir):
        started = time.monotonic()
        run = commands.start_run(settings, str(toml), Selection(), chunk_rows, None,
                                 source_url=url(PLACES.source), target_url=url(PLACES.target))
        planned = time.monotonic()
        report = wait_report(ledger, run.run_id, timeout=timeout)
        ended = time.monotonic()
    totals = report["totals"]
    return {"seconds": ended - started, "plan_s": planned - started, "run_id": run.run_id, "chunks": run.chunk_count,
            "verdict": report["verdict"], "rows_read": totals["rows_read"], "rows_written": totals["rows_written"],
            "rows_unchanged": totals.get("rows_unchanged"), "checks_ok": all(c["ok"] for c in report["checks"])}


# -- pgloader -----------------------------------------------------------------------------------------

def pgloader_file(work: Path, name: str, settings_clause: str | None) -> Path:
    with_clause = f"  WITH {settings_clause}\n" if settings_clause else ""
    path = work / f"{name}.load"
    path.write_text(PGLOADER_FILE.format(source=f"pgsql://postgres@127.0.0.1:5432/{PLACES.source}",
                                         target=f"pgsql://postgres@127.0.0.1:5432/{PLACES.pgloader}",
                                         with_clause=with_clause, table=TABLE))
    return path


def pgloader_run(command_file: Path, heap_mb: int | None, timeout: float) -> dict[str, Any]:
    argv = ["pgloader", *(["--dynamic-space-size", str(heap_mb)] if heap_mb else []), str(command_file)]
    started = time.monotonic()
    try:
        # No stdin: a pgloader out of heap drops into SBCL's debugger, which must not wait for input.
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code, out = -1, f"timed out after {timeout:.0f}s\n{exc.stdout or ''}{exc.stderr or ''}"
    seconds = time.monotonic() - started
    (command_file.parent / f"{command_file.stem}-{int(time.time())}.log").write_text(out)
    rows = re.search(rf'"public"\."{TABLE}"\s+(\d+)\s+(\d+)', out)
    phases = {name: float(s) for name, s in re.findall(
        r"^\s*(COPY Threads Completion|Index Build Completion|Create Indexes|Primary Keys)\s+\d+\s+\d+\s+([0-9.]+)s",
        out, re.M)}
    heap = "Heap exhausted" in out or "heap exhausted" in out.lower()
    with db(url(PLACES.pgloader)) as conn:
        present = conn.execute("SELECT to_regclass(%s)", (f"public.{TABLE}",)).fetchone()[0]
        target_rows = conn.execute(f"SELECT count(*) FROM public.{TABLE}").fetchone()[0] if present else 0
    return {"seconds": seconds, "exit": code, "heap_exhausted": heap, "errors": int(rows.group(1)) if rows else None,
            "rows_reported": int(rows.group(2)) if rows else None, "target_rows": target_rows, "phases": phases,
            "tail": out.strip().splitlines()[-3:] if code != 0 else []}


# -- dlt (in a subprocess of its own: its imports and state stay out of this process) --------------

DLT_SCRIPT = """
import json, os, sys, time
work = sys.argv[1]
os.environ.update({"DLT_DATA_DIR": work + "/data", "RUNTIME__LOG_LEVEL": "ERROR", "RUNTIME__DLTHUB_TELEMETRY": "false"})
import dlt
from dlt.sources.sql_database import sql_table
table = sql_table(credentials=sys.argv[2], table=sys.argv[4], backend="pyarrow", chunk_size=int(sys.argv[5]))
table.apply_hints(write_disposition={"disposition": "merge", "strategy": "upsert"}, primary_key="id")
pipeline = dlt.pipeline(pipeline_name="declbench", destination=dlt.destinations.postgres(credentials=sys.argv[3]),
                        dataset_name=sys.argv[6], pipelines_dir=work + "/pipelines")
started = time.monotonic()
pipeline.run(table, loader_file_format="csv")
seconds = time.monotonic() - started
rows = pipeline.last_trace.last_normalize_info.row_counts.get(sys.argv[4])
print(json.dumps({"seconds": seconds, "rows_normalized": rows, "dlt": dlt.__version__}))
"""


def dlt_run(work: Path, fresh: bool, chunk_size: int, timeout: float) -> dict[str, Any]:
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
        with db(url(PLACES.dlt)) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {DLT_SCHEMA} CASCADE")
            conn.execute("CHECKPOINT")
    work.mkdir(parents=True, exist_ok=True)
    # Trust authentication: dlt insists on a password in the URL, the server ignores it.
    target = f"postgresql://postgres:unused@127.0.0.1:5432/{PLACES.dlt}"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", DLT_SCRIPT, str(work), url(PLACES.source), target, TABLE,
                           str(chunk_size), DLT_SCHEMA], capture_output=True, text=True, timeout=timeout, cwd=work)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"dlt failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    with db(url(PLACES.dlt)) as conn:
        result["target_rows"] = conn.execute(f"SELECT count(*) FROM {DLT_SCHEMA}.{TABLE}").fetchone()[0]
    result["process_seconds"] = wall  # with interpreter start and dlt's imports; `seconds` is pipeline.run alone
    return result


# -- what each tool leaves in its target ----------------------------------------------------------

def table_facts(database: str, table: str) -> dict[str, Any]:
    with db(url(database)) as conn:
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
            return {"exists": False}
        columns = conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull FROM pg_attribute a"
            " WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            (table,)).fetchall()
        indexes = [r[0] for r in conn.execute(
            "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = %s::regclass ORDER BY 1",
            (table,)).fetchall()]
        primary = conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass"
                               " AND contype = 'p'", (table,)).fetchone()
    return {"exists": True, "not_null": [c for c, _, nn in columns if nn],
            "types": {c: t for c, t, _ in columns}, "primary_key": primary[0] if primary else None,
            "indexes": [re.sub(r" ON \S+ USING", " USING", i) for i in indexes]}


def fidelity() -> dict[str, dict[str, Any]]:
    return {"source": table_facts(PLACES.source, f"public.{TABLE}"),
            "ceiling (LIKE … + PRIMARY KEY)": table_facts(PLACES.source, CEILING_TABLE),
            "shuttle": table_facts(PLACES.target, SHUTTLE_TABLE),
            "pgloader": table_facts(PLACES.pgloader, f"public.{TABLE}"),
            "dlt": table_facts(PLACES.dlt, f"{DLT_SCHEMA}.{TABLE}")}


# -- reporting ----------------------------------------------------------------------------------

def rate(rows: int, runs: list[dict[str, Any]]) -> str:
    low, mid, high = spread([rows / r["seconds"] for r in runs])
    secs = spread([r["seconds"] for r in runs])
    return f"{mid:,.0f} | {low:,.0f} | {high:,.0f} | {secs[1]:.1f} ({secs[0]:.1f}–{secs[2]:.1f})"


def commas(values: Any) -> str:
    return ", ".join(f"{v:,}" for v in values)


def median_seconds(runs: list[dict[str, Any]]) -> float:
    return statistics.median(r["seconds"] for r in runs)


def engine_version() -> str:
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--", "common", "producer", "worker")
    return f"{git('rev-parse', '--short', 'HEAD') or 'unknown'}{' + uncommitted engine changes' if dirty else ''}"


LABELS = {
    "ceiling": "ceiling: one `INSERT … SELECT … ON CONFLICT DO UPDATE … WHERE IS DISTINCT FROM`, in-database",
    "shuttle-1": "Shuttle, migration file, 1 worker process",
    "shuttle-2": "Shuttle, migration file, 2 worker processes",
    "pgloader": "pgloader, database to database (a reload)",
    "dlt": "dlt `sql_table` (pyarrow) → postgres, merge (upsert) on id, CSV load",
}


def summarize(args: argparse.Namespace, results: dict[str, dict[str, list[dict[str, Any]]]],
              facts: dict[str, Any], probe: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
    rows = args.rows
    body = [f"## Declared PostgreSQL copy vs ceiling, pgloader, dlt ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
            "", f"Command: `flock /tmp/shuttle-bench.lock .venv/bin/python ops/bench/bench_declarative.py "
            f"{' '.join(sys.argv[1:])}` (engine at commit {engine_version()}).", "",
            f"{rows:,} rows of `archived_predictions` (DESIGN §6 shape), {args.repeats} repeats interleaved; "
            f"chunk_rows {args.chunk_rows:,}; pgloader `--dynamic-space-size {args.pgloader_heap_mb}` with "
            f"`{args.pgloader_with}`; dlt chunk_size {args.dlt_chunk_size:,}. The machine was shared with "
            "other work (other helpers' tests) while this ran; the methods are interleaved so that noise hits "
            "each alike.", "",
            "| method | run | rows/s median | min | max | seconds median (min–max) | note |",
            "|---|---|---:|---:|---:|---|---|"]
    for method, label in LABELS.items():
        if method not in results:
            continue
        for phase in ("fresh", "rerun"):
            runs = results[method].get(phase) or []
            if not runs:
                continue
            note = ""
            if method.startswith("shuttle"):
                note = (f"{runs[0]['chunks']} chunks; rows_written {commas(r['rows_written'] for r in runs)};"
                        f" verdicts {', '.join(sorted({r['verdict'] for r in runs}))}")
            elif method == "ceiling":
                note = f"rows written {commas(r['rows_written'] for r in runs)}"
            elif method == "pgloader":
                phases = runs[0]["phases"]
                note = (f"exit {', '.join(str(r['exit']) for r in runs)}; target rows {runs[-1]['target_rows']:,}; "
                        f"its COPY {phases.get('COPY Threads Completion', 0):.1f}s, index build "
                        f"{phases.get('Index Build Completion', 0):.1f}s (first repeat)")
            elif method == "dlt":
                note = (f"target rows {runs[-1]['target_rows']:,}; whole process median "
                        f"{statistics.median(r['process_seconds'] for r in runs):.1f}s (the rate uses `pipeline.run`)")
            body.append(f"| {label} | {phase} | {rate(rows, runs)} | {note} |")
    ratios: dict[str, Any] = {}
    s2 = results.get("shuttle-2", {}).get("fresh")
    if s2:
        for ref in ("ceiling", "pgloader", "dlt"):
            ref_runs = results.get(ref, {}).get("fresh")
            if ref_runs:
                ratios[f"shuttle2_vs_{ref}"] = median_seconds(ref_runs) / median_seconds(s2)
                ratios[f"shuttle2_vs_{ref}_per_repeat"] = [r["seconds"] / s["seconds"] for r, s in zip(ref_runs, s2)]
        if results["shuttle-2"].get("rerun"):
            ratios["rerun_over_fresh"] = median_seconds(results["shuttle-2"]["rerun"]) / median_seconds(s2)
            ratios["rerun_over_fresh_per_repeat"] = [r["seconds"] / s["seconds"] for r, s in
                                                     zip(results["shuttle-2"]["rerun"], s2)]
            ratios["rerun_writes_zero"] = all(r["rows_written"] == 0 for r in results["shuttle-2"]["rerun"])
    body += ["", "Targets: " + TARGETS, ""]
    goals = [("shuttle2_vs_ceiling", 0.65, "2 workers vs the ceiling's rows/s"),
             ("shuttle2_vs_pgloader", 2.0, "2 workers vs pgloader fresh"),
             ("shuttle2_vs_dlt", 5.0, "2 workers vs dlt fresh")]
    for key, goal, what in goals:
        if key in ratios:
            met = ratios[key] >= goal
            body.append(f"- {what}: **{ratios[key]:.2f}×** (goal ≥ {goal:g}×: **{'met' if met else 'NOT met'}**; "
                        f"per repeat {', '.join(f'{x:.2f}' for x in ratios[key + '_per_repeat'])})")
    if "rerun_over_fresh" in ratios:
        met = ratios["rerun_over_fresh"] <= 1 / 3
        body.append(f"- Shuttle re-run / fresh (2 workers): **{ratios['rerun_over_fresh']:.2f}** (goal ≤ 0.33: "
                    f"**{'met' if met else 'NOT met'}**; per repeat "
                    f"{', '.join(f'{x:.2f}' for x in ratios['rerun_over_fresh_per_repeat'])}); re-runs wrote "
                    f"{'0 rows' if ratios['rerun_writes_zero'] else 'ROWS'}")
    if probe is not None:
        body += ["", f"pgloader with its default settings (no WITH clause, no --dynamic-space-size), probed once: exit "
                 f"{probe['exit']}, heap exhausted: {probe['heap_exhausted']}, {probe['seconds']:.1f}s, target rows "
                 f"{probe['target_rows']:,}" + (f"; last lines: `{' / '.join(probe['tail'])[:300]}`"
                                                if probe["tail"] else "")]
    body += ["", "What each tool left in its target (read from the catalogue after the last run):", "",
             "| target | NOT NULL columns | primary key | indexes | types that differ from the source |",
             "|---|---|---|---|---|"]
    source_types = facts.get("source", {}).get("types", {})
    for name, f in facts.items():
        if not f.get("exists"):
            body.append(f"| {name} | (no table) | | | |")
            continue
        differ = {c: t for c, t in f["types"].items() if source_types.get(c) != t}
        extra = [c for c in f["types"] if c not in source_types]
        body.append(f"| {name} | {', '.join(f['not_null']) or 'none'} | {f['primary_key'] or 'none'} | "
                    f"{'; '.join(f['indexes']) or 'none'} | "
                    f"{', '.join(f'{c}: {t}' for c, t in differ.items() if c not in extra) or 'none'}"
                    f"{'; extra columns ' + ', '.join(extra) if extra else ''} |")
    data = {"rows": rows, "repeats": args.repeats, "ratios": ratios,
            "seconds": {m: {p: [r["seconds"] for r in v] for p, v in ph.items()} for m, ph in results.items()},
            "facts": facts, "probe": probe}
    return body, data


def write_section(path: Path, body: list[str], data: dict[str, Any]) -> None:
    """Replace (or add) this benchmark's section of RESULTS.md, leaving the others as they are."""
    text = path.read_text() if path.exists() else ""
    start, end = "<!-- section:declarative -->\n", "<!-- /section:declarative -->\n"
    section = start + "\n".join(body) + f"\n\n<!-- data: {json.dumps(data, default=str)} -->\n" + end
    if start in text and end in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    log(f"wrote {path}")


# -- main ---------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="ceiling,shuttle-1,shuttle-2,pgloader,dlt")
    parser.add_argument("--chunk-rows", type=int, default=None, help="default: the settings' chunk_rows")
    parser.add_argument("--pgloader-heap-mb", type=int, default=4096, help="pgloader --dynamic-space-size")
    parser.add_argument("--pgloader-with", default="prefetch rows = 10000, batch rows = 10000, workers = 2, "
                        "concurrency = 1", help="pgloader WITH clause")
    parser.add_argument("--probe-pgloader-defaults", action="store_true",
                        help="first run pgloader once with its default settings (it may exhaust its heap)")
    parser.add_argument("--dlt-chunk-size", type=int, default=50_000)
    parser.add_argument("--redis-db", type=int, default=10)
    parser.add_argument("--reuse-source", action="store_true", help="keep the source if it has --rows rows")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--db-prefix", default=Places.prefix, help="names of the databases it uses (rebuilt)")
    args = parser.parse_args()
    global PLACES
    PLACES = Places(args.db_prefix)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    work = Path(f"/tmp/shuttle-declbench-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    broker = f"redis://127.0.0.1:6379/{args.redis_db}"
    queue = f"shuttle-declbench-{os.getpid()}"
    settings = load_settings(source_url=url(PLACES.source), target_url=url(PLACES.target), ledger_url=url(PLACES.ledger),
                             broker_url=broker, result_backend=broker, queue=queue)
    args.chunk_rows = args.chunk_rows or settings.chunk_rows
    log(f"machine: {machine()}")

    prepare_source(args.rows, args.reuse_source)
    for database in (PLACES.target, PLACES.pgloader, PLACES.dlt):
        recreate(database)
    create_database(url(PLACES.ledger))
    ledger = Ledger(url(PLACES.ledger))
    ledger.ensure_schema()
    toml = work / "declbench.toml"
    toml.write_text(MIGRATION_FILE.format(table=SHUTTLE_TABLE))
    tuned = pgloader_file(work, "tuned", args.pgloader_with)

    probe = None
    if args.probe_pgloader_defaults and "pgloader" in methods:
        log("pgloader with its default settings, once …")
        probe = pgloader_run(pgloader_file(work, "defaults", None), None, min(args.timeout, 600))
        log(f"  exit {probe['exit']}, heap exhausted {probe['heap_exhausted']}, {probe['seconds']:.1f}s, "
            f"target rows {probe['target_rows']:,}")

    results: dict[str, dict[str, list[dict[str, Any]]]] = {m: {"fresh": [], "rerun": []} for m in methods}
    try:
        for repeat in range(1, args.repeats + 1):
            for method in methods:
                for phase in ("fresh", "rerun"):
                    if method == "shuttle-1" and phase == "rerun":
                        continue  # the re-run figure is taken with 2 workers
                    fresh = phase == "fresh"
                    if method == "ceiling":
                        res = ceiling_run(fresh)
                    elif method.startswith("shuttle"):
                        res = shuttle_run(settings, ledger, toml, int(method[-1]), args.chunk_rows, fresh,
                                          work / "workers", args.timeout)
                    elif method == "pgloader":
                        res = pgloader_run(tuned, args.pgloader_heap_mb, args.timeout)
                    else:
                        res = dlt_run(work / "dlt", fresh, args.dlt_chunk_size, args.timeout)
                    results[method][phase].append(res)
                    log(f"repeat {repeat} {method:<9} {phase:<5} {res['seconds']:7.1f}s "
                        f"{args.rows / res['seconds']:>10,.0f} rows/s  "
                        f"{ {k: v for k, v in res.items() if k not in ('seconds', 'tail', 'phases')} }")
    finally:
        ledger.dispose()
        client = redis.Redis.from_url(broker)
        client.delete(queue)
        client.close()
    facts = fidelity()
    body, data = summarize(args, results, facts, probe)
    print("\n" + "\n".join(body) + "\n")
    write_section(args.results, body, data)


if __name__ == "__main__":
    main()
