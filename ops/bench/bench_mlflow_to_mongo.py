#!/usr/bin/env python
"""Benchmark of `mlflow-to-mongo` (issue #3) against the reference tool's approach and the server's ceiling.

    .venv/bin/python ops/bench/bench_mlflow_to_mongo.py --rows 50000 --repeats 1 --memory-rows 0   # quick try
    .venv/bin/python ops/bench/bench_mlflow_to_mongo.py --rows 1000000 --repeats 1                 # the figures
    .venv/bin/python ops/bench/bench_mlflow_to_mongo.py --profile --rows 100000                    # sink phases

Per repeat, interleaved so noise hits every method alike, each into a fresh MongoDB database:
  baseline   what the reference tool does: one process, a plain (server-side) cursor over each table,
             `insert_many` of 1,000 documents, no keys (ObjectId `_id`); then its indexes (its README's
             schema table, REFERENCE_INDEXES, built on the filled collections: the cheaper order) and its
             validation (`db.<collection>.count()` per collection against the table's row count). The load alone is
             also reported, as (a′), for information;
  ceiling    the server's own ceiling: the Shuttle documents, pre-built and pre-encoded before the clock
             starts, bulk-upserted by `_id` (unordered `ReplaceOne(upsert=True)`, batches of 1,000) from 2
             processes into collections with only `_id`; no reading, no transforming;
  ceiling-idx the same into collections whose indexes exist before the clock starts (information);
  shuttle-1  `start_run` → report in the ledger, 1 local worker process (keyed, idempotent, verified;
             the indexes are built after the chunks, before verification, and timed);
  shuttle-2  the same with 2 worker processes.
The section goes to RESULTS.md when the methods the targets are judged on ran (`--methods` may leave out
ceiling-idx, which is information and the slowest). Then once: worker peak memory (VmHWM of each worker's process group) of a 2-worker run at --memory-rows,
compared with the 2-worker runs at --rows. Rows/s are source rows of every table / wall seconds.

The source is an MLflow database whose schema MLflow's client created, filled in PostgreSQL by
`build_bulk` (runs, metrics) plus params and tags generated the same way. MongoDB: nx-27017 started
here on a free port (tests/mongo_server.NxServer), or the real server at SHUTTLE_TEST_MONGO_URI.
Own places only: databases `shuttle_m2mbench_<pid>_*` (dropped at the end unless --keep), Redis DB 7
(`--redis-db`, else SHUTTLE_TEST_REDIS_DB) with queue `shuttle-m2mbench-<pid>`, MongoDB databases
`m2mbench_<pid>_*` (dropped).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import statistics
import sys
import tempfile
import time
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import bson  # noqa: E402
import pymongo  # noqa: E402
import redis  # noqa: E402
from bson.decimal128 import Decimal128  # noqa: E402
from bson.raw_bson import RawBSONDocument  # noqa: E402
from psycopg import sql  # noqa: E402
from pymongo import ReplaceOne  # noqa: E402

from common.connectors.postgres import create_database  # noqa: E402
from common.ledger import Ledger  # noqa: E402
from common.migrations.base import Selection  # noqa: E402
from common.migrations.mlflow_mapping import to_document  # noqa: E402
from common.migrations.mlflow_metrics_fixtures import build_bulk  # noqa: E402
from common.migrations.mlflow_to_mongo import MlflowToMongo  # noqa: E402
from common.migrations.mlflow_schema import parents_first  # noqa: E402
from common.settings import Settings, load_settings  # noqa: E402
from producer import commands  # noqa: E402
from producer.local_workers import LocalWorkers  # noqa: E402
from tests.mongo_server import REAL_MONGO_URI, NxServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import db, log, machine, process_group_memory, spread, wait_report  # noqa: E402

PG = "postgresql://postgres@127.0.0.1:5432"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MIGRATION = "mlflow-to-mongo"
BATCH = 1_000
RUNS_PER_ROW = 100  # one MLflow run per 100 metric rows (5 keys × 20 steps)
METHODS = ("baseline", "ceiling", "ceiling-idx", "shuttle-1", "shuttle-2", "rerun")
# What the targets are judged on; (b′) ceiling-idx is information and may be left out (--methods) to save time.
NEEDED = ("baseline", "ceiling", "shuttle-1", "shuttle-2", "rerun")
TARGETS = ("2 workers reach at least 70% of the ceiling (b) and beat the baseline (a) while being keyed, "
           "idempotent and verified; peak worker memory flat as the database grows.")

# Three params and two tags per run, as MLflow stores them (PRIMARY KEY (key, run_uuid)).
BULK_PARAMS_SQL = """
INSERT INTO params (key, value, run_uuid)
SELECT p, CASE p WHEN 'lr' THEN (0.1 ^ (1 + i % 3))::text WHEN 'depth' THEN (2 + i % 8)::text
              ELSE '{"layers": [64, 32], "dropout": 0.2}' END, run_uuid
