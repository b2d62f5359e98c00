"""Prometheus metrics of the work itself, read from the ledger at every scrape (`shuttle metrics`).

Flower's `/metrics` counts Celery events; these count rows and chunks, so a dashboard shows how far a
run is and how fast each worker goes. Read from the ledger (the source of truth), not kept in memory:
the exporter can restart, run anywhere, and several can run at once, and every figure matches
`shuttle report` once the run ends (only the chunks recorded `done` count rows, as the report does).

Labels: `run` and `migration` on everything, `worker` (the Celery node name, `name@host`) on the
per-worker throughput, `state` on chunks. Runs still open and those created within the window are
exported; older ones drop out, so the series stay few.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from common.ledger import Ledger, seconds
from common.ledger_schema import chunks, runs

log = logging.getLogger("shuttle.metrics")
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
ROW_KINDS = ("read", "written", "unchanged", "deleted", "rejected")


def worker_node(worker: str | None) -> str:
    """The node name of a ledger worker (`name@host:pid` → `name@host`), as Flower shows it."""
    return (worker or "").rpartition(":")[0] or (worker or "unknown")


class LedgerCollector(Collector):
    """Builds every metric family from one read of the ledger per scrape."""

    def __init__(self, ledger: Ledger, window_hours: float = 24.0) -> None:
        self.ledger = ledger
        self.window_hours = window_hours

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("shuttle_ledger_up", "1 when the ledger answered this scrape, else 0.")
        try:
            run_rows, chunk_rows = self._read()
        except Exception as exc:  # noqa: BLE001 - a scrape says the ledger is down; the exporter lives on
            log.warning("metrics: ledger %s did not answer: %s", self.ledger.public_url, exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families(run_rows, chunk_rows)

    def _read(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        recent = sa.or_(runs.c.status == "running",
                        runs.c.created_at > sa.func.now() - seconds(self.window_hours * 3600))
        with self.ledger.reading() as conn:
            run_rows = [dict(r) for r in conn.execute(
                sa.select(runs.c.run_id, runs.c.migration, runs.c.status, runs.c.total_rows).where(recent)).mappings()]
            chunk_rows = [dict(r) for r in conn.execute(
                sa.select(chunks.c.run_id, chunks.c.state, chunks.c.worker, chunks.c.rows_read, chunks.c.rows_rejected,
                          chunks.c.rows_done, chunks.c.writes, chunks.c.duration_s, chunks.c.attempts)
                .join(runs, runs.c.run_id == chunks.c.run_id).where(recent)).mappings()]
        return run_rows, chunk_rows


def families(run_rows: list[dict[str, Any]], chunk_rows: list[dict[str, Any]]) -> Iterator[Any]:
    """The metric families of these runs and their chunks (pure: testable without a ledger)."""
    migration_of = {r["run_id"]: r["migration"] for r in run_rows}
    rows = {kind: CounterMetricFamily(f"shuttle_rows_{kind}", f"Rows {kind} by the run's recorded chunks.",
                                      labels=["run", "migration"]) for kind in ROW_KINDS}
    per_worker = CounterMetricFamily("shuttle_worker_rows_read", "Rows read by the chunks each worker recorded.",
                                     labels=["run", "migration", "worker"])
    chunk_states = GaugeMetricFamily("shuttle_chunks", "Chunks of the run by state.",
                                     labels=["run", "migration", "state"])
    retried = CounterMetricFamily("shuttle_chunk_retries", "Attempts beyond the first, over the run's chunks.",
                                  labels=["run", "migration"])
    done_rows = GaugeMetricFamily("shuttle_run_rows_done", "Rows read so far: recorded chunks plus what running "
                                  "chunks report in their heartbeats.", labels=["run", "migration"])
    est_rows = GaugeMetricFamily("shuttle_run_rows_estimated", "Rows the run's plan counted at the source.",
                                 labels=["run", "migration"])
    status = GaugeMetricFamily("shuttle_run_status", "1 for the run's current status.",
                               labels=["run", "migration", "status"])
    durations = HistogramMetricFamily("shuttle_chunk_duration_seconds", "How long recorded chunks took.",
                                      labels=["migration"])

    totals: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys((*ROW_KINDS, "done", "retries"), 0))
    states: dict[tuple[str, str], int] = defaultdict(int)
    workers: dict[tuple[str, str], int] = defaultdict(int)
    buckets: dict[str, list[float]] = defaultdict(list)
    for c in chunk_rows:
        run_id, t = c["run_id"], totals[c["run_id"]]
        states[(run_id, c["state"])] += 1
        t["retries"] += max(0, (c["attempts"] or 0) - 1)
        if c["state"] == "running":
            t["done"] += c["rows_done"] or 0
        if c["state"] != "done":
            continue
        t["read"] += c["rows_read"]
        t["done"] += c["rows_read"]
        t["rejected"] += c["rows_rejected"]
        for counts in (c["writes"] or {}).values():
            t["written"] += counts.get("inserted", 0) + counts.get("updated", 0) + counts.get("deleted", 0)
            t["unchanged"] += counts.get("unchanged", 0)
            t["deleted"] += counts.get("deleted", 0)
        workers[(run_id, worker_node(c["worker"]))] += c["rows_read"]
        if c["duration_s"] is not None:
            buckets[migration_of[run_id]].append(float(c["duration_s"]))

    for r in run_rows:
        run_id, migration = r["run_id"], r["migration"]
        t = totals[run_id]
        for kind in ROW_KINDS:
            rows[kind].add_metric([run_id, migration], t[kind])
        retried.add_metric([run_id, migration], t["retries"])
        done_rows.add_metric([run_id, migration], t["done"])
        est_rows.add_metric([run_id, migration], r["total_rows"])
        status.add_metric([run_id, migration, r["status"]], 1)
        for state in ("queued", "running", "done", "failed", "cancelled"):
            chunk_states.add_metric([run_id, migration, state], states.get((run_id, state), 0))
    for (run_id, worker), n in sorted(workers.items()):
        per_worker.add_metric([run_id, migration_of[run_id], worker], n)
    for migration, values in sorted(buckets.items()):
        cumulative = [(str(bound), sum(1 for v in values if v <= bound)) for bound in DURATION_BUCKETS]
        durations.add_metric([migration], [*cumulative, ("+Inf", len(values))], sum_value=sum(values))
    yield from (*rows.values(), per_worker, chunk_states, retried, done_rows, est_rows, status, durations)


def serve(ledger: Ledger, port: int, address: str = "0.0.0.0", window_hours: float = 24.0) -> Any:
    """Serve `/metrics` on `address:port` in a background thread; returns the server (shutdown() stops it)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(ledger, window_hours))
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server
