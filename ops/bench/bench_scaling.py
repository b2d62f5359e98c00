#!/usr/bin/env python
"""Scaling figure of the `modmon` migration: the same run with 1, 2 and 4 worker processes.

    flock /tmp/shuttle-bench.lock .venv/bin/python ops/bench/bench_scaling.py --rows 2000000 --repeats 3
    flock /tmp/shuttle-bench.lock .venv/bin/python ops/bench/bench_scaling.py --rows 20000 --repeats 1  # try

Per repeat, interleaved so that noise from other work on the machine hits every row alike:
  ceiling    the in-database aggregation `bench_modmon.py` measures against (two INSERT … SELECT …
             GROUP BY statements, `modmon_reference.py`);
  shuttle-N  `start_run` → report in the ledger with N local worker processes, into empty targets;
  hosts-2x2  2 network-namespace "hosts" × 2 workers, when `ops/netns_hosts.py` is there (see --hosts).
Rows/s are source rows per wall second; speed-up is against the median of 1 worker, efficiency is
speed-up ÷ workers, and each row's ratio to the ceiling is taken per repeat (same moment, same data).

The source, ledger, broker and the run itself are `bench_modmon.py`'s (reused, not copied): database
`shuttle_bench`, ledger `shuttle_bench_ledger`, Redis DB 9 flushed before each run. The per-chunk costs
the paper model in ops/SCALING.md starts from are measured by `chunk_costs.py` (`--costs`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import psycopg  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from bench_modmon import (DEFAULT_BROKER, DEFAULT_DB, DEFAULT_LEDGER, ROOT, compare_with_reference,  # noqa: E402
                          engine_version, exclusive, flush_broker, prepare_source, reset_ledger, shuttle_run,
                          truncate_targets)
from benchlib import log, machine, process_group_memory, spread, wait_report  # noqa: E402
from modmon_reference import prepare_reference, run_reference  # noqa: E402

from common.connectors.postgres import create_database  # noqa: E402
from common.ledger import Ledger  # noqa: E402
from common.ledger_schema import chunks  # noqa: E402
from common.migrations.base import Selection  # noqa: E402
from producer import commands  # noqa: E402
from common.settings import Settings, load_settings  # noqa: E402

RESULTS = HERE / "RESULTS.md"
SECTION = "scaling"
COSTS_SECTION = "chunk_costs"
PHASE_NAMES = ("fingerprint", "skip check", "read", "transform", "write")
NETNS_HOSTS = ROOT / "ops" / "netns_hosts.py"


# -- one measured row ----------------------------------------------------------------------------

def ceiling_once(url: str) -> dict[str, Any]:
    result = run_reference(url)
    return {"seconds": result["seconds"], "detail": f"predictions {result['predictions_s']:.1f}s + "
                                                     f"features {result['features_s']:.1f}s"}


def shuttle_once(settings: Settings, ledger: Ledger, workers: int, args: argparse.Namespace, repeat: int
                 ) -> dict[str, Any]:
    res = shuttle_run(settings, ledger, workers, args.chunk_rows, True, args.log_dir / f"r{repeat}-w{workers}",
                      f"w{workers}", max(900.0, args.rows / 500))
    if res["verdict"] != "clean" or res["rows_read"] != args.rows:
        raise RuntimeError(f"{workers} workers, repeat {repeat}: verdict {res['verdict']}, "
                           f"read {res['rows_read']:,} of {args.rows:,} rows")
    return res


# -- the table -----------------------------------------------------------------------------------

def row_label(key: str) -> str:
    if key == "ceiling":
        return "ceiling: 2 in-database `INSERT … SELECT … GROUP BY` statements (1 backend)"
    if key.startswith("hosts-"):
        hosts, per_host = key.removeprefix("hosts-").split("x")
        return f"Shuttle, {hosts} hosts (network namespaces) × {per_host} worker processes"
    workers = int(key.removeprefix("shuttle-"))
    return f"Shuttle, {workers} worker process{'es' if workers > 1 else ''}"


def workers_of(key: str) -> int | None:
    if key.startswith("shuttle-"):
        return int(key.removeprefix("shuttle-"))
    if key.startswith("hosts-"):
        hosts, per_host = key.removeprefix("hosts-").split("x")
        return int(hosts) * int(per_host)
    return None


def render(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], load: tuple[str, str],
           hosts_note: str, comparison: str) -> tuple[list[str], dict[str, Any]]:
    rows = args.rows
    ceiling = results["ceiling"]
    one = statistics.median(rows / r["seconds"] for r in results["shuttle-1"])
    info = machine()
    started = args.started
    body = [f"## Scaling: `modmon` with 1, 2 and 4 workers ({started:%Y-%m-%d %H:%M} UTC)", "",
            f"Command: `flock /tmp/shuttle-bench.lock .venv/bin/python ops/bench/bench_scaling.py "
            f"{' '.join(sys.argv[1:])}` (engine at commit {engine_version()})", "",
            f"Machine: **{os.cpu_count()} cores** (`os.cpu_count()`; {info['cpu']}), {info['memory']}; "
            f"{info['postgres']}; {info['python']}. Source, target, ledger, broker (Redis) and every worker on this "
            f"one machine. **Shared with other work while measured** (other sessions developing and testing): load "
            f"average (1 min) {load[0]} before, {load[1]} after.", "",
            f"Dataset: `build_source(rows={rows:,}, deployments=30, malformed=False)` as in `bench_modmon.py`; "
            f"chunk_rows {args.chunk_rows:,}. Repeats: {args.repeats}, rows interleaved in each repeat in the "
            f"order of the table. Shuttle is timed from `start_run` to the report in the ledger (planning, "
            f"enqueueing, every chunk, the coordinator's verification); worker start-up is not timed. Each worker "
            f"process is one Celery worker with one pool process. Speed-up: rows/s median ÷ the 1-worker median; "
            f"efficiency: speed-up ÷ workers. Ratio to the ceiling: per repeat, ceiling seconds ÷ Shuttle seconds "
            f"(median, min–max).", "",
            "| run | workers | rows/s median | min | max | seconds median (min–max) | speed-up | efficiency "
            "| ratio to ceiling (min–max) | note |",
            "|---|---:|---:|---:|---:|---|---:|---:|---|---|"]
    data: dict[str, Any] = {"rows": rows, "repeats": args.repeats, "cores": os.cpu_count(), "seconds": {},
                            "speedup": {}, "efficiency": {}, "ratio_to_ceiling": {}}
    for key, runs in results.items():
        seconds = [r["seconds"] for r in runs]
        rates = [rows / s for s in seconds]
        low, mid, high = spread(rates)
        s_low, s_mid, s_high = spread(seconds)
        data["seconds"][key] = seconds
        workers = workers_of(key)
        if workers is None:
            body.append(f"| {row_label(key)} | — | {mid:,.0f} | {low:,.0f} | {high:,.0f} | {s_mid:.1f} "
                        f"({s_low:.1f}–{s_high:.1f}) | | | 1 | {runs[0]['detail']} |")
            continue
        speedup = mid / one
        ratios = [c["seconds"] / r["seconds"] for c, r in zip(ceiling, runs)]
        r_low, r_mid, r_high = spread(ratios)
        data["speedup"][key], data["efficiency"][key] = speedup, speedup / workers
        data["ratio_to_ceiling"][key] = ratios
        busy = statistics.median(sum(r["chunk_s"]) for r in runs)
        note = (f"{runs[0]['chunks']} chunks; plan {statistics.median(r['plan_s'] for r in runs):.1f}s; chunk time "
                f"summed {busy:.1f}s; peak RSS {max(max(r['worker_hwm_kb']) for r in runs) / 1024:.0f} MiB")
        if "split" in runs[0]:
            note += "; chunks per host " + ", ".join(" / ".join(str(n) for n in r["split"].values()) for r in runs)
        body.append(f"| {row_label(key)} | {workers} | {mid:,.0f} | {low:,.0f} | {high:,.0f} | {s_mid:.1f} "
                    f"({s_low:.1f}–{s_high:.1f}) | {speedup:.2f}× | {speedup / workers:.0%} | "
                    f"{r_mid:.2f} ({r_low:.2f}–{r_high:.2f}) | {note} |")
    body += ["", f"- {comparison}", f"- 2 hosts × 2 workers: {hosts_note}"]
    return body, data


def write_section(path: Path, body: list[str], data: dict[str, Any], name: str = SECTION) -> None:
    """Replace this benchmark's section of RESULTS.md, or append it; the rest of the file is left as it is."""
    text = path.read_text() if path.exists() else ""
    block = (f"<!-- section:{name} -->\n" + "\n".join(body) + f"\n\n<!-- data: {json.dumps(data)} -->\n"
             f"<!-- /section:{name} -->\n")
    pattern = re.compile(rf"<!-- section:{name} -->\n.*?<!-- /section:{name} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
    log(f"wrote {path}")


# -- 2 hosts × 2 workers -------------------------------------------------------------------------

def load_netns(args: argparse.Namespace) -> tuple[Any | None, str]:
    """The namespace helper of the multi-host work (`ops/netns_hosts.py`), if it is there and usable here."""
    if args.hosts == "off":
        return None, "left out (`--hosts off`)"
    if not args.netns_hosts.exists():
        return None, (f"left out: `{args.netns_hosts}` (the multi-host helper of issue 16) is not in this "
                      "checkout, so this run has no way to start workers on separate network namespaces")
    spec = importlib.util.spec_from_file_location("netns_hosts", args.netns_hosts)
    netns = importlib.util.module_from_spec(spec)
    sys.modules["netns_hosts"] = netns  # dataclasses look their module up there
    spec.loader.exec_module(netns)  # type: ignore[union-attr]
    try:
        netns.check_available()
    except netns.Unavailable as exc:
        return None, f"left out: {exc}"
    return netns, (
        "measured with `ops/netns_hosts.py`: 2 network namespaces, each with its own veth link and hostname, "
        "2 Celery workers in each. The hosts reach PostgreSQL and Redis only through the helper's TCP forwarder, "
        "an asyncio loop in the benchmark process that copies every byte between the links and 127.0.0.1; "
        "on this machine that forwarder shares the same 2 cores, so the row includes its cost, which real "
        "separate hosts do not pay. The producer and the ledger writes go through it too (the run records "
        "the service address)")


def hosts_once(netns: Any, settings: Settings, ledger: Ledger, args: argparse.Namespace, repeat: int
               ) -> dict[str, Any]:
    """A fresh run whose 4 workers live on 2 namespace hosts, 2 each, reaching the services through veth."""
    flush_broker(settings.broker_url)
    truncate_targets(args.url)
    log_dir = args.log_dir / f"r{repeat}-hosts"
    log_dir.mkdir(parents=True, exist_ok=True)
    with netns.NetnsHosts(hosts=2) as net:
        via = net.settings(settings)
        groups = [net.start_workers(host, via, count=2, name="bench", log_dir=log_dir) for host in net.hosts]
        started = time.monotonic()
        run = commands.start_run(via, "modmon", Selection(), args.chunk_rows, None, reenable_drift_tracking=True)
        planned = time.monotonic()
        report = wait_report(ledger, run.run_id, timeout=max(900.0, args.rows / 500))
        ended = time.monotonic()
        memory = [process_group_memory(p.pid) for g in groups for p in g.processes]
        names = {host.name for host in net.hosts}
    with ledger.reading() as conn:
        per_chunk = conn.execute(sa.select(chunks.c.worker, chunks.c.duration_s)
                                 .where(chunks.c.run_id == run.run_id)).all()
    split = Counter(worker.rpartition(":")[0].rpartition("@")[2] for worker, _ in per_chunk)
    totals = report["totals"]
    result = {"seconds": ended - started, "plan_s": planned - started, "chunks": run.chunk_count,
              "verdict": report["verdict"], "rows_read": totals["rows_read"],
              "chunk_s": [d or 0.0 for _, d in per_chunk],
              "worker_hwm_kb": [max((p["hwm_kb"] for p in group), default=0) for group in memory],
              "split": {host: split.get(host, 0) for host in sorted(names)}}
    if result["verdict"] != "clean" or result["rows_read"] != args.rows or not all(result["split"].values()):
        raise RuntimeError(f"2 hosts × 2, repeat {repeat}: verdict {result['verdict']}, read "
                           f"{result['rows_read']:,} rows, chunks per host {result['split']}")
    return result


# -- per-chunk costs -----------------------------------------------------------------------------

def costs(args: argparse.Namespace, settings: Settings) -> None:
    from chunk_costs import broker_costs, ledger_costs, phase_costs

    prepare_source(args.url, args.rows, args.reuse_source)
    load_before = f"{os.getloadavg()[0]:.2f}"
    scratch = args.ledger_url.rsplit("/", 1)[0] + "/shuttle_bench_costs_ledger"
    parts = {
        "phases": ("phases of every chunk, in this process", lambda: phase_costs(args.url, args.chunk_rows,
                                                                                  truncate_targets)),
        "ledger": (f"ledger transactions, synthetic runs of {', '.join(f'{n:,}' for n in args.ledger_chunks)} chunks",
                   lambda: ledger_costs(scratch, args.ledger_chunks, settings, [1, 2, 4, 8], args.cycle_seconds)),
        "broker": ("broker messages and no-op tasks",
                   lambda: broker_costs(settings, scratch, args.messages, args.dispatch_tasks, [1, 2],
                                        args.log_dir / "dispatch")),
        "real_run": ("a real run with 2 workers: Redis commands and CPU per chunk, connections",
                     lambda: real_run_traffic(args, settings)),
    }
    measured: dict[str, Any] = {}
    for name, (what, measure) in parts.items():
        log(what)
        try:  # one part failing must not lose the others' figures
            measured[name] = measure()
        except Exception as exc:  # noqa: BLE001 - recorded in the section as not measured
            log(f"  {name} NOT measured: {type(exc).__name__}: {exc}")
            measured[name] = {"error": f"{type(exc).__name__}: {exc}"}
    body = costs_section(args, measured, (load_before, f"{os.getloadavg()[0]:.2f}"))
    print("\n" + "\n".join(body) + "\n")
    write_section(args.results, body, measured, COSTS_SECTION)


def real_run_traffic(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Redis commands and CPU per chunk of a real fresh run (progress, results, events, heartbeats' absence)."""
    import redis
    from chunk_costs import redis_calls, redis_cpu

    reset_ledger(args.ledger_url)
    ledger = Ledger(args.ledger_url)
    client = redis.Redis.from_url(settings.broker_url)
    sampler = ConnectionSampler(args.url, client, [args.url.rsplit("/", 1)[1], args.ledger_url.rsplit("/", 1)[1]])
    try:
        calls0, cpu0 = redis_calls(client), redis_cpu(client)
        with sampler:
            res = shuttle_run(settings, ledger, 2, args.chunk_rows, True, args.log_dir / "traffic", "traffic",
                              max(900.0, args.rows / 500))
        calls, cpu = redis_calls(client) - calls0, redis_cpu(client) - cpu0
    finally:
        client.close()
        ledger.dispose()
    log(f"  real run: {res['chunks']} chunks in {res['seconds']:.1f}s; Redis {calls / res['chunks']:.0f} commands and "
        f"{cpu / res['chunks'] * 1e3:.1f} ms of CPU per chunk (whole server, worker start-up polls included); "
        f"most connections at once: PostgreSQL {sampler.most_pg}, Redis {sampler.most_redis}")
    return {"chunks": res["chunks"], "seconds": res["seconds"], "calls_per_chunk": calls / res["chunks"],
            "cpu_ms_per_chunk": cpu / res["chunks"] * 1e3, "pg_connections": sampler.most_pg,
            "redis_connections": sampler.most_redis}


class ConnectionSampler:
    """The most connections a run held at once: PostgreSQL by application name, Redis on the broker's DB."""

    def __init__(self, url: str, client: Any, databases: list[str]) -> None:
        self.url, self.client, self.databases = url, client, databases
        self.most_pg: dict[str, int] = {}
        self.most_redis = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _sample(self) -> None:
        db_number = self.client.connection_pool.connection_kwargs.get("db", 0)
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.wait(0.2):
                rows = conn.execute("SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = ANY(%s)"
                                    " AND pid <> pg_backend_pid() GROUP BY 1", (self.databases,)).fetchall()
                for name, n in rows:
                    self.most_pg[name or "?"] = max(self.most_pg.get(name or "?", 0), n)
                clients = self.client.client_list()
                self.most_redis = max(self.most_redis, sum(1 for c in clients if int(c.get("db", -1)) == db_number) - 1)


def costs_section(args: argparse.Namespace, measured: dict[str, Any], load: tuple[str, str]) -> list[str]:
    info = machine()
    phases, ledger, broker, real = (measured[k] for k in ("phases", "ledger", "broker", "real_run"))
    body = [f"## Per-chunk costs: `modmon` ({args.started:%Y-%m-%d %H:%M} UTC)", "",
            f"Command: `flock /tmp/shuttle-bench.lock .venv/bin/python ops/bench/bench_scaling.py "
            f"{' '.join(sys.argv[1:])}` (engine at commit {engine_version()})", "",
            f"Machine: {os.cpu_count()} cores ({info['cpu']}), {info['postgres']}; everything on this one machine, "
            f"shared with other work (load average {load[0]} before, {load[1]} after). Read by ops/SCALING.md.", ""]
    failed = [f"{k}: {v['error']}" for k, v in measured.items() if "error" in v]
    if failed:
        body += ["Not measured in this run: " + "; ".join(failed), ""]
    if "error" not in phases:
        body += [
            f"### Phases of a chunk (in one process, {phases['rows']:,} source rows, {phases['chunks']} chunks of "
            f"≤{args.chunk_rows:,} rows, {phases['partitions']} deployments)", "",
            "| pass | rows/s | wall s | own CPU s | its PostgreSQL backends' CPU s | "
            + " | ".join(f"{name} s" for name in PHASE_NAMES) + " | rest s |",
            "|---|---:|---:|---:|---:|" + "---:|" * (len(PHASE_NAMES) + 1)]
        body += phase_rows(phases, args.chunk_rows)
    if "error" not in ledger:
        body += ledger_rows(ledger)
    if "error" not in broker:
        body += broker_rows(broker, args.dispatch_tasks)
    if "error" not in real:
        body.append(
            f"- A real fresh run, 2 workers ({real['chunks']} chunks, {real['seconds']:.1f}s, worker start-up "
            f"and shutdown included): {real['calls_per_chunk']:.0f} Redis commands and "
            f"{real['cpu_ms_per_chunk']:.1f} ms of Redis CPU per chunk (whole server). Most connections held at "
            f"once by the 2 workers and the producer: PostgreSQL "
            + ", ".join(f"{k} {v}" for k, v in sorted(real["pg_connections"].items()))
            + f"; Redis {real['redis_connections']} (on the broker's DB, this sampler's own excluded).")
    return body


def phase_rows(phases: dict[str, Any], chunk_rows: int) -> list[str]:
    body = []
    for label, p in phases["passes"].items():
        rest = p["wall_s"] - sum(p["phases"].values())
        body.append(f"| {label} | {p['rows'] / p['wall_s']:,.0f} | {p['wall_s']:.2f} | {p['cpu_s']:.2f} | "
                    f"{p['db_cpu_s']:.2f} | "
                    + " | ".join(f"{p['phases'][k]:.2f}" for k in PHASE_NAMES) + f" | {rest:.2f} |")
    fresh = phases["passes"]["fresh"]
    per_chunk = {k: v / phases["chunks"] * 1e3 for k, v in fresh["phases"].items()}
    body += ["", "Per fresh chunk (mean, ms): " + ", ".join(f"{k} {v:.0f}" for k, v in per_chunk.items())
             + "; per million rows (s): " + ", ".join(f"{k} {v / fresh['rows'] * 1e6:.2f}"
                                                       for k, v in fresh["phases"].items()) + ".",
             f"Planning (one hourly `GROUP BY` over the source, then cutting): {phases['plan_s']:.2f}s. "
             f"Coordinator, target side: counts {phases['target_counts_s']:.2f}s, verify (per-deployment "
             f"`count(*)` of the source) {phases['verify_s']:.2f}s.", ""]
    return body


def ledger_rows(ledger: dict[str, Any]) -> list[str]:
    body = ["### Ledger (one run, synthetic chunks; transactions as the worker makes them)", "",
             "| chunks in the run | record the plan s | read all chunks s | claim ms (median / p90) "
             "| heartbeat ms | record outcome ms | claim+beat+record cycles/s by processes | sweeper rules ms "
             "| coordinator reads ms | chunks table B/chunk |",
             "|---:|---:|---:|---|---|---|---|---|---|---:|"]
    for size, m in ledger.items():
        ms = m["ms"]
        body.append(
            f"| {int(size):,} | {m['create_run_s']:.2f} | {m['chunks_of_s']:.2f} | "
            f"{ms['claim'][0]:.1f} / {ms['claim'][1]:.1f} | {ms['heartbeat'][0]:.1f} / {ms['heartbeat'][1]:.1f} | "
            f"{ms['record'][0]:.1f} / {ms['record'][1]:.1f} | "
            + ", ".join(f"{p}: {r:,.0f}" for p, r in m["cycles_per_s"].items()) + " | "
            + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in m["sweeper_s"].items()) + " | "
            + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in m["coordinator_reads_s"].items())
            + f" | {m['chunks_table_bytes'] / int(size):,.0f} (a done row: {m['done_row_bytes']:,.0f}) |")
    return body


def broker_rows(broker: dict[str, Any], dispatch_tasks: int) -> list[str]:
    body = ["", "### Broker (Redis, Celery as the engine configures it)", "",
             f"- Sending {broker['messages']:,} chunk messages (one `send_task` each, as `start_run` does): "
             f"{broker['send_s']:.2f}s, {broker['messages'] / broker['send_s']:,.0f} messages/s; "
             f"{broker['message_bytes']:,.0f} bytes of Redis memory per waiting message; "
             f"{broker['send_redis_calls']:.1f} Redis commands and {broker['send_redis_cpu_us']:.0f} µs of Redis CPU "
             "per message (the whole server's counters: other sessions' commands included)."]
    for workers, d in broker["dispatch"].items():
        body.append(f"- {dispatch_tasks:,} tasks whose chunk is already done (delivery, a claim that skips, a "
                    f"finalize check, the result stored) through {workers} real worker process(es): {d['seconds']:.1f}s, "
                    f"{d['tasks_per_s']:,.0f} tasks/s; {d['result_bytes_per_task']:,.0f} bytes of Redis per kept "
                    f"result (kept 7 days); {d['redis_calls_per_task']:.0f} Redis commands and "
                    f"{d['redis_cpu_us_per_task']:.0f} µs of Redis CPU per task (whole server).")
    return body


# -- main ----------------------------------------------------------------------------------------

def bench(args: argparse.Namespace, settings: Settings) -> None:
    prepare_source(args.url, args.rows, args.reuse_source)
    reset_ledger(args.ledger_url)
    prepare_reference(args.url)
    netns, hosts_note = load_netns(args)
    keys = ["ceiling", *(f"shuttle-{w}" for w in args.workers), *(["hosts-2x2"] if netns else [])]
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    load_before = f"{os.getloadavg()[0]:.2f}"
    comparison = ""
    ledger = Ledger(args.ledger_url)
    try:
        for repeat in range(1, args.repeats + 1):
            log(f"repeat {repeat}/{args.repeats}")
            for key in keys:
                if key == "ceiling":
                    res = ceiling_once(args.url)
                elif key.startswith("hosts-"):
                    res = hosts_once(netns, settings, ledger, args, repeat)
                else:
                    res = shuttle_once(settings, ledger, int(key.removeprefix("shuttle-")), args, repeat)
                results[key].append(res)
                log(f"  {key:<10} {res['seconds']:6.1f}s  {args.rows / res['seconds']:>9,.0f} rows/s"
                    + (f"  ({res['chunks']} chunks, plan {res['plan_s']:.1f}s, chunk time summed "
                       f"{sum(res['chunk_s']):.1f}s)" if "chunks" in res else "")
                    + (f", chunks per host {res['split']}" if "split" in res else ""))
                if repeat == 1 and key == f"shuttle-{max(args.workers)}":
                    comparison = compare_with_reference(args.url)
                    log("  " + comparison)
    finally:
        ledger.dispose()
    body, data = render(args, results, (load_before, f"{os.getloadavg()[0]:.2f}"), hosts_note,
                        f"Output of the {max(args.workers)}-worker run checked bucket by bucket against the "
                        f"ceiling's: {comparison}")
    print("\n" + "\n".join(body) + "\n")
    write_section(args.results, body, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000, help="source rows (default 2,000,000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4],
                        help="worker process counts, comma-separated (default 1,2,4; 1 is needed for speed-up)")
    parser.add_argument("--hosts", choices=("auto", "off"), default="auto",
                        help="the 2 hosts × 2 workers row, when ops/netns_hosts.py is there (default auto)")
    parser.add_argument("--netns-hosts", type=Path, default=NETNS_HOSTS,
                        help="the namespace helper to load for that row (default ops/netns_hosts.py)")
    parser.add_argument("--chunk-rows", type=int, default=None, help="default: the settings' chunk_rows")
    parser.add_argument("--url", default=DEFAULT_DB, help="source = target database (dedicated, rebuilt)")
    parser.add_argument("--ledger-url", default=DEFAULT_LEDGER)
    parser.add_argument("--broker-url", default=DEFAULT_BROKER, help="flushed before every run")
    parser.add_argument("--reuse-source", action="store_true", help="keep the source if it has --rows rows")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to update")
    parser.add_argument("--log-dir", type=Path, default=Path(f"/tmp/shuttle-bench-logs/scaling-{os.getpid()}"))
    parser.add_argument("--costs", action="store_true", help="measure the per-chunk costs instead (ops/SCALING.md)")
    parser.add_argument("--ledger-chunks", type=lambda s: [int(x) for x in s.split(",")],
                        default=[2_000, 20_000, 200_000], help="--costs: chunks per synthetic run")
    parser.add_argument("--cycle-seconds", type=float, default=5.0, help="--costs: seconds per concurrency level")
    parser.add_argument("--messages", type=int, default=20_000, help="--costs: chunk messages sent")
    parser.add_argument("--dispatch-tasks", type=int, default=2_000, help="--costs: no-op tasks through workers")
    args = parser.parse_args()
    if 1 not in args.workers:
        parser.error("--workers must include 1: speed-up and efficiency are measured against it")
    args.started = datetime.now(timezone.utc)
    settings = load_settings(source_url=args.url, target_url=args.url, ledger_url=args.ledger_url,
                             broker_url=args.broker_url, result_backend=args.broker_url,
                             queue=f"shuttle-bench-{os.getpid()}")
    args.chunk_rows = args.chunk_rows or settings.chunk_rows
    with exclusive(args.url):
        create_database(args.url)
        (costs if args.costs else bench)(args, settings)


if __name__ == "__main__":
    main()