FROM (SELECT run_uuid, row_number() OVER (ORDER BY run_uuid) AS i FROM runs) r, unnest(ARRAY['lr', 'depth', 'config']) p
"""
BULK_TAGS_SQL = """
INSERT INTO tags (key, value, run_uuid)
SELECT t, CASE t WHEN 'stage' THEN 'dev' ELSE 'note for ' || run_uuid END, run_uuid
FROM runs, unnest(ARRAY['stage', 'mlflow.note.content']) t
"""


def with_database(uri: str, name: str) -> str:
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


# -- the source --------------------------------------------------------------------------------------

def build_source(url: str, rows: int) -> dict[str, int]:
    """An MLflow database of about `rows` rows in all: metrics, plus runs, params and tags (1 : 3 : 2 per run)."""
    create_database(url)
    runs = max(1, -(-rows // (RUNS_PER_ROW + 6)))  # rounded up: at least `rows` rows
    build_bulk(url, runs=runs, rows=runs * RUNS_PER_ROW, experiments=20)
    with db(url) as conn:
        conn.execute(BULK_PARAMS_SQL)
        conn.execute(BULK_TAGS_SQL)
        for table in ("params", "tags", "runs", "metrics"):
            conn.execute(f"VACUUM ANALYZE {table}")
    return table_rows(url)


def table_rows(url: str) -> dict[str, int]:
    with db(url) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE nspname = 'public' AND relkind IN ('r', 'p') ORDER BY relname")]
        counts = {n: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(n))).fetchone()[0]
                  for n in names}
    return {n: c for n, c in counts.items() if c}


# -- (a) the reference tool's way --------------------------------------------------------------------

def plain(value: Any) -> Any:
    """What a one-off script does to make a value storable, and nothing more."""
    if isinstance(value, Decimal):
        return Decimal128(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, date) and not isinstance(value, datetime):
        return value.isoformat()
    return value


# The reference tool's indexes, from its README's schema table ("Indexed on …", unique where it says so).
REFERENCE_INDEXES: dict[str, list[tuple[list[tuple[str, int]], bool]]] = {
    "experiments": [([("name", 1)], False), ([("creation_time", 1)], False)],
    "runs": [([("experiment_id", 1)], False), ([("start_time", 1)], False), ([("status", 1)], False)],
    "metrics": [([("run_uuid", 1), ("key", 1), ("step", 1)], False), ([("timestamp", 1)], False)],
    "params": [([("run_uuid", 1), ("key", 1)], True)],
    "tags": [([("run_uuid", 1), ("key", 1)], True)],
    "registered_models": [([("name", 1)], True), ([("creation_time", 1)], False)],
    "model_versions": [([("name", 1), ("version", 1)], True), ([("current_stage", 1)], False)],
}


def run_baseline(source_url: str, target_uri: str, tables: dict[str, int]) -> dict[str, Any]:
    client = pymongo.MongoClient(target_uri)
    target = client.get_default_database()
    started = time.monotonic()
    written = 0
    with db(source_url) as conn:
        for table in tables:
            with conn.transaction(), conn.cursor(name=f"baseline_{table}") as cur:
                cur.itersize = BATCH
                cur.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
                names = [d.name for d in cur.description]
                batch = []
                for row in cur:
                    batch.append({n: plain(v) for n, v in zip(names, row)})
                    if len(batch) == BATCH:
                        target[table].insert_many(batch, ordered=False)
                        written += len(batch)
                        batch = []
                if batch:
                    target[table].insert_many(batch, ordered=False)
                    written += len(batch)
    loaded = time.monotonic() - started
    for table, indexes in REFERENCE_INDEXES.items():
        if table in tables:
            for keys, unique in indexes:
                target[table].create_index(keys, unique=unique)
    # Its validation is `db.<collection>.count()` (its README): the server's count without a filter.
    mismatched = [t for t, rows in tables.items() if target[t].estimated_document_count() != rows]
    seconds = time.monotonic() - started
    counted = sum(target[t].estimated_document_count() for t in tables)
    client.close()
    return {"seconds": seconds, "load_seconds": loaded, "written": written, "documents": counted,
            "count_mismatches": len(mismatched)}


# -- (b) the server's ceiling ------------------------------------------------------------------------

def prebuild(source_url: str, target_uri: str) -> list[tuple[str, list[RawBSONDocument]]]:
    """Shuttle's own documents of every row (same `_id`s, same fields), BSON-encoded, in batches of 1,000."""
    migration = MlflowToMongo(source_url, target_uri, MlflowToMongo.plan_options())
    batches: list[tuple[str, list[RawBSONDocument]]] = []
    try:
        for name in parents_first(migration.tables):
            table = migration.tables[name]
            batch: list[RawBSONDocument] = []
            with db(source_url) as conn, conn.transaction(), conn.cursor(name=f"prebuild_{name}") as cur:
                cur.itersize = BATCH
                cur.execute(sql.SQL("SELECT t.*, {p} AS _p FROM {f}").format(
                    p=table.partition_expr(), f=table.from_clause("public")))
                names = [d.name for d in cur.description]
                for row in cur:
                    values = dict(zip(names, row))
                    partition = values.pop("_p")
                    doc, _ = to_document(name, table.columns, table.key, values, partition)
                    batch.append(RawBSONDocument(bson.encode(doc)))
                    if len(batch) == BATCH:
                        batches.append((name, batch))
                        batch = []
            if batch:
                batches.append((name, batch))
    finally:
        migration.close()
    return batches


