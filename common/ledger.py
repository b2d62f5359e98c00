"""The ledger: runs, chunks, rejects, verifications and reports, in PostgreSQL schema `shuttle`.

The ledger, not Redis, is the source of truth: a run can be resumed from it alone, and the report is
aggregated from it, so a chunk delivered twice is counted once (its row is overwritten, not added to).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from common.errors import ServiceUnavailable, TransientError
from common.ledger_schema import (SCHEMA, TERMINAL_CHUNK_STATES, add_missing_columns, chunks, events, metadata,
                                  rejects, reports, runs, verifications)
from common.model import ChunkOutcome, ChunkSpec, WriteCounts
from common.service_errors import service_unavailable
from common.pg_sessions import session_params
from common.urls import libpq_url, mask, sqlalchemy_url

RAW_EXCERPT_CHARS = 500
SWEEPER_LOCK = "shuttle.sweeper:"
# SQLSTATEs a retry can get past: serialization failure, deadlock, lock timeout, statement timeout,
# the server shutting down or not yet accepting connections, too many connections.
_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03", "53300"}

@dataclass(frozen=True)
class RunRecord:
    run_id: str
    migration: str
    status: str
    selection: dict[str, Any]
    options: dict[str, Any]
    source_url: str | None
    target_url: str | None
    total_rows: int
    chunk_count: int
    max_rejects: int | None
    created_at: datetime | None = None
    finished_at: datetime | None = None
    queue: str = "shuttle"


@dataclass(frozen=True)
class ChunkRecord:
    chunk_id: str
    run_id: str
    spec: ChunkSpec
    state: str
    attempts: int
    worker: str | None = None


@dataclass(frozen=True)
class Claim:
    """A chunk held by one attempt: only the attempt with this token may record the chunk's outcome."""

    run: RunRecord
    chunk: ChunkRecord
    token: str


@dataclass(frozen=True)
class Skipped:
    """Why a delivered chunk is not run: done already, held by a live attempt, cancelled, or unknown."""

    reason: str


@dataclass(frozen=True)
class Recorded:
    """What recording an attempt's end did: whether it was stored (the attempt held the chunk), and
    whether it was the run's last open chunk (the caller starts the coordinator)."""

    stored: bool
    run_finished: bool


@dataclass(frozen=True)
class Retrying:
    """A running chunk waiting for its next attempt (`error` says why) or on its second attempt or later."""

    chunk_id: str
    attempt: int
    error: str | None


@dataclass(frozen=True)
class Progress:
    """Where a run stands, for the progress bar and `shuttle status`."""

    total_rows: int
    rows_done: int
    chunks: dict[str, int]
    rows_in_flight: int = 0  # what running chunks have read so far, as their heartbeats last said
    retrying: tuple[Retrying, ...] = ()

    @property
    def chunk_count(self) -> int:
        return sum(self.chunks.values())

    @property
    def finished(self) -> bool:
        return all(state in TERMINAL_CHUNK_STATES for state, n in self.chunks.items() if n)


