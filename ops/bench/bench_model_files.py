#!/usr/bin/env python
"""Benchmark of `model-files` against the reference script's way and the COPY ceiling, on the same files.

    .venv/bin/python ops/bench/bench_model_files.py --repeats 1 --small-files 300 --mixed-files 30   # quick try
    .venv/bin/python ops/bench/bench_model_files.py --repeats 3                                      # the figures

Two trees of real joblib files (a dict holding random bytes: incompressible, so the sizes are what
disk and database carry), built once under --tree-dir and reused:
  small  2,000 files of 1–100 KB (uniform) over 40 names;
  mixed  200 files of 1 KB–20 MB over 20 names, sizes log-uniform (many small files, a few large ones).
Per tree and repeat, interleaved so noise hits every method alike, each into an emptied target:
  seed       the reference script's way: one process, files one at a time in path order, each read whole,
             `SELECT max(version)` for its name, one `INSERT`, one commit (it also unpickled and pickled
             each model again, which is skipped here: that only makes it faster), into the `models` table
             as Shuttle creates it (bytea lz4-compressed), so the comparison is of the loop alone;
  seed-pglz  (information) the same loop into the reference document's own table, as its SQL creates it
             (PostgreSQL's default pglz compression, which costs most of that loop's time);
  ceiling    one binary `COPY` of the same bytes (path, bytes) into a bare table, one transaction, its bytea
             lz4-compressed as Shuttle creates `models` (so the reference script's way gets lz4 too);
  ceiling-pglz  (information) the same into a bare table with PostgreSQL's default compression, pglz;
  shuttle-1  `start_run` → report in the ledger, 1 local worker process (worker start-up not timed);
  shuttle-2  the same with 2 worker processes;
then once per tree a re-run over the filled table (2 workers), whose report must show 0 rows written.
Files/s and MB/s (10^6 bytes) are over wall seconds. Worker memory is the peak RSS (VmHWM) of the
largest process of each worker, read before it stops.

Uses only its own places: target database `shuttle_mf_bench`, ledger `shuttle_mf_bench_ledger`, Redis DB
--redis-db with a queue of its own; both databases are dropped at the end unless --keep, and the queue's
keys and the `model-files` task results in that Redis DB are deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import redis  # noqa: E402

from common.connectors.postgres import create_database  # noqa: E402
from common.ledger import Ledger  # noqa: E402
from common.migrations.base import Selection  # noqa: E402
from common.migrations.model_files_fixtures import build_sized_tree  # noqa: E402
from common.model_store import ensure_table  # noqa: E402
from common.settings import Settings, load_settings  # noqa: E402
from producer import commands  # noqa: E402
from producer.local_workers import LocalWorkers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import db, log, machine, process_group_memory, spread, wait_report  # noqa: E402

PG = "postgresql://postgres@127.0.0.1:5432"
TARGET = f"{PG}/shuttle_mf_bench"
LEDGER = f"{PG}/shuttle_mf_bench_ledger"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
METHODS = ("seed", "seed-pglz", "ceiling", "ceiling-pglz", "shuttle-1", "shuttle-2")
# The reference document's own table, as its SQL creates it (PostgreSQL's default compression, pglz).
SEED_TABLE = """CREATE TABLE models (id SERIAL PRIMARY KEY, name VARCHAR(255) NOT NULL, version INTEGER NOT NULL,
    model_type VARCHAR(50) NOT NULL, event VARCHAR(255) NOT NULL, model_binary BYTEA NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, is_active BOOLEAN DEFAULT TRUE, UNIQUE(name, version))"""
LABELS = {"seed": "the reference script's way: 1 process, 1 file at a time, `INSERT` + commit each, into "
                  "Shuttle's `models` (lz4)",
          "seed-pglz": "(information) the same loop into the reference document's own table (default pglz)",
          "ceiling": "ceiling: one binary `COPY` of the same bytes into a bare table (bytea lz4-compressed, as `models`)",
          "ceiling-pglz": "(information) the same COPY into a bare table with PostgreSQL's default pglz",
          "shuttle-1": "Shuttle, 1 worker process", "shuttle-2": "Shuttle, 2 worker processes",
          "rerun": "Shuttle re-run, 2 workers, table already filled"}


def build(tree_dir: Path, label: str, files: int, min_bytes: int, max_bytes: int, names: int,
          log_uniform: bool) -> list[Path]:
    """The tree, built once: a marker file records how, so a different request rebuilds it."""
    root = tree_dir / label
    spec = json.dumps([files, min_bytes, max_bytes, names, log_uniform])
    marker = tree_dir / f"{label}.spec"
    if not (marker.exists() and marker.read_text() == spec):
        subprocess.run(["rm", "-rf", str(root)], check=True)
        log(f"building tree {label}: {files} files of {min_bytes:,}–{max_bytes:,} bytes over {names} names")
        build_sized_tree(root, files, min_bytes, max_bytes, names, log_uniform=log_uniform)
        marker.write_text(spec)
    return sorted(root.iterdir())


def reset_target() -> None:
    with db(TARGET) as conn:
        conn.execute("DROP TABLE IF EXISTS models, bench_ceiling")
    subprocess.run(["sync"], check=False)


def seed_way(paths: list[Path], own_table: bool = False) -> dict[str, Any]:
    """One file at a time: read, next version of its name, INSERT, commit (the reference script's loop),
    into the table Shuttle creates, or into the reference document's own (`own_table`)."""
    with psycopg.connect(TARGET) as conn:
        if own_table:
            conn.execute(SEED_TABLE)
        else:
            ensure_table(conn)
        conn.commit()
        started = time.monotonic()
        for path in paths:
            name, event, model_type = path.name.rsplit(".", 1)[0].split("__")
            data = path.read_bytes()
            top = conn.execute("SELECT max(version) FROM models WHERE name = %s", (name,)).fetchone()[0] or 0
            conn.execute("INSERT INTO models (name, version, model_type, event, model_binary) VALUES (%s, %s, %s, %s, %s)",
                         (name, top + 1, model_type, event, data))
            conn.commit()
        return {"seconds": time.monotonic() - started}


def ceiling(paths: list[Path], compression: str = "lz4") -> dict[str, Any]:
    """The same bytes in one binary COPY into a table with no key, no index, no hash: the ceiling. Its
    bytea column compresses as `models`' does (lz4), so the difference is Shuttle's own work."""
    with psycopg.connect(TARGET) as conn:
        conn.execute(f"CREATE TABLE bench_ceiling (path text, data bytea COMPRESSION {compression})")
        conn.commit()
        started = time.monotonic()
        with conn.cursor() as cur, cur.copy("COPY bench_ceiling (path, data) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["text", "bytea"])
            for path in paths:
                copy.write_row((str(path), path.read_bytes()))
        conn.commit()
        return {"seconds": time.monotonic() - started}


def shuttle(settings: Settings, ledger: Ledger, workers: int, root: Path, log_dir: Path, label: str) -> dict[str, Any]:
    redis.Redis.from_url(settings.broker_url).delete(settings.queue)
    with LocalWorkers(settings, workers, name=f"benchmf{label}", log_dir=log_dir) as pool:
        started = time.monotonic()
        run = commands.start_run(settings, "model-files", Selection(), 1000, None, source_url=f"file://{root}",
                                 target_url=TARGET)
        planned = time.monotonic()
        report = wait_report(ledger, run.run_id)
        seconds = time.monotonic() - started
        memory = [process_group_memory(p.pid) for p in pool.processes]
    totals = report["totals"]
    if report["verdict"] != "clean":
        raise SystemExit(f"run {run.run_id} ended {report['verdict']}: {report['verdict_reason']}")
    return {"seconds": seconds, "plan_s": planned - started, "run_id": run.run_id, "chunks": run.chunk_count, "rows_read": totals["rows_read"],
            "written": totals["rows_written"], "chunk_wall_s": report["timing"].get("wall_seconds"),
            "worker_hwm_kb": [max((p["hwm_kb"] for p in group), default=0) for group in memory]}


def forget_broker_keys(settings: Settings) -> None:
    """Its queue's bindings and its runs' task results: Redis DB --redis-db may be shared."""
    client = redis.Redis.from_url(settings.broker_url)
    for pattern in (f"_kombu.binding*.{settings.queue}", "celery-task-meta-model-files-*"):
        for key in client.scan_iter(pattern, count=1000):
            client.delete(key)
    client.delete(settings.queue)


def check_same(paths: list[Path]) -> None:
    """Shuttle's table holds every file once, with its hash (the figures are only worth it if so)."""
    with db(TARGET) as conn:
        n, bad = conn.execute("SELECT count(*), count(*) FILTER (WHERE content_hash <> encode(sha256(model_binary),"
                              " 'hex')) FROM models").fetchone()
    if n != len(paths) or bad:
        raise SystemExit(f"Shuttle stored {n} versions ({bad} with a wrong hash) for {len(paths)} files")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trees", default="small,mixed")
    parser.add_argument("--small-files", type=int, default=2000)
    parser.add_argument("--mixed-files", type=int, default=200)
    parser.add_argument("--mixed-max-mb", type=float, default=20)
    parser.add_argument("--tree-dir", type=Path, default=Path("/tmp/shuttle-bench-model-files"))
    parser.add_argument("--redis-db", type=int, default=int(os.environ.get("SHUTTLE_BENCH_REDIS_DB", "5")))
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to append the section to")
    parser.add_argument("--keep", action="store_true", help="keep the bench databases")
    args = parser.parse_args()

    create_database(TARGET)
    create_database(LEDGER)
    ledger = Ledger(LEDGER)
    ledger.ensure_schema()
    settings = load_settings(ledger_url=LEDGER, broker_url=f"redis://127.0.0.1:6379/{args.redis_db}",
                             source_url=None, target_url=TARGET, queue=f"shuttle-bench-mf-{os.getpid()}")
    log_dir = Path(f"/tmp/shuttle-bench-logs/{os.getpid()}")
    log_dir.mkdir(parents=True, exist_ok=True)
    trees = {"small": (args.small_files, 1_000, 100_000, 40, False),
             "mixed": (args.mixed_files, 1_000, int(args.mixed_max_mb * 1_000_000), 20, True)}
    began = datetime.now(timezone.utc)
    out: dict[str, Any] = {}
    try:
        for label in args.trees.split(","):
            paths = build(args.tree_dir, label, *trees[label])
            size = sum(p.stat().st_size for p in paths)
            results: dict[str, list[dict[str, Any]]] = {m: [] for m in (*METHODS, "rerun")}
            for repeat in range(args.repeats):
                for method in METHODS:
                    reset_target()
                    if method.startswith("seed"):
                        result = seed_way(paths, own_table=method == "seed-pglz")
                    elif method.startswith("ceiling"):
                        result = ceiling(paths, "pglz" if method == "ceiling-pglz" else "lz4")
                    else:
                        result = shuttle(settings, ledger, int(method[-1]), args.tree_dir / label, log_dir, method)
                        check_same(paths)
                    results[method].append(result)
                    log(f"{label} #{repeat + 1} {method}: {result['seconds']:.2f}s, {len(paths) / result['seconds']:,.0f} "
                        f"files/s, {size / 1e6 / result['seconds']:,.1f} MB/s")
            result = shuttle(settings, ledger, 2, args.tree_dir / label, log_dir, "rerun")
            if result["written"]:
                raise SystemExit(f"the re-run wrote {result['written']} rows; it must write none")
            results["rerun"].append(result)
            log(f"{label} rerun: {result['seconds']:.2f}s")
            out[label] = {"files": len(paths), "bytes": size, "largest": max(p.stat().st_size for p in paths),
                          "results": results}
    finally:
        ledger.dispose()
        forget_broker_keys(settings)
        if not args.keep:
            with db(f"{PG}/postgres") as conn:
                for name in ("shuttle_mf_bench", "shuttle_mf_bench_ledger"):
                    conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    section = render(args, began, out)
    print(section)
    with args.results.open("a") as f:
        f.write("\n" + section)
    log(f"appended to {args.results}")


def render(args: argparse.Namespace, began: datetime, out: dict[str, Any]) -> str:
    info = machine()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [f"## `model-files` ({began:%Y-%m-%d %H:%M} UTC)", "",
             f"Command: `.venv/bin/python ops/bench/bench_model_files.py --repeats {args.repeats} --small-files "
             f"{args.small_files} --mixed-files {args.mixed_files} --mixed-max-mb {args.mixed_max_mb:g}` "
             f"(commit {commit})", "",
             f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']}; {info['postgres']}; {info['python']}. "
             "Files in the page cache (each tree is read once before it is timed, by the first method). "
             "Shared with other work while measured, so single figures are noisy: read the medians.", ""]
    verdicts = []
    for label, tree in out.items():
        files, size, results = tree["files"], tree["bytes"], tree["results"]
        lines += [f"### tree `{label}`: {files:,} files, {size / 1e6:,.1f} MB, largest {tree['largest'] / 1e6:.2f} MB",
                  "", "| method | files/s median | min | max | MB/s median | min | max | seconds median | note |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for method, runs in results.items():
            if not runs:
                continue
            secs = [r["seconds"] for r in runs]
            fps, mbs = spread([files / s for s in secs]), spread([size / 1e6 / s for s in secs])
            note = ""
            if method.startswith("shuttle") or method == "rerun":
                hwm = max(max(r["worker_hwm_kb"]) for r in runs) / 1024
                plan = statistics.median(r["plan_s"] for r in runs)
                wall = statistics.median(r["chunk_wall_s"] or 0 for r in runs)
                note = f"{runs[0]['chunks']} chunks; plan {plan:.2f}s, first chunk start to last end {wall:.2f}s; " \
                       f"rows written {', '.join(str(r['written']) for r in runs)}; worker peak RSS {hwm:.0f} MiB"
            lines.append(f"| {LABELS[method]} | {fps[1]:,.0f} | {fps[0]:,.0f} | {fps[2]:,.0f} | {mbs[1]:,.1f} | "
                         f"{mbs[0]:,.1f} | {mbs[2]:,.1f} | {statistics.median(secs):.2f} | {note} |")
        med = {m: statistics.median(r["seconds"] for r in runs) for m, runs in results.items() if runs}
        over_seed, over_ceiling = med["seed"] / med["shuttle-2"], med["ceiling"] / med["shuttle-2"]
        lines += ["", f"- Shuttle-2 / the reference script's way: **{over_seed:.2f}×** (files/s and MB/s alike: same files); "
                      f"Shuttle-1: {med['seed'] / med['shuttle-1']:.2f}×",
                  f"- Shuttle-2 / COPY ceiling (lz4): **{over_ceiling:.0%}**; / the pglz bare table: "
                  f"{med['ceiling-pglz'] / med['shuttle-2']:.0%}",
                  f"- (information) Shuttle-2 / that loop into the reference document's own pglz table: "
                  f"{med['seed-pglz'] / med['shuttle-2']:.2f}×", ""]
        if label == "small":
            verdicts.append(f"small tree, 2 workers ≥ 5× the reference script's way in files/s: "
                            f"{'met' if over_seed >= 5 else 'NOT met'} ({over_seed:.2f}×)")
        if label == "mixed":
            verdicts.append(f"mixed tree, 2 workers ≥ 1.5× the reference script's way in MB/s: "
                            f"{'met' if over_seed >= 1.5 else 'NOT met'} ({over_seed:.2f}×)")
        verdicts.append(f"{label} tree, 2 workers ≥ 50% of the COPY ceiling: "
                        f"{'met' if over_ceiling >= 0.5 else 'NOT met'} ({over_ceiling:.0%})")
    if len(out) == 2:
        small, mixed = (max(max(r["worker_hwm_kb"]) for r in out[t]["results"]["shuttle-2"]) / 1024
                        for t in ("small", "mixed"))
        verdicts.append(f"worker peak RSS: {small:.0f} MiB on the small tree ({out['small']['bytes'] / 1e6:.0f} MB, "
                        f"largest file {out['small']['largest'] / 1e6:.2f} MB), {mixed:.0f} MiB on the mixed tree "
                        f"({out['mixed']['bytes'] / 1e6:.0f} MB, largest {out['mixed']['largest'] / 1e6:.1f} MB)")
    lines += ["Targets:", ""] + [f"- {v}" for v in verdicts]
    data = {label: {m: [round(r["seconds"], 3) for r in runs] for m, runs in t["results"].items()}
            for label, t in out.items()}
    lines += ["", f"<!-- data: {json.dumps(data)} -->", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