_PREBUILT: list[tuple[str, list[RawBSONDocument]]] = []
_PREBUILT_FILE: list[Path] = []  # the same batches on disk, for the spawned writers


def prebuilt_file() -> Path:
    """The pre-built batches pickled once (raw BSON bytes), so writer processes can be spawned, not forked.

    A fork of this process, which holds pymongo clients and their monitor threads, can inherit a lock
    held by one of those threads and hang forever (it did, once, in a 1M-row run)."""
    if not _PREBUILT_FILE:
        path = Path(tempfile.mkstemp(prefix="m2mbench-prebuilt-", suffix=".pickle")[1])
        with path.open("wb") as out:
            pickle.dump([(c, [d.raw for d in docs]) for c, docs in _PREBUILT], out, protocol=pickle.HIGHEST_PROTOCOL)
        _PREBUILT_FILE.append(path)
    return _PREBUILT_FILE[0]


def _ceiling_writer(uri: str, prebuilt: str, share: int, processes: int, ready, go, done) -> None:
    with open(prebuilt, "rb") as src:
        mine = [(c, [RawBSONDocument(raw) for raw in docs]) for c, docs in pickle.load(src)[share::processes]]
    client = pymongo.MongoClient(uri)
    target = client.get_default_database()
    client.admin.command("ping")
    ready.wait()
    go.wait()
    for collection, docs in mine:
        target[collection].bulk_write([ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs], ordered=False)
    done.wait()
    client.close()


def run_ceiling(source_url: str, target_uri: str, indexes: bool, processes: int = 2) -> dict[str, Any]:
    if indexes:  # the collections and every index of Shuttle's contract, before the load, not timed
        migration = MlflowToMongo(source_url, target_uri, MlflowToMongo.plan_options())
        try:
            migration.prepare_target()
            migration.finish_target()
        finally:
            migration.close()
    context = multiprocessing.get_context("spawn")
    ready, go, done = (context.Barrier(processes + 1) for _ in range(3))
    prebuilt = str(prebuilt_file())
    workers = [context.Process(target=_ceiling_writer, args=(target_uri, prebuilt, i, processes, ready, go, done))
               for i in range(processes)]
    for w in workers:
        w.start()
    ready.wait()
    started = time.monotonic()
    go.wait()
    done.wait()
    seconds = time.monotonic() - started
    for w in workers:
        w.join()
        if w.exitcode:
            raise RuntimeError(f"a ceiling writer exited with {w.exitcode}")
    client = pymongo.MongoClient(target_uri)
    counted = sum(client.get_default_database()[c].estimated_document_count()
                  for c in client.get_default_database().list_collection_names())
    client.close()
    return {"seconds": seconds, "documents": counted}