class Ledger:
    """All ledger reads and writes; one instance per process, built from the ledger URL.

    Every database error a retry can get past (a lost connection anywhere in a transaction, a deadlock,
    a server restarting) surfaces as `TransientError`, so a worker retries the task instead of
    acknowledging a chunk whose outcome was never written.
    """

    def __init__(self, url: str, pooled: bool = True) -> None:
        self.public_url = mask(url)
        self._url = url
        pool: dict[str, Any] = {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 4} if pooled \
            else {"poolclass": sa.pool.NullPool}
        self.engine = sa.create_engine(
            sqlalchemy_url(url), **pool, connect_args=session_params(libpq_url(url), "shuttle-ledger"))

    # -- setup -------------------------------------------------------------------------------------

    def ensure_schema(self) -> None:
        """Create database, schema and tables if missing, add columns of later versions; safe when
        several processes start at once."""
        from common.connectors.postgres import create_database

        try:
            create_database(self._url)
        except ServiceUnavailable as exc:
            detail = str(exc).split(" is unreachable: ", 1)[-1]
            raise service_unavailable("ledger", self.public_url, detail) from None
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('shuttle.ledger.schema'))"))
                conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
                metadata.create_all(conn, checkfirst=True)
                add_missing_columns(conn)
        except sa.exc.OperationalError as exc:
            raise service_unavailable("ledger", self.public_url, _first_line(exc)) from None

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """One ledger transaction; database errors a retry can fix become `TransientError`."""
        with _transient(self.public_url), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def reading(self) -> Iterator[sa.Connection]:
        """A connection for reads, with the same translation of transient errors."""
        with _transient(self.public_url), self.engine.connect() as conn:
            yield conn

    # -- planning ----------------------------------------------------------------------------------

    def create_run(self, run: RunRecord, specs: Sequence[ChunkSpec]) -> None:
        """Record the run and its plan in one transaction: a run exists whole or not at all."""
        with self.transaction() as conn:
            conn.execute(runs.insert().values(
                run_id=run.run_id, migration=run.migration, status=run.status, selection=run.selection,
                options=run.options, source_url=run.source_url, target_url=run.target_url,
                total_rows=run.total_rows, chunk_count=run.chunk_count, max_rejects=run.max_rejects,
                queue=run.queue))
            rows = [dict(chunk_id=s.chunk_id(run.run_id), run_id=run.run_id, seq=i, entity=s.entity,
                         partition=s.partition, lo=s.lo, hi=s.hi, est_rows=s.est_rows)
                    for i, s in enumerate(specs)]
            for start in range(0, len(rows), 5000):
                conn.execute(chunks.insert(), rows[start:start + 5000])

    def get_run(self, run_id: str) -> RunRecord | None:
        with self.reading() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.run_id == run_id)).mappings().first()
        return _run_record(row) if row else None

    def latest_runs(self, limit: int = 20) -> list[RunRecord]:
        with self.reading() as conn:
            rows = conn.execute(sa.select(runs).order_by(runs.c.created_at.desc()).limit(limit)).mappings()
            return [_run_record(r) for r in rows]

    def chunks_of(self, run_id: str, states: Iterable[str] | None = None) -> list[ChunkRecord]:
        query = sa.select(chunks).where(chunks.c.run_id == run_id).order_by(chunks.c.seq)
        if states is not None:
            query = query.where(chunks.c.state.in_(list(states)))
        with self.reading() as conn:
            return [chunk_record(r) for r in conn.execute(query).mappings()]

    # -- the worker's side: one attempt at a chunk -------------------------------------------------

    def claim_chunk(self, chunk_id: str, worker: str, stale_after: float, reclaim: str | None = None,
                    holder_gone: Callable[[str], bool] = lambda worker: False) -> Claim | Skipped:
        """Give the chunk to a new attempt, or say why this delivery is skipped.

        A chunk another attempt holds is skipped while that attempt's heartbeat is fresh and its worker
        is not known to be gone: a duplicate delivery (two resumes, a message re-sent by the sweeper)
        then never runs a chunk twice at once, and the first attempt's counts are the ones recorded.
        `reclaim` is the token of this task's previous attempt (a retry continuing its own claim).
        While the run is paused (common.run_controls) every delivery but such a retry is skipped.
        """
        with self.transaction() as conn:
            row = conn.execute(
                sa.select(chunks, runs.c.status.label("run_status"), runs.c.paused_at.label("run_paused_at"),
                          sa.extract("epoch", sa.func.now() - chunks.c.heartbeat_at).label("silent_s"))
                .join(runs).where(chunks.c.chunk_id == chunk_id).with_for_update(of=chunks)).mappings().first()
            if row is None:
                return Skipped("not in the ledger")
            if row["state"] == "done":
                return Skipped("done already")  # a redelivered copy: its result is already recorded
            if row["run_status"] == "cancelled":
                if row["state"] not in TERMINAL_CHUNK_STATES:
                    conn.execute(chunks.update().where(chunks.c.chunk_id == chunk_id).values(state="cancelled"))
                return Skipped("run cancelled")
            held = row["state"] == "running" and row["attempt"] is not None and row["attempt"] != reclaim
            if row["run_paused_at"] is not None and (row["attempt"] is None or row["attempt"] != reclaim):
                # Paused (common.run_controls): the chunk stays as it is in the ledger; `continue` sends it
                # again. Only a retry of the attempt that already holds it goes on (running chunks finish).
                return Skipped("run paused")
            silent = row["silent_s"]
            if held and silent is not None and float(silent) < stale_after and not holder_gone(row["worker"] or ""):
                return Skipped(f"held by {row['worker']} (heartbeat {max(0.0, float(silent)):.0f}s ago)")
            token = secrets.token_hex(8)
            conn.execute(chunks.update().where(chunks.c.chunk_id == chunk_id).values(
                state="running", attempts=chunks.c.attempts + 1, worker=worker, error=None, attempt=token, rows_done=0,
                heartbeat_at=sa.func.now(), started_at=sa.func.now()))
            run = conn.execute(sa.select(runs).where(runs.c.run_id == row["run_id"])).mappings().one()
            return Claim(_run_record(run), chunk_record(row), token)

    def heartbeat(self, chunk_id: str, token: str, extend_s: float = 0.0, rows_done: int | None = None,
                  error: str | None = None) -> bool:
        """Renew the attempt's hold (for `extend_s` more seconds, e.g. a retry's backoff), with the rows it
        has read so far, or the error it retries after, when given; False when the attempt no longer holds
        the chunk (a sweeper gave it to another)."""
        values: dict[str, Any] = {"heartbeat_at": sa.func.now() + seconds(extend_s)}
        if rows_done is not None:
            values["rows_done"] = rows_done
        if error is not None:
            values["error"] = mask(error)[:2000]
        with self.transaction() as conn:
            held = conn.execute(chunks.update().where(
                chunks.c.chunk_id == chunk_id, chunks.c.attempt == token, chunks.c.state == "running")
                .values(**values).returning(chunks.c.chunk_id)).first()
        return held is not None

    def record_outcome(self, chunk: ChunkRecord, token: str, outcome: ChunkOutcome, duration_s: float) -> Recorded:
        """Store a finished attempt's counts and rejects, if it still holds the chunk.

        A chunk already done keeps its first counts, and an attempt that lost its hold records
        nothing: under any number of duplicate deliveries each chunk is counted exactly once.
        """
        totals = outcome.totals()
        with self.transaction() as conn:
            self._lock_run(conn, chunk.run_id)
            if not self._holds(conn, chunk.chunk_id, token):
                return Recorded(stored=False, run_finished=False)
            conn.execute(rejects.delete().where(rejects.c.chunk_id == chunk.chunk_id))
            if outcome.rejects:
                conn.execute(rejects.insert(), [dict(
                    run_id=chunk.run_id, chunk_id=chunk.chunk_id, entity=r.entity,
                    partition=chunk.spec.partition, key=r.key, reason=r.reason,
                    raw_excerpt=r.raw[:RAW_EXCERPT_CHARS]) for r in outcome.rejects])
            conn.execute(chunks.update().where(chunks.c.chunk_id == chunk.chunk_id).values(
                state="done", rows_read=outcome.rows_read, rows_inserted=totals.inserted,
                rows_updated=totals.updated, rows_unchanged=totals.unchanged,
                rows_rejected=len(outcome.rejects), error=None, duration_s=duration_s,
                writes={name: counts.as_dict() for name, counts in outcome.writes.items()},
                finished_at=sa.func.now(), heartbeat_at=None))
            return Recorded(stored=True, run_finished=self._claim_finalize(conn, chunk.run_id))

    def record_failure(self, chunk: ChunkRecord, token: str, error: str) -> Recorded:
        """Mark the chunk failed with a masked error, if this attempt still holds it."""
        with self.transaction() as conn:
            self._lock_run(conn, chunk.run_id)
            if not self._holds(conn, chunk.chunk_id, token):
                return Recorded(stored=False, run_finished=False)
            conn.execute(chunks.update().where(chunks.c.chunk_id == chunk.chunk_id).values(
                state="failed", error=mask(error)[:2000], finished_at=sa.func.now(), heartbeat_at=None))
            return Recorded(stored=True, run_finished=self._claim_finalize(conn, chunk.run_id))

    @staticmethod
    def _holds(conn: sa.Connection, chunk_id: str, token: str) -> bool:
        current = conn.execute(sa.select(chunks.c.state, chunks.c.attempt)
                               .where(chunks.c.chunk_id == chunk_id).with_for_update()).first()
        return current is not None and current.state == "running" and current.attempt == token

    def claim_finalize(self, run_id: str) -> bool:
        """True for exactly one caller once no chunk of the run is queued or running."""
        with self.transaction() as conn:
            self._lock_run(conn, run_id)
            return self._claim_finalize(conn, run_id)

    def get_chunk_error(self, chunk_id: str) -> str | None:
        with self.reading() as conn:
            return conn.execute(sa.select(chunks.c.error).where(chunks.c.chunk_id == chunk_id)).scalar()

    def get_chunk(self, chunk_id: str) -> ChunkRecord | None:
        with self.reading() as conn:
            row = conn.execute(sa.select(chunks).where(chunks.c.chunk_id == chunk_id)).mappings().first()
        return chunk_record(row) if row else None

    @staticmethod
    def _lock_run(conn: sa.Connection, run_id: str) -> None:
        # Serialises the "am I last?" check: without it two workers finishing the last two chunks
        # at once could each see the other's chunk still running, and nobody would finalize. NO KEY
        # UPDATE, so rows that merely reference the run (rejects, events) can still be inserted meanwhile.
        conn.execute(sa.select(runs.c.run_id).where(runs.c.run_id == run_id).with_for_update(key_share=True))

    @staticmethod
    def _claim_finalize(conn: sa.Connection, run_id: str) -> bool:
        open_chunks = sa.select(chunks.c.chunk_id).where(
            chunks.c.run_id == run_id, chunks.c.state.in_(("queued", "running")))
        claimed = conn.execute(
            runs.update().where(runs.c.run_id == run_id, runs.c.finalize_enqueued.is_(False),
                                ~sa.exists(open_chunks))
            .values(finalize_enqueued=True, finalize_enqueued_at=sa.func.now()).returning(runs.c.run_id)).first()
        return claimed is not None

    # -- control -----------------------------------------------------------------------------------

    def cancel(self, run_id: str) -> int:
        """Cancel a run: queued chunks will be skipped; running ones finish. Returns chunks skipped."""
        with self.transaction() as conn:
            self._lock_run(conn, run_id)
            conn.execute(runs.update().where(runs.c.run_id == run_id).values(status="cancelled"))
            skipped = conn.execute(chunks.update().where(
                chunks.c.run_id == run_id, chunks.c.state == "queued").values(state="cancelled")).rowcount
            return skipped

    def reopen(self, run_id: str, stale_after: float) -> tuple[list[ChunkRecord], int]:
        """Prepare a resume: every chunk not done is queued again, stale `running` ones too; a chunk whose
        attempt's heartbeat is fresh is left to finish and record itself (it is not run twice).

        Returns the chunks queued and how many were left running."""
        with self.transaction() as conn:
            self._lock_run(conn, run_id)
            conn.execute(runs.update().where(runs.c.run_id == run_id).values(
                status="running", finalize_enqueued=False, finished_at=None))
            live = sa.and_(chunks.c.state == "running", chunks.c.heartbeat_at.is_not(None),
                           chunks.c.heartbeat_at > sa.func.now() - seconds(stale_after))
            conn.execute(chunks.update().where(chunks.c.run_id == run_id, chunks.c.state != "done", ~live).values(
                state="queued", attempt=None, heartbeat_at=None, queued_at=sa.func.now()))
            left = conn.execute(sa.select(sa.func.count()).where(chunks.c.run_id == run_id, live)).scalar_one()
            conn.execute(reports.delete().where(reports.c.run_id == run_id))
        return self.chunks_of(run_id, states=["queued"]), int(left)

    def close_run(self, run_id: str, status: str, verdict: str, body: dict[str, Any],
                  chunk_states: dict[str, int]) -> bool:
        """Give an ended run its final status and report, unless its chunks changed since the report was
        built from `chunk_states`; True when stored.

        The coordinator of a cancelled round may still be building its report when `shuttle resume`
        reopens the run. Closing it then would mark the resumed run cancelled again, and the workers
        would skip every chunk the resume queued. Under the run's lock, so no reopen slips in between.
        """
        with self.transaction() as conn:
            self._lock_run(conn, run_id)
            if {state: n for state, (n, _) in self._chunk_states(conn, run_id).items()} != chunk_states:
                return False
            conn.execute(runs.update().where(runs.c.run_id == run_id).values(status=status, finished_at=sa.func.now()))
            self._save_report(conn, run_id, verdict, body)
            return True

    def set_run_status(self, run_id: str, status: str) -> None:
        with self.transaction() as conn:
            conn.execute(runs.update().where(runs.c.run_id == run_id).values(
                status=status, finished_at=sa.func.now()))

    # -- reading for progress and reports ---------------------------------------------------------

    def progress(self, run_id: str) -> Progress:
        with self.reading() as conn:
            total = conn.execute(sa.select(runs.c.total_rows).where(runs.c.run_id == run_id)).scalar_one()
            states = self._chunk_states(conn, run_id)
            running = conn.execute(
                sa.select(chunks.c.chunk_id, chunks.c.attempts, chunks.c.rows_done, chunks.c.error)
                .where(chunks.c.run_id == run_id, chunks.c.state == "running").order_by(chunks.c.seq)).all()
        done = states.get("done", (0, 0))[1]
        return Progress(total_rows=int(total), rows_done=done, chunks={state: n for state, (n, _) in states.items()},
                        rows_in_flight=sum(int(r.rows_done or 0) for r in running),
                        # Waiting out a retry's backoff (its error noted) or running again after one.
                        retrying=tuple(Retrying(r.chunk_id, int(r.attempts) + (1 if r.error else 0), r.error)
                                       for r in running if r.attempts > 1 or r.error))

    @staticmethod
    def _chunk_states(conn: sa.Connection, run_id: str) -> dict[str, tuple[int, int]]:
        """Per chunk state: (chunks, rows read)."""
        rows = conn.execute(
            sa.select(chunks.c.state, sa.func.count(), sa.func.coalesce(sa.func.sum(chunks.c.rows_read), 0))
            .where(chunks.c.run_id == run_id).group_by(chunks.c.state)).all()
        return {state: (int(n), int(read)) for state, n, read in rows}

    def partition_totals(self, run_id: str) -> list[dict[str, Any]]:
        """Per (entity, partition): chunks by state, rows read, rejected, and per-target writes."""
        with self.reading() as conn:
            rows = conn.execute(
                sa.select(chunks.c.entity, chunks.c.partition, chunks.c.state, chunks.c.rows_read,
                          chunks.c.rows_rejected, chunks.c.writes, chunks.c.est_rows, chunks.c.duration_s)
                .where(chunks.c.run_id == run_id)).mappings().all()
        grouped: dict[tuple[str, str], dict[str, Any]] = {}
        for r in rows:
            g = grouped.setdefault((r["entity"], r["partition"]), {
                "entity": r["entity"], "partition": r["partition"], "planned_rows": 0, "rows_read": 0,
                "rows_rejected": 0, "chunks": {}, "writes": {}, "chunk_seconds": 0.0})
            g["planned_rows"] += r["est_rows"]
            g["chunks"][r["state"]] = g["chunks"].get(r["state"], 0) + 1
            if r["state"] == "done":
                g["rows_read"] += r["rows_read"]
                g["rows_rejected"] += r["rows_rejected"]
                g["chunk_seconds"] += r["duration_s"] or 0.0
                for target, counts in r["writes"].items():
                    acc = g["writes"].setdefault(target, WriteCounts.zero())
                    for k, v in counts.items():
                        acc[k] = acc.get(k, 0) + v
        return sorted(grouped.values(), key=lambda g: (g["entity"], g["partition"]))

    def rejects_of(self, run_id: str, limit: int = 50) -> list[dict[str, Any]]:
        with self.reading() as conn:
            rows = conn.execute(sa.select(rejects.c.entity, rejects.c.partition, rejects.c.key,
                                          rejects.c.reason, rejects.c.raw_excerpt)
                                .where(rejects.c.run_id == run_id).order_by(rejects.c.id).limit(limit))
            return [dict(r) for r in rows.mappings()]

    def rejected_keys(self, run_ids: Sequence[str], partitions: Sequence[str]) -> list[str]:
        with self.reading() as conn:
            return list(conn.execute(sa.select(rejects.c.key).where(
                rejects.c.run_id.in_(list(run_ids)), rejects.c.partition.in_(list(partitions)))).scalars())

    def run_timing(self, run_id: str) -> dict[str, Any]:
        with self.reading() as conn:
            row = conn.execute(sa.select(sa.func.min(chunks.c.started_at), sa.func.max(chunks.c.finished_at),
                                         sa.func.sum(chunks.c.attempts))
                               .where(chunks.c.run_id == run_id)).one()
        started, finished, attempts = row
        wall = (finished - started).total_seconds() if started and finished else None
        return {"started_at": _iso(started), "finished_at": _iso(finished), "wall_seconds": wall,
                "attempts": int(attempts or 0)}

    # -- reports and verifications -----------------------------------------------------------------

    def save_report(self, run_id: str, verdict: str, body: dict[str, Any]) -> None:
        with self.transaction() as conn:
            self._save_report(conn, run_id, verdict, body)

    @staticmethod
    def _save_report(conn: sa.Connection, run_id: str, verdict: str, body: dict[str, Any]) -> None:
        stmt = pg_insert(reports).values(run_id=run_id, verdict=verdict, body=json.loads(json.dumps(body)))
        conn.execute(stmt.on_conflict_do_update(index_elements=[reports.c.run_id], set_={
            "verdict": stmt.excluded.verdict, "body": stmt.excluded.body, "created_at": sa.func.now()}))

    def get_report(self, run_id: str) -> dict[str, Any] | None:
        with self.reading() as conn:
            return conn.execute(sa.select(reports.c.body).where(reports.c.run_id == run_id)).scalar()

    def save_verification(self, run_id: str, results: Sequence[dict[str, Any]]) -> None:
        if not results:
            return
        stmt = pg_insert(verifications).values([{"run_id": run_id, **r} for r in results])
        update = {c: stmt.excluded[c] for c in ("source_rows", "target_rows", "rejected_rows", "ok", "detail")}
        with self.transaction() as conn:
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["run_id", "entity", "partition"], set_={**update, "verified_at": sa.func.now()}))

    def verified_partitions(self, migration: str) -> dict[str, str]:
        """Partition -> run id, for partitions whose latest verification by a completed run passed."""
        query = (sa.select(verifications.c.partition, verifications.c.run_id, verifications.c.ok)
                 .join(runs, runs.c.run_id == verifications.c.run_id)
                 .where(runs.c.migration == migration, runs.c.status == "completed")
                 .order_by(verifications.c.verified_at))
        latest: dict[str, tuple[bool, str]] = {}
        with self.reading() as conn:
            for row in conn.execute(query).mappings():
                latest[row["partition"]] = (row["ok"], row["run_id"])
        return {partition: run_id for partition, (ok, run_id) in latest.items() if ok}

    def event_counts(self, run_id: str) -> dict[str, int]:
        """How often the run healed by itself, per kind (stale, lost, finalize)."""
        with self.reading() as conn:
            rows = conn.execute(sa.select(events.c.kind, sa.func.count()).where(events.c.run_id == run_id)
                                .group_by(events.c.kind)).all()
        return {kind: int(n) for kind, n in rows}

    def events_since(self, run_id: str, after_id: int = 0) -> list[dict[str, Any]]:
        """What healed the run by itself since event `after_id`, oldest first."""
        with self.reading() as conn:
            rows = conn.execute(sa.select(events).where(events.c.run_id == run_id, events.c.id > after_id)
                                .order_by(events.c.id)).mappings()
            return [dict(r) for r in rows]

    def failed_chunks(self, run_id: str) -> list[dict[str, Any]]:
        """Each failed chunk of the run with its error, for the report."""
        with self.reading() as conn:
            rows = conn.execute(sa.select(chunks.c.chunk_id, chunks.c.entity, chunks.c.partition, chunks.c.lo,
                                          chunks.c.hi, chunks.c.attempts, chunks.c.worker, chunks.c.error)
                                .where(chunks.c.run_id == run_id, chunks.c.state == "failed")
                                .order_by(chunks.c.seq)).mappings()
            return [dict(r) for r in rows]

    def verdicts(self, run_ids: Sequence[str]) -> dict[str, str]:
        """The stored verdict of each run that has a report."""
        with self.reading() as conn:
            return dict(conn.execute(sa.select(reports.c.run_id, reports.c.verdict)
                                     .where(reports.c.run_id.in_(list(run_ids)))).all())

    def measured_rate(self, migration: str, runs_back: int = 5) -> tuple[float, int] | None:
        """Rows per second one worker process reached over the recorded chunks of the migration's latest
        completed runs, and how many runs that is; None when there is none to measure."""
        recent = (sa.select(runs.c.run_id).where(runs.c.migration == migration, runs.c.status == "completed")
                  .order_by(runs.c.created_at.desc()).limit(runs_back).subquery())
        with self.reading() as conn:
            rows, busy, n = conn.execute(
                sa.select(sa.func.sum(chunks.c.rows_read), sa.func.sum(chunks.c.duration_s),
                          sa.func.count(sa.distinct(chunks.c.run_id)))
                .where(chunks.c.run_id.in_(sa.select(recent.c.run_id)), chunks.c.state == "done",
                       chunks.c.duration_s > 0)).one()
        if not rows or not busy:
            return None
        return float(rows) / float(busy), int(n)


