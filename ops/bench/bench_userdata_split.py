#!/usr/bin/env python
"""Benchmark of `userdata-split` and its rollback against the runbook's way and the server's own ceiling.

    .venv/bin/python ops/bench/bench_userdata_split.py --docs 200000 --repeats 3     # the figures
    .venv/bin/python ops/bench/bench_userdata_split.py --docs 5000 --repeats 1       # a quick try

The source is one `user_data` collection of generated documents (`userdata_fixtures`: skewed users, PII,
histories, legacy spellings, previews), built once. Per repeat, interleaved so that noise hits every method
alike, each into a fresh MongoDB database on the same server:
  runbook    what the runbook's script does: one process reads `user_data` in batches of 1,000, maps each
             document (the same mapping), `insert_many` into the two collections; no keys, no deletes, no checks;
  ceiling    the server's own ceiling for writing the same two collections: the mapped documents, built and
             BSON-encoded before the clock starts, `insert_many` (unordered, 1,000 per call) from 2 processes;
             no reading, no mapping;
  shuttle-1  `start_run` → report in the ledger, 1 local worker process (keyed upserts, deletes of gone
             documents, indexes built after the load, counts, the runbook's history check and a sample of
             50 compared field by field, all inside the timing);
  shuttle-2  the same with 2 worker processes;
  rollback   `shuttle rollback` of that shuttle-2 run, 2 workers, into a fresh collection, with `--verify`
             (each rebuilt document compared with its original before it is written).
Rates are source documents per wall second. The section goes to RESULTS.md (`--results`).

MongoDB: nx-27017 started here on a free port (tests/mongo_server.NxServer), or the real server at
SHUTTLE_TEST_MONGO_URI. Own places only: PostgreSQL database `shuttle_udbench_<pid>_ledger`, Redis DB 7
(`--redis-db`) with queue `shuttle-udbench-<pid>`, MongoDB databases `udbench_<pid>_*`; all dropped at the end.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import bson  # noqa: E402
import pymongo  # noqa: E402
import redis  # noqa: E402
from bson.raw_bson import RawBSONDocument  # noqa: E402

from common.connectors.postgres import create_database  # noqa: E402
from common.ledger import Ledger  # noqa: E402
from common.migrations.base import Selection  # noqa: E402
from common.migrations.userdata_fixtures import build_source  # noqa: E402
from common.migrations.userdata_mapping import BadDocument, split  # noqa: E402
from common.settings import Settings, load_settings  # noqa: E402
from producer import commands  # noqa: E402
from producer.local_workers import LocalWorkers  # noqa: E402
from producer.rollback import start_rollback  # noqa: E402
from tests.mongo_server import REAL_MONGO_URI, NxServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import db, log, machine, spread, wait_report  # noqa: E402

PG = "postgresql://postgres@127.0.0.1:5432"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
METHODS = ("runbook", "ceiling", "shuttle-1", "shuttle-2", "rollback")
BATCH = 1_000
RUNBOOK_RATE = 100  # documents per second, the runbook's own estimate


def runbook_way(source_uri: str, target_uri: str) -> dict[str, Any]:
    """One process: read batches of 1,000, map, `insert_many` into both collections."""
    client = pymongo.MongoClient(source_uri)
    source = client.get_default_database()["user_data"]
    target = pymongo.MongoClient(target_uri).get_default_database()
    started = time.monotonic()
    metadata, configs, read = [], [], 0
    for doc in source.find().batch_size(BATCH):
        read += 1
        try:
            m, c = split(doc)
        except BadDocument:
            continue
        metadata.append(m)
        configs.append(c)
        if len(metadata) >= BATCH:
            target["dataset_metadata"].insert_many(metadata, ordered=False)
            target["transformation_configs"].insert_many(configs, ordered=False)
            metadata, configs = [], []
    if metadata:
        target["dataset_metadata"].insert_many(metadata, ordered=False)
        target["transformation_configs"].insert_many(configs, ordered=False)
    return {"seconds": time.monotonic() - started, "read": read}


def prebuild(source_uri: str) -> Path:
    """The two collections' documents, mapped and BSON-encoded once, in a file the ceiling's writers load."""
    source = pymongo.MongoClient(source_uri).get_default_database()["user_data"]
    batches: list[tuple[str, list[bytes]]] = []
    metadata, configs = [], []
    for doc in source.find().batch_size(BATCH):
        try:
            m, c = split(doc)
        except BadDocument:
            continue
        metadata.append(bson.encode(m))
        configs.append(bson.encode(c))
        if len(metadata) >= BATCH:
            batches += [("dataset_metadata", metadata), ("transformation_configs", configs)]
            metadata, configs = [], []
    if metadata:
        batches += [("dataset_metadata", metadata), ("transformation_configs", configs)]
    path = Path(tempfile.mkstemp(prefix="udbench_", suffix=".pickle")[1])
    path.write_bytes(pickle.dumps(batches))
    return path


def _ceiling_writer(uri: str, prebuilt: str, share: int, processes: int, ready, go, done) -> None:
    mine = [(c, [RawBSONDocument(raw) for raw in docs])
            for c, docs in pickle.loads(Path(prebuilt).read_bytes())[share::processes]]
    client = pymongo.MongoClient(uri)
    target = client.get_default_database()
    client.admin.command("ping")
    ready.wait()
    go.wait()
    for collection, docs in mine:
        target[collection].insert_many(docs, ordered=False)
    done.wait()
    client.close()


def ceiling(target_uri: str, prebuilt: Path, processes: int = 2) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    ready, go, done = (context.Barrier(processes + 1) for _ in range(3))
    writers = [context.Process(target=_ceiling_writer, args=(target_uri, str(prebuilt), i, processes, ready, go, done))
               for i in range(processes)]
    for w in writers:
        w.start()
    ready.wait()
    started = time.monotonic()
    go.wait()
    done.wait()
    seconds = time.monotonic() - started
    for w in writers:
        w.join()
        if w.exitcode:
            raise RuntimeError(f"a ceiling writer exited with {w.exitcode}")
    return {"seconds": seconds}


def shuttle(settings: Settings, ledger: Ledger, workers: int, source_uri: str, target_uri: str, chunk_rows: int,
            log_dir: Path) -> dict[str, Any]:
    with LocalWorkers(settings, workers, name=f"udbench{workers}", log_dir=log_dir):
        started = time.monotonic()
        run = commands.start_run(settings, "userdata-split", Selection(), chunk_rows, None,
                                 source_url=source_uri, target_url=target_uri)
        report = wait_report(ledger, run.run_id, timeout=6 * 3600)
    return {"seconds": time.monotonic() - started, "run_id": run.run_id, "chunks": run.chunk_count,
            "verdict": report["verdict"], "written": report["totals"]["rows_written"]}


def rollback(settings: Settings, ledger: Ledger, split_run: str, into: str, chunk_rows: int,
             log_dir: Path) -> dict[str, Any]:
    with LocalWorkers(settings, 2, name="udbenchrb", log_dir=log_dir):
        started = time.monotonic()
        run = start_rollback(settings, split_run, into, True, chunk_rows)
        report = wait_report(ledger, run.run_id, timeout=6 * 3600)
    return {"seconds": time.monotonic() - started, "verdict": report["verdict"],
            "written": report["totals"]["rows_written"]}


def render(args, server: str, docs: int, results: dict[str, list[dict[str, Any]]], load: list[float],
           chunk_rows: int) -> str:
    rate = {k: [docs / r["seconds"] for r in v] for k, v in results.items() if v}
    med = {k: spread(v)[1] for k, v in rate.items()}
    facts = machine()
    lines = [f"## userdata-split: {docs:,} documents, {args.repeats} repeat(s) "
             f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
             f"- machine: {facts['nproc']} cores ({facts['cpu']}), {facts['memory']}; {facts['python']}; "
             f"shared with other work at the time (load average {load[0]:.1f} before, {load[-1]:.1f} after)",
             f"- MongoDB: {server}; source and targets on that one server process",
             f"- dataset: `userdata_fixtures.build_source` ({docs:,} documents, {args.users} users of skewed sizes, "
             f"with bad documents; ~{args.preview_kb:g} KB previews)",
             f"- command: `.venv/bin/python ops/bench/bench_userdata_split.py --docs {args.docs} "
             f"--repeats {args.repeats} --users {args.users}"
             + (f" --chunk-rows {args.chunk_rows}" if args.chunk_rows else "") + f"`; chunk rows {chunk_rows:,}", "",
             "| method | documents/s min | median | max |", "|---|---|---|---|"]
    for label in METHODS:
        if label in rate:
            lo, mid, hi = spread(rate[label])
            lines.append(f"| {label} | {lo:,.0f} | {mid:,.0f} | {hi:,.0f} |")
    lines.append("")
    if {"shuttle-2", "runbook", "ceiling", "rollback"} <= set(med):
        s2 = med["shuttle-2"]
        lines += [
            "| target | figure (medians) | met |", "|---|---|---|",
            f"| 2 workers ≥ 20× the runbook's {RUNBOOK_RATE} documents/s | {s2 / RUNBOOK_RATE:.1f}× "
            f"| {'yes' if s2 >= 20 * RUNBOOK_RATE else 'no'} |",
            f"| 2 workers beat the runbook's way | {s2 / med['runbook']:.2f}× "
            f"| {'yes' if s2 > med['runbook'] else 'no'} |",
            f"| 2 workers ≥ 60% of the server's ceiling | {100 * s2 / med['ceiling']:.0f}% "
            f"| {'yes' if s2 >= 0.6 * med['ceiling'] else 'no'} |",
            f"| rollback at least as fast as the split | {med['rollback'] / s2:.2f}× "
            f"| {'yes' if med['rollback'] >= s2 else 'no'} |", ""]
    verdicts = {r.get("verdict") for v in results.values() for r in v if "verdict" in r}
    lines.append(f"Every Shuttle run's verdict: {', '.join(sorted(verdicts))}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=200_000, help="user_data documents (default 200,000)")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--preview-kb", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-rows", type=int, default=None, help="default: docs / 40, at least 1,000")
    parser.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    parser.add_argument("--redis-db", type=int, default=int(os.environ.get("SHUTTLE_TEST_REDIS_DB", "7")))
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to append the section to")
    parser.add_argument("--log-dir", type=Path, default=Path(f"/tmp/shuttle-udbench-{os.getpid()}"))
    args = parser.parse_args()
    pid = os.getpid()
    ledger_url = f"{PG}/shuttle_udbench_{pid}_ledger"
    broker = f"redis://127.0.0.1:6379/{args.redis_db}"
    queue = f"shuttle-udbench-{pid}"
    settings = load_settings(ledger_url=ledger_url, broker_url=broker, result_backend=broker, queue=queue)
    chunk_rows = args.chunk_rows or max(1_000, args.docs // 40)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    server = None
    if REAL_MONGO_URI:
        mongo_uri, server_text = REAL_MONGO_URI.rstrip("/"), "real server at SHUTTLE_TEST_MONGO_URI"
    else:
        import importlib.metadata as md

        server = NxServer().start()
        mongo_uri = server.uri
        server_text = f"nx-27017 {md.version('nx-27017')} (MongoDB wire protocol on SQLite), started here"
    mongo = pymongo.MongoClient(mongo_uri)
    source_uri = f"{mongo_uri}/udbench_{pid}_src"
    prebuilt = None
    try:
        log(f"building {source_uri}: {args.docs:,} user_data documents …")
        t = time.monotonic()
        data = build_source(mongo[f"udbench_{pid}_src"], args.docs, users=args.users, bad=True,
                            preview_kb=args.preview_kb)
        docs = data.total
        # The application reads its datasets by user, so its collection has this index (a source Shuttle reads
        # by user without one is scanned once per chunk, on any server).
        mongo[f"udbench_{pid}_src"]["user_data"].create_index([("user_id", 1)])
        log(f"  {docs:,} documents in {time.monotonic() - t:.1f}s (with an index on user_id)")
        create_database(ledger_url)
        ledger = Ledger(ledger_url)
        ledger.ensure_schema()
        methods = args.methods.split(",")
        if "ceiling" in methods:
            prebuilt = prebuild(source_uri)
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in methods}
        load = [os.getloadavg()[0]]
        for repeat in range(1, args.repeats + 1):
            log(f"repeat {repeat}/{args.repeats}")
            split_run = None
            for label in methods:
                name = f"udbench_{pid}_{label.replace('-', '')}_r{repeat}"
                target = f"{mongo_uri}/{name}"
                if label == "runbook":
                    result = runbook_way(source_uri, target)
                elif label == "ceiling":
                    result = ceiling(target, prebuilt)
                elif label == "rollback":
                    if split_run is None:
                        continue
                    result = rollback(settings, ledger, split_run, f"restored_r{repeat}", chunk_rows, args.log_dir)
                    mongo[f"udbench_{pid}_src"].drop_collection(f"restored_r{repeat}")
                else:
                    result = shuttle(settings, ledger, int(label[-1]), source_uri, target, chunk_rows, args.log_dir)
                    split_run = result["run_id"] if label == "shuttle-2" else split_run
                results[label].append(result)
                log(f"  {label}: {result['seconds']:.1f}s, {docs / result['seconds']:,.0f} documents/s "
                    + " ".join(f"{k}={v}" for k, v in result.items() if k != "seconds"))
                if label != "shuttle-2":
                    mongo.drop_database(name)
            for name in mongo.list_database_names():
                if name.startswith(f"udbench_{pid}_shuttle2"):
                    mongo.drop_database(name)
        load.append(os.getloadavg()[0])
        ledger.dispose()
        section = render(args, server_text, docs, results, load, chunk_rows)
        print("\n" + section)
        if set(methods) == set(METHODS):
            with args.results.open("a") as out:
                out.write("\n" + section)
            log(f"appended to {args.results}")
    finally:
        if prebuilt is not None:
            prebuilt.unlink(missing_ok=True)
        for name in mongo.list_database_names():
            if name.startswith(f"udbench_{pid}_"):
                mongo.drop_database(name)
        mongo.close()
        if server is not None:
            server.cleanup()
        redis.Redis.from_url(broker).delete(queue)
        with db(f"{PG}/postgres") as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "shuttle_udbench_{pid}_ledger" WITH (FORCE)')


if __name__ == "__main__":
    main()