# -- Shuttle -----------------------------------------------------------------------------------------

def shuttle_run(settings: Settings, ledger: Ledger, workers: int, chunk_rows: int, source_url: str,
                target_uri: str, log_dir: Path) -> dict[str, Any]:
    pool = LocalWorkers(settings, workers, name=f"m2mbench{workers}", log_dir=log_dir)
    with pool:
        started = time.monotonic()
        run = commands.start_run(settings, MIGRATION, Selection(), chunk_rows, None,
                                 source_url=source_url, target_url=target_uri)
        planned = time.monotonic()
        report = wait_report(ledger, run.run_id)
        ended = time.monotonic()
        memory = [process_group_memory(p.pid) for p in pool.processes]
    totals = report["totals"]
    return {"seconds": ended - started, "plan_s": planned - started, "chunks": run.chunk_count,
            "verdict": report["verdict"], "rows_read": totals["rows_read"], "rows_written": totals["rows_written"],
            "rows_unchanged": totals.get("rows_unchanged"), "chunk_wall_s": report["timing"].get("wall_seconds"),
            "worker_hwm_kb": max((p["hwm_kb"] for group in memory for p in group), default=0)}


# -- where a Shuttle batch's time goes ---------------------------------------------------------------

def profile(source_url: str, mongo_uri: str, pid: int, rows: int) -> list[str]:
    """The metrics table (its first partitions, up to `rows` rows) migrated in-process, the sink's calls
    timed: into collections whose indexes exist before the load (fresh, then a re-run over the same
    documents), and as a run does it: collections with only `_id`, the indexes built afterwards."""
    from common.model import ChunkSpec

    timers = {"find existing": 0.0, "bulk_write": 0.0}
    collection_cls = pymongo.collection.Collection
    original_find, original_bulk = collection_cls.find, collection_cls.bulk_write

    def find(self, *a, **k):
        t = time.perf_counter()
        result = list(original_find(self, *a, **k))
        timers["find existing"] += time.perf_counter() - t
        return result

    def bulk(self, *a, **k):
        t = time.perf_counter()
        try:
            return original_bulk(self, *a, **k)
        finally:
            timers["bulk_write"] += time.perf_counter() - t

    lines = ["| pass | rows | total s | rows/s | find existing s | bulk_write s | read + convert + other s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    client = pymongo.MongoClient(mongo_uri)
    collection_cls.find, collection_cls.bulk_write = find, bulk
    try:
        for indexed in (True, False):
            target = with_database(mongo_uri, f"m2mbench_{pid}_profile_{int(indexed)}")
            migration = MlflowToMongo(source_url, target, MlflowToMongo.plan_options())
            table = migration.tables["metrics"]
            specs, planned = [], 0
            for partition, n in sorted(migration.source.query(sql.SQL("SELECT {p}, count(*) FROM {f} GROUP BY 1").format(
                    p=table.partition_expr(), f=table.from_clause("public")))):
                if planned >= rows:
                    break
                specs.append(ChunkSpec("metrics", partition, "", "", n))
                planned += n
            migration.prepare_target()
            if indexed:
                migration.finish_target()
            passes = ("fresh, indexes built before", "re-run (documents present)") if indexed \
                else ("fresh, `_id` only (as a run does)",)
            for label in passes:
                timers.update({k: 0.0 for k in timers})
                t = time.perf_counter()
                read = sum(migration.run_chunk(spec, lambda n: None).rows_read for spec in specs)
                total = time.perf_counter() - t
                other = total - sum(timers.values())
                lines.append(f"| {label} | {read:,} | {total:.2f} | {read / total:,.0f} | "
                             f"{timers['find existing']:.2f} | {timers['bulk_write']:.2f} | {other:.2f} |")
            if not indexed:
                t = time.perf_counter()
                migration.finish_target()
                lines.append(f"| … then the indexes built on the filled collection (`finish_target`) | {read:,} | "
                             f"{time.perf_counter() - t:.2f} | | | | |")
            migration.close()
            client.drop_database(urlsplit(target).path.lstrip("/"))
    finally:
        collection_cls.find, collection_cls.bulk_write = original_find, original_bulk
        client.close()
    return lines


# -- report ------------------------------------------------------------------------------------------

def render(args, server: str, tables: dict[str, int], results: dict[str, list[dict[str, Any]]],
           memory: dict[str, Any] | None, chunk_rows: int, load: list[float], prof: list[str] | None) -> str:
    rows = sum(tables.values())
    if "baseline" in results:  # its load phase alone, measured inside the same runs
        results = {"baseline": results["baseline"],
                   "baseline-load": [{"seconds": r["load_seconds"]} for r in results["baseline"]],
                   **{k: v for k, v in results.items() if k != "baseline"}}
    rate = {k: statistics.median(rows / r["seconds"] for r in v) for k, v in results.items()}
    names = {"baseline": "(a) baseline: the reference tool's work — plain cursor, `insert_many` ×1,000, no keys, "
                         "1 process; then its indexes and its count validation",
             "baseline-load": "(a′) the baseline's load alone, without its indexes and validation (information)",
             "ceiling": "(b) ceiling: pre-built documents, `_id` upserts ×1,000, 2 processes",
             "ceiling-idx": "(b′) the same into collections with Shuttle's indexes (information)",
             "shuttle-1": "Shuttle, 1 worker process, fresh database",
             "shuttle-2": "Shuttle, 2 worker processes, fresh database",
             "rerun": "Shuttle re-run, 2 workers, over the filled database"}
    notes = {"baseline": "documents " + ", ".join(f"{r['documents']:,}" for r in results["baseline"])
             + "; collections whose count differs from the table: "
             + ", ".join(str(r["count_mismatches"]) for r in results["baseline"])
             + "; indexes as its README lists them (" + str(sum(len(v) for v in REFERENCE_INDEXES.values()))
             + " over 7 collections), built after the load",
             "baseline-load": "the same runs, timed until the last `insert_many`",
             "ceiling": "documents " + ", ".join(f"{r['documents']:,}" for r in results["ceiling"])
             + "; Shuttle's own documents (same `_id`s and fields), BSON-encoded before the clock starts; `_id` "
               "index only",
             "ceiling-idx": "documents " + ", ".join(f"{r['documents']:,}" for r in results.get("ceiling-idx", []))
             + "; Shuttle's indexes created before the clock starts (a run builds them after its chunks)"}
    for label in ("shuttle-1", "shuttle-2", "rerun"):
        r = results[label]
        notes[label] = (f"{r[0]['chunks']} chunks; plan {statistics.median(x['plan_s'] for x in r):.1f}s; chunk phase "
                        f"{statistics.median(x['chunk_wall_s'] or 0 for x in r):.1f}s; rows_written "
                        + ", ".join(f"{x['rows_written']:,}" for x in r) + "; rows_unchanged "
                        + ", ".join(f"{x['rows_unchanged']:,}" for x in r) + "; verdicts "
                        + ", ".join(x["verdict"] for x in r) + "; largest worker VmHWM "
                        + ", ".join(f"{x['worker_hwm_kb'] / 1024:.0f} MiB" for x in r))
    table = ["| method | rows/s median | min | max | seconds median (min–max) | note |", "|---|---:|---:|---:|---|---|"]
    for label, values in results.items():
        secs = [v["seconds"] for v in values]
        low, mid, high = spread([rows / s for s in secs])
        s_low, s_mid, s_high = spread(secs)
        table.append(f"| {names[label]} | {mid:,.0f} | {low:,.0f} | {high:,.0f} | {s_mid:.1f} ({s_low:.1f}–{s_high:.1f}) "
                     f"| {notes[label]} |")
    vs_ceiling, vs_baseline = rate["shuttle-2"] / rate["ceiling"], rate["shuttle-2"] / rate["baseline"]
    m = machine()
    lines = [
        f"## `mlflow-to-mongo` ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
        f"Command: `.venv/bin/python ops/bench/bench_mlflow_to_mongo.py {' '.join(sys.argv[1:])}`", "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']}; {m['postgres']}; {m['python']}. Source MLflow "
        "database and ledger on this PostgreSQL, broker Redis, MongoDB server on this machine too.", "",
        f"MongoDB server: {server}.", "",
        f"Dataset: {rows:,} rows — " + ", ".join(f"{n} {c:,}" for n, c in tables.items())
        + f". MLflow's client created the schema and experiments; runs and metrics by `build_bulk` (5 keys × 20 "
        "steps per run, ~2% NaN, some ±Inf), params (3 per run) and tags (2 per run) generated in PostgreSQL "
        f"straight into MLflow's tables. chunk_rows {chunk_rows:,}, batch 1,000. Repeats: {args.repeats}, methods "
        "interleaved in the order listed, each into a fresh MongoDB database. Shuttle is timed from `start_run` "
        "until the report is in the ledger (planning, all chunks, the coordinator's index build and verification: "
        "indexes, counts per collection and partition, references, a sample); worker start-up is not timed. Load "
        "average (1 min) "
        f"before / after: {load[0]:.2f} / {load[-1]:.2f} on {m['nproc']} CPUs.", "",
        f"> Targets: {TARGETS}", "",
        *table, "",
        f"- 2 workers ≥ 70% of (b): **{'met' if vs_ceiling >= 0.7 else 'NOT met'}** — {vs_ceiling:.0%} of (b) "
        f"(1 worker: {rate['shuttle-1'] / rate['ceiling']:.0%}).",
        f"- 2 workers beat (a): **{'met' if vs_baseline > 1 else 'NOT met'}** — {vs_baseline:.2f}× (a) "
        f"(1 worker: {rate['shuttle-1'] / rate['baseline']:.2f}×).",
        f"- Against (a′), the baseline's load alone (no index, no validation): 2 workers "
        f"{rate['shuttle-2'] / rate['baseline-load']:.2f}×.",
        *([f"- Against (b′), the ceiling with Shuttle's indexes: 2 workers {rate['shuttle-2'] / rate['ceiling-idx']:.0%}; "
           f"(b′) itself is {rate['ceiling-idx'] / rate['ceiling']:.0%} of (b)."] if "ceiling-idx" in rate else []),
        "- Keyed, idempotent, verified: every Shuttle run's verdict is listed above (the coordinator's counts, "
        "references and sample); the re-run must write 0 documents (rows_written) and count all unchanged.",
    ]
    if memory:
        low, high = memory["small_kb"], memory["large_kb"]
        growth = high / low - 1
        lines.append(f"- Worker peak memory flat: **{'met' if growth <= 0.10 else 'NOT met'}** — largest worker "
                     f"process (VmHWM, 2-worker run) {low / 1024:.0f} MiB at {memory['small_rows']:,} rows → "
                     f"{high / 1024:.0f} MiB at {rows:,} rows ({growth:+.1%}; flat taken as within 10%).")
    if prof:
        lines += ["", "Where Shuttle's time goes: the first partitions of `metrics` migrated in the benchmark process "
                  "(one `run_chunk` per partition), pymongo's `find` (the sink's read of existing documents) and "
                  "`bulk_write` timed:", "", *prof]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="source rows over all tables (default 1,000,000)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--memory-rows", type=int, default=250_000,
                        help="smaller database for the memory comparison (0: skip)")
    parser.add_argument("--profile", action="store_true", help="only time the sink's phases (see profile())")
    parser.add_argument("--profile-rows", type=int, default=100_000,
                        help="metric rows for the phase timing run after the repeats (0: skip)")
    parser.add_argument("--chunk-rows", type=int, default=None, help="default: the settings' chunk_rows")
    parser.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    parser.add_argument("--keep", action="store_true", help="keep the PostgreSQL databases afterwards")
    parser.add_argument("--redis-db", type=int, default=int(os.environ.get("SHUTTLE_TEST_REDIS_DB", "7")),
                        help="Redis database of the broker (default: SHUTTLE_TEST_REDIS_DB, else 7)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to append the section to")
    parser.add_argument("--log-dir", type=Path, default=Path(f"/tmp/shuttle-m2mbench-{os.getpid()}"))
    args = parser.parse_args()
    pid = os.getpid()
    prefix = f"shuttle_m2mbench_{pid}"
    source_url, ledger_url = f"{PG}/{prefix}_src", f"{PG}/{prefix}_ledger"
    broker = f"redis://127.0.0.1:6379/{args.redis_db}"
    queue = f"shuttle-m2mbench-{pid}"
    settings = load_settings(source_url=source_url, ledger_url=ledger_url, broker_url=broker,
                             result_backend=broker, queue=queue)
    chunk_rows = args.chunk_rows or settings.chunk_rows
    args.log_dir.mkdir(parents=True, exist_ok=True)
    server = None
    if REAL_MONGO_URI:
        mongo_uri, server_text = REAL_MONGO_URI.rstrip("/"), "real server at SHUTTLE_TEST_MONGO_URI"
    else:
        server = NxServer().start()
        mongo_uri = server.uri
        import importlib.metadata as md
        server_text = f"nx-27017 {md.version('nx-27017')} (MongoDB wire protocol on SQLite), started here on port {server.port}"
    mongo = pymongo.MongoClient(mongo_uri)
    created: list[str] = []
    try:
        log(f"building {source_url}: ~{args.rows:,} rows …")
        t = time.monotonic()
        tables = build_source(source_url, args.rows)
        log(f"  {sum(tables.values()):,} rows in {time.monotonic() - t:.1f}s: {tables}")
        if args.profile:
            lines = profile(source_url, mongo_uri, pid, args.profile_rows)
            print("\n".join(lines))
            return
        create_database(ledger_url)
        ledger = Ledger(ledger_url)
        ledger.ensure_schema()
        methods = args.methods.split(",")
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in methods}
        if "ceiling" in methods or "ceiling-idx" in methods:
            log("pre-building the ceiling's documents (not timed) …")
            t = time.monotonic()
            _PREBUILT.extend(prebuild(source_url, with_database(mongo_uri, f"m2mbench_{pid}_x")))
            log(f"  {sum(len(b) for _, b in _PREBUILT):,} documents in {time.monotonic() - t:.1f}s")
        load = [os.getloadavg()[0]]
        for repeat in range(1, args.repeats + 1):
            log(f"repeat {repeat}/{args.repeats}")
            for label in methods:
                target = with_database(mongo_uri, f"m2mbench_{pid}_{label.replace('-', '')}_r{repeat}")
                created.append(target)
                if label == "baseline":
                    result = run_baseline(source_url, target, tables)
                elif label.startswith("ceiling"):
                    result = run_ceiling(source_url, target, indexes=label == "ceiling-idx")
                elif label == "rerun":  # over what shuttle-2 just wrote
                    target = with_database(mongo_uri, f"m2mbench_{pid}_shuttle2_r{repeat}")
                    result = shuttle_run(settings, ledger, 2, chunk_rows, source_url, target, args.log_dir)
                else:
                    result = shuttle_run(settings, ledger, int(label[-1]), chunk_rows, source_url, target, args.log_dir)
                results[label].append(result)
                log(f"  {label}: {result['seconds']:.1f}s {sum(tables.values()) / result['seconds']:,.0f} rows/s "
                    + " ".join(f"{k}={v}" for k, v in result.items() if k != "seconds"))
                if not (label == "shuttle-2" and "rerun" in methods):
                    mongo.drop_database(urlsplit(target).path.lstrip("/"))
        load.append(os.getloadavg()[0])
        _PREBUILT.clear()
        memory = None
        if args.memory_rows and "shuttle-2" in methods:
            small_url = f"{PG}/{prefix}_small"
            log(f"memory: building {small_url}: ~{args.memory_rows:,} rows …")
            small_tables = build_source(small_url, args.memory_rows)
            target = with_database(mongo_uri, f"m2mbench_{pid}_memory")
            created.append(target)
            small = shuttle_run(settings, ledger, 2, chunk_rows, small_url, target, args.log_dir)
            log(f"  {sum(small_tables.values()):,} rows: {small}")
            memory = {"small_rows": sum(small_tables.values()), "small_kb": small["worker_hwm_kb"],
                      "large_kb": max(r["worker_hwm_kb"] for r in results["shuttle-2"])}
        ledger.dispose()
        prof = None
        if args.profile_rows:
            log(f"phases of the sink over {args.profile_rows:,} metric rows, in-process …")
            prof = profile(source_url, mongo_uri, pid, args.profile_rows)
            print("\n".join(prof))
        if set(methods) >= set(NEEDED):
            section = render(args, server_text, tables, results, memory, chunk_rows, load, prof)
            print("\n" + section)
            with args.results.open("a") as out:
                out.write("\n" + section)
            log(f"appended to {args.results}")
    finally:
        for path in _PREBUILT_FILE:
            path.unlink(missing_ok=True)
        for target in created:
            mongo.drop_database(urlsplit(target).path.lstrip("/"))
        mongo.close()
        if server is not None:
            server.cleanup()
        redis.Redis.from_url(broker).delete(queue)
        if not args.keep:
            with db(f"{PG}/postgres") as conn:
                for suffix in ("src", "ledger", "small"):
                    conn.execute(f'DROP DATABASE IF EXISTS "{prefix}_{suffix}" WITH (FORCE)')


if __name__ == "__main__":
    main()