def seconds(value: float) -> sa.ColumnElement:
    """A SQL interval of `value` seconds."""
    return sa.func.make_interval(0, 0, 0, 0, 0, 0, float(value))


@contextmanager
def _transient(public_url: str) -> Iterator[None]:
    """Database errors a retry can get past become `TransientError`, wherever in a transaction they happen."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        if _is_transient(exc):
            raise TransientError(f"ledger {public_url}: {_first_line(exc)}") from None
        raise


def _is_transient(exc: sa.exc.DBAPIError) -> bool:
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)) or exc.connection_invalidated:
        return True
    return (getattr(exc.orig, "sqlstate", None) or "") in _TRANSIENT_SQLSTATES


def _run_record(row: Any) -> RunRecord:
    return RunRecord(run_id=row["run_id"], migration=row["migration"], status=row["status"],
                     selection=row["selection"], options=row["options"], source_url=row["source_url"],
                     target_url=row["target_url"], total_rows=row["total_rows"],
                     chunk_count=row["chunk_count"], max_rejects=row["max_rejects"],
                     created_at=row["created_at"], finished_at=row["finished_at"], queue=row["queue"])


def chunk_record(row: Any) -> ChunkRecord:
    """A chunk row of the ledger (from any query selecting the chunks table's columns) as a record."""
    spec = ChunkSpec(entity=row["entity"], partition=row["partition"], lo=row["lo"],
                     hi=row["hi"], est_rows=row["est_rows"])
    return ChunkRecord(chunk_id=row["chunk_id"], run_id=row["run_id"], spec=spec, state=row["state"],
                       attempts=row["attempts"], worker=row["worker"])


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return mask(text.strip().splitlines()[0] if text.strip() else type(exc).__name__)


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(timezone.utc).isoformat() if value else None
