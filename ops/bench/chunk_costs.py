"""What one chunk costs, piece by piece: the measurements ops/SCALING.md's model starts from.

Three groups, each measured where it happens, with no timing added to the engine:
- **phases** (in this process, on the benchmark's source): planning, then every chunk of a run with its
  phases timed by wrapping the engine's own methods — source fingerprint, skip check, read (COPY out and
  decode), transform (Python aggregation), write (COPY in + guarded upsert + state row, one transaction) —
  once into empty targets and once as a re-run; then the coordinator's target-side work (counts, verify).
- **ledger** (a scratch ledger database, synthetic runs of 2,000 … 200,000 chunks): recording a plan,
  the per-chunk claim / heartbeat / record transactions one at a time and from several processes at once
  (one run: they all lock its row), the sweeper's three rules and the coordinator's ledger reads, and the
  chunks table's bytes per chunk.
- **broker** (Redis, a scratch queue): sending chunk messages, their bytes in Redis, and tasks per second
  through real Celery workers when the chunk work itself is nil (every chunk is already done, so each
  task is one delivery, a ledger claim that skips, a finalize check and a result).
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

from benchlib import log
from common.broker import Broker
from common.connectors import postgres
from common.connectors.postgres import create_database
from common.ledger import Ledger, RunRecord
from common.migrations import modmon
from common.migrations.base import Selection
from common.model import ChunkOutcome, ChunkSpec, WriteCounts
from common.settings import Settings
from common.sweeper import Sweeper
from producer.local_workers import LocalWorkers
from producer.planner import make_plan

PHASES = ("fingerprint", "skip check", "read", "transform", "write")


# -- phases of real chunks ------------------------------------------------------------------------

class PhaseTimer:
    """Wraps the engine's methods for the duration of a `with`, summing wall seconds per phase."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def _timed(self, phase: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started
        return wrapper

    def _timed_stream(self, original: Callable[..., Iterator[tuple]]) -> Callable[..., Iterator[tuple]]:
        def stream(*args: Any, **kwargs: Any) -> Iterator[tuple]:
            inner = original(*args, **kwargs)
            while True:
                started = time.perf_counter()
                try:
                    row = next(inner)
                except StopIteration:
                    self.seconds["read"] += time.perf_counter() - started
                    return
                self.seconds["read"] += time.perf_counter() - started
                yield row
        return stream

    def _timed_aggregate(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def aggregate(*args: Any, **kwargs: Any) -> Any:
            started, read_before = time.perf_counter(), self.seconds["read"]
            try:
                return original(*args, **kwargs)
            finally:  # the rows it pulls are read time, not transform time
                self.seconds["transform"] += time.perf_counter() - started - (self.seconds["read"] - read_before)
        return aggregate

    @contextmanager
    def installed(self) -> Iterator[PhaseTimer]:
        saved = (postgres.Source.stream, postgres.Sink.upsert_together, modmon.Modmon._aggregate,
                 modmon.Modmon._fingerprint, modmon.Modmon._unchanged_outcome)
        postgres.Source.stream = self._timed_stream(saved[0])
        postgres.Sink.upsert_together = self._timed("write", saved[1])
        modmon.Modmon._aggregate = self._timed_aggregate(saved[2])
        modmon.Modmon._fingerprint = self._timed("fingerprint", saved[3])
        modmon.Modmon._unchanged_outcome = self._timed("skip check", saved[4])
        try:
            yield self
        finally:
            (postgres.Source.stream, postgres.Sink.upsert_together, modmon.Modmon._aggregate,
             modmon.Modmon._fingerprint, modmon.Modmon._unchanged_outcome) = saved


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (PostgreSQL backends of this process)."""
    total = 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def phase_costs(url: str, chunk_rows: int, truncate: Callable[[str], None]) -> dict[str, Any]:
    """Plan, then every chunk fresh and again as a re-run, in this process; then the coordinator's side."""
    migration = modmon.Modmon(url, url, modmon.Modmon.plan_options(reenable_drift_tracking=True))
    try:
        migration.prepare_target()
        truncate(url)
        started = time.perf_counter()
        plan = make_plan(migration, Selection(), chunk_rows)
        plan_s = time.perf_counter() - started
        passes: dict[str, Any] = {}
        backends = sorted({c.connection().info.backend_pid for c in (migration.source, migration.sink)})
        for label in ("fresh", "rerun"):
            timer = PhaseTimer()
            wall, cpu, rows = 0.0, 0.0, 0
            db_before = cpu_seconds(backends)
            with timer.installed():
                for spec in plan.chunks:
                    w0, c0 = time.perf_counter(), time.process_time()
                    outcome = migration.run_chunk(spec, lambda n: None)
                    wall += time.perf_counter() - w0
                    cpu += time.process_time() - c0
                    rows += outcome.rows_read
            db_cpu = cpu_seconds(backends) - db_before
            passes[label] = {"wall_s": wall, "cpu_s": cpu, "db_cpu_s": db_cpu, "rows": rows,
                             "phases": dict(timer.seconds)}
            log(f"  phases {label}: {rows:,} rows in {wall:.1f}s ({rows / wall:,.0f} rows/s), this process's CPU "
                f"{cpu:.1f}s, its PostgreSQL backends' CPU {db_cpu:.1f}s; " + ", ".join(f"{k} {v:.2f}s" for k, v in timer.seconds.items()))
        partitions = [p.partition for p in plan.partitions]
        started = time.perf_counter()
        migration.target_counts(partitions)
        counts_s = time.perf_counter() - started
        started = time.perf_counter()
        migration.verify(Selection(), partitions, {})
        verify_s = time.perf_counter() - started
    finally:
        migration.close()
    return {"plan_s": plan_s, "chunks": len(plan.chunks), "partitions": len(plan.partitions),
            "rows": plan.total_rows, "passes": passes, "target_counts_s": counts_s, "verify_s": verify_s}


# -- the ledger ---------------------------------------------------------------------------------

def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def synthetic_specs(count: int, partitions: int = 1000) -> list[ChunkSpec]:
    return [ChunkSpec("predictions", f"{i % partitions:024x}", f"{i:08d}", f"{i + 1:08d}", 50_000)
            for i in range(count)]


def new_run(ledger: Ledger, run_id: str, specs: list[ChunkSpec], queue: str) -> float:
    run = RunRecord(run_id=run_id, migration="modmon", status="running", selection={}, options={"planned": {}},
                    source_url=None, target_url=None, total_rows=50_000 * len(specs), chunk_count=len(specs),
                    max_rejects=None, queue=queue)
    started = time.perf_counter()
    ledger.create_run(run, specs)
    return time.perf_counter() - started


def sample_outcome() -> ChunkOutcome:
    """What a real modmon chunk records: two targets' counts, no rejects."""
    return ChunkOutcome(rows_read=50_000, writes={"prediction_stats_hourly": WriteCounts(inserted=180),
                                                  "feature_drift_hourly": WriteCounts(inserted=1080)})


def one_chunk_cycle(ledger: Ledger, chunk_id: str, timings: dict[str, list[float]] | None = None) -> None:
    """The ledger transactions of one chunk's life in a worker: claim, one heartbeat, record."""
    t0 = time.perf_counter()
    claim = ledger.claim_chunk(chunk_id, f"bench@costs:{chunk_id[-6:]}", 30.0)
    t1 = time.perf_counter()
    ledger.heartbeat(chunk_id, claim.token, rows_done=25_000)
    t2 = time.perf_counter()
    ledger.record_outcome(claim.chunk, claim.token, sample_outcome(), 0.5)
    t3 = time.perf_counter()
    if timings is not None:
        timings["claim"].append(t1 - t0)
        timings["heartbeat"].append(t2 - t1)
        timings["record"].append(t3 - t2)


def _hammer(url: str, chunk_ids: list[str], start_at: float, seconds: float, out: Any) -> None:
    ledger = Ledger(url)
    ledger.get_run("warm-up")  # connect before the clock starts
    done = 0
    try:
        while time.time() < start_at:
            time.sleep(0.005)
        for chunk_id in chunk_ids:
            if time.time() > start_at + seconds:
                break
            one_chunk_cycle(ledger, chunk_id)
            done += 1
    finally:
        out.put((done, time.time()))
        ledger.dispose()


def concurrent_cycles(url: str, chunk_ids: list[str], processes: int, seconds: float) -> float:
    """Chunk life cycles per second of one run from `processes` processes at once (each its own chunks),
    all starting at the same moment once every process has connected."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    per = len(chunk_ids) // processes
    start_at = time.time() + 5 + processes
    procs = [ctx.Process(target=_hammer, args=(url, chunk_ids[i * per:(i + 1) * per], start_at, seconds, out))
             for i in range(processes)]
    for p in procs:
        p.start()
    ended = [out.get() for _ in procs]
    for p in procs:
        p.join()
    done = sum(n for n, _ in ended)
    return done / (max(t for _, t in ended) - start_at) if done else 0.0


def ledger_costs(ledger_url: str, sizes: list[int], settings: Settings, concurrency: list[int],
                 seconds: float) -> dict[str, Any]:
    measured: dict[str, Any] = {}
    for size in sizes:
        drop_database(ledger_url)
        create_database(ledger_url)
        ledger = Ledger(ledger_url)
        ledger.ensure_schema()
        specs = synthetic_specs(size)
        run_id = f"costs-{size}"
        create_s = new_run(ledger, run_id, specs, settings.queue)
        ids = [s.chunk_id(run_id) for s in specs]
        started = time.perf_counter()
        ledger.chunks_of(run_id)
        chunks_of_s = time.perf_counter() - started
        timings: dict[str, list[float]] = {"claim": [], "heartbeat": [], "record": []}
        sequential = ids[:300]
        for chunk_id in sequential:
            one_chunk_cycle(ledger, chunk_id, timings)
        rest = ids[len(sequential):]
        parallel: dict[int, float] = {}
        for procs in concurrency:
            need = min(len(rest), procs * 1000)
            batch, rest = rest[:need], rest[need:]
            if len(batch) < procs * 50:
                break
            parallel[procs] = concurrent_cycles(ledger_url, batch, procs, seconds)
        # Now most chunks are queued, a few thousand done: the sweeper's rules and the coordinator's reads.
        sweeper = Sweeper(ledger, Broker(settings), settings)
        rules: dict[str, float] = {}
        for rule, call in (("stale", sweeper._stale), ("queued counts (lost)", sweeper._queued_counts),
                           ("unfinalized", sweeper._unfinalized)):
            started = time.perf_counter()
            call()
            rules[rule] = time.perf_counter() - started
        sweeper.broker.close()
        reads: dict[str, float] = {}
        for what, call in (("progress", lambda: ledger.progress(run_id)),
                           ("partition_totals", lambda: ledger.partition_totals(run_id)),
                           ("run_timing", lambda: ledger.run_timing(run_id))):
            started = time.perf_counter()
            call()
            reads[what] = time.perf_counter() - started
        with psycopg.connect(ledger_url, autocommit=True) as conn:
            table_bytes = conn.execute("SELECT pg_total_relation_size('shuttle.chunks')").fetchone()[0]
            done_row_bytes = conn.execute("SELECT avg(pg_column_size(c.*)) FROM shuttle.chunks c"
                                          " WHERE state = 'done'").fetchone()[0]
        ledger.dispose()
        measured[str(size)] = {
            "create_run_s": create_s, "chunks_of_s": chunks_of_s,
            "ms": {k: [statistics.median(v) * 1e3, statistics.quantiles(v, n=10)[-1] * 1e3] for k, v in timings.items()},
            "cycles_per_s": parallel, "sweeper_s": rules, "coordinator_reads_s": reads,
            "chunks_table_bytes": table_bytes, "done_row_bytes": float(done_row_bytes or 0)}
        log(f"  ledger {size:,} chunks: create_run {create_s:.2f}s, claim/heartbeat/record median ms "
            + ", ".join(f"{k} {v[0]:.1f}" for k, v in measured[str(size)]["ms"].items())
            + f"; cycles/s by processes {', '.join(f'{p}: {r:,.0f}' for p, r in parallel.items())}; sweeper "
            + ", ".join(f"{k} {v * 1e3:.0f}ms" for k, v in rules.items()) + "; coordinator reads "
            + ", ".join(f"{k} {v * 1e3:.0f}ms" for k, v in reads.items())
            + f"; chunks table {table_bytes / size:,.0f} B/chunk")
    drop_database(ledger_url)
    return measured


# -- the broker ---------------------------------------------------------------------------------

def broker_costs(settings: Settings, ledger_url: str, messages: int, dispatch_tasks: int,
                 dispatch_workers: list[int], log_dir: Path) -> dict[str, Any]:
    """Sending N chunk messages; and tasks/s through real workers when every chunk is already done."""
    client = redis.Redis.from_url(settings.broker_url)
    client.flushdb()
    create_database(ledger_url)
    ledger = Ledger(ledger_url)
    ledger.ensure_schema()
    specs = synthetic_specs(max(messages, dispatch_tasks))
    run_id = f"costs-broker-{int(time.time())}"
    new_run(ledger, run_id, specs, settings.queue)
    records = ledger.chunks_of(run_id)
    broker = Broker(settings)
    before, cpu0, calls0 = int(client.info("memory")["used_memory"]), redis_cpu(client), redis_calls(client)
    started = time.perf_counter()
    broker.enqueue_chunks(run_id, records[:messages])
    send_s = time.perf_counter() - started
    queued_bytes = int(client.info("memory")["used_memory"]) - before
    send_cpu, send_calls = redis_cpu(client) - cpu0, redis_calls(client) - calls0
    depth = broker.queue_depth()
    client.flushdb()
    log(f"  broker: {messages:,} messages sent in {send_s:.2f}s ({messages / send_s:,.0f}/s), "
        f"{queued_bytes / messages:,.0f} B each in Redis (queue depth {depth}); Redis {send_calls / messages:.1f} "
        f"commands and {send_cpu / messages * 1e6:.0f} µs of CPU per message (whole server)")
    # Every chunk done: a task is pure overhead (delivery, claim that skips, finalize check, result).
    with ledger.transaction() as conn:
        from common.ledger_schema import chunks, runs
        conn.execute(chunks.update().where(chunks.c.run_id == run_id).values(state="done"))
        conn.execute(runs.update().where(runs.c.run_id == run_id).values(finalize_enqueued=True))
    dispatch: dict[int, dict[str, float]] = {}
    log_dir.mkdir(parents=True, exist_ok=True)
    worker_settings = settings.model_copy(update={"ledger_url": ledger_url})
    for workers in dispatch_workers:
        client.flushdb()
        batch = records[:dispatch_tasks]
        with LocalWorkers(worker_settings, workers, name=f"costs{workers}", log_dir=log_dir):
            before, cpu0, calls0 = int(client.info("memory")["used_memory"]), redis_cpu(client), redis_calls(client)
            started = time.perf_counter()
            broker.enqueue_chunks(run_id, batch)
            keys = [f"celery-task-meta-{c.chunk_id}" for c in batch]
            deadline = started + 600
            while time.perf_counter() < deadline:
                if sum(client.exists(*keys[i:i + 500]) for i in range(0, len(keys), 500)) >= len(keys):
                    break
                time.sleep(0.05)
            took = time.perf_counter() - started
            result_bytes = int(client.info("memory")["used_memory"]) - before
            cpu, calls = redis_cpu(client) - cpu0, redis_calls(client) - calls0
        dispatch[workers] = {"seconds": took, "tasks_per_s": len(batch) / took,
                             "result_bytes_per_task": result_bytes / len(batch),
                             "redis_cpu_us_per_task": cpu / len(batch) * 1e6, "redis_calls_per_task": calls / len(batch)}
        log(f"  dispatch, {workers} worker(s): {len(batch):,} no-op tasks in {took:.1f}s "
            f"({len(batch) / took:,.0f}/s); results {result_bytes / len(batch):,.0f} B each in Redis; Redis "
            f"{calls / len(batch):.0f} commands and {cpu / len(batch) * 1e6:.0f} µs of CPU per task (whole server)")
    client.flushdb()
    client.close()
    broker.close()
    ledger.dispose()
    drop_database(ledger_url)
    return {"messages": messages, "send_s": send_s, "message_bytes": queued_bytes / messages,
            "send_redis_cpu_us": send_cpu / messages * 1e6, "send_redis_calls": send_calls / messages,
            "dispatch": dispatch}


def redis_cpu(client: redis.Redis) -> float:
    """CPU seconds the Redis server has used (all its clients: on a shared server, an upper bound for ours)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def redis_calls(client: redis.Redis) -> int:
    """Commands the Redis server has executed (all clients)."""
    return sum(int(v["calls"]) for v in client.info("commandstats").values())
