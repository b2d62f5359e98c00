"""The ledger: runs, chunks, rejects, verifications and reports, in PostgreSQL schema `shuttle`.

The ledger, not Redis, is the source of truth: a run can be resumed from it alone, and the report is
aggregated from it, so a chunk delivered twice is counted once (its row is overwritten, not added to).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, insert as pg_insert

from common.errors import ServiceUnavailable, TransientError
from common.model import ChunkOutcome, ChunkSpec, WriteCounts
from common.urls import mask, sqlalchemy_url

SCHEMA = "shuttle"
RAW_EXCERPT_CHARS = 500
TERMINAL_CHUNK_STATES = ("done", "failed", "cancelled")

metadata = sa.MetaData(schema=SCHEMA)

runs = sa.Table(
    "runs", metadata,
    sa.Column("run_id", sa.Text, primary_key=True),
    sa.Column("migration", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),  # running | cancelled | completed | failed
    sa.Column("selection", JSONB, nullable=False),
    sa.Column("options", JSONB, nullable=False),
    sa.Column("source_url", sa.Text),  # never with a password: see common.urls.strip_password
    sa.Column("target_url", sa.Text),
    sa.Column("total_rows", sa.BigInteger, nullable=False),
    sa.Column("chunk_count", sa.Integer, nullable=False),
    sa.Column("max_rejects", sa.BigInteger),
    sa.Column("finalize_enqueued", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
)

chunks = sa.Table(
    "chunks", metadata,
    sa.Column("chunk_id", sa.Text, primary_key=True),
    sa.Column("run_id", sa.Text, sa.ForeignKey(runs.c.run_id, ondelete="CASCADE"), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("entity", sa.Text, nullable=False),
    sa.Column("partition", sa.Text, nullable=False),
    sa.Column("lo", sa.Text, nullable=False),
    sa.Column("hi", sa.Text, nullable=False),
    sa.Column("est_rows", sa.BigInteger, nullable=False),
    sa.Column("state", sa.Text, nullable=False, server_default="queued"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rows_read", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("rows_inserted", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("rows_updated", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("rows_unchanged", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("rows_rejected", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("writes", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("worker", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("duration_s", sa.Float),
    sa.Index("chunks_run_state", "run_id", "state"),
)

rejects = sa.Table(
    "rejects", metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("run_id", sa.Text, sa.ForeignKey(runs.c.run_id, ondelete="CASCADE"), nullable=False),
    sa.Column("chunk_id", sa.Text, nullable=False),
    sa.Column("entity", sa.Text, nullable=False),
    sa.Column("partition", sa.Text, nullable=False),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("raw_excerpt", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Index("rejects_chunk", "chunk_id"),
    sa.Index("rejects_run", "run_id"),
)

verifications = sa.Table(
    "verifications", metadata,
    sa.Column("run_id", sa.Text, sa.ForeignKey(runs.c.run_id, ondelete="CASCADE"), primary_key=True),
    sa.Column("entity", sa.Text, primary_key=True),
    sa.Column("partition", sa.Text, primary_key=True),
    sa.Column("source_rows", sa.BigInteger, nullable=False),
    sa.Column("target_rows", sa.BigInteger, nullable=False),
    sa.Column("rejected_rows", sa.BigInteger, nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("detail", sa.Text, nullable=False, server_default=""),
    sa.Column("verified_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

reports = sa.Table(
    "reports", metadata,
    sa.Column("run_id", sa.Text, sa.ForeignKey(runs.c.run_id, ondelete="CASCADE"), primary_key=True),
    sa.Column("verdict", sa.Text, nullable=False),
    sa.Column("body", JSONB, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)


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


@dataclass(frozen=True)
class ChunkRecord:
    chunk_id: str
    run_id: str
    spec: ChunkSpec
    state: str
    attempts: int


@dataclass(frozen=True)
class Progress:
    """Where a run stands, for the progress bar and `shuttle status`."""

    total_rows: int
    rows_done: int
    chunks: dict[str, int]

    @property
    def chunk_count(self) -> int:
        return sum(self.chunks.values())

    @property
    def finished(self) -> bool:
        return all(state in TERMINAL_CHUNK_STATES for state, n in self.chunks.items() if n)


class Ledger:
    """All ledger reads and writes; one instance per process, built from the ledger URL."""

    def __init__(self, url: str) -> None:
        self.public_url = mask(url)
        self._url = url
        self.engine = sa.create_engine(
            sqlalchemy_url(url), pool_pre_ping=True, pool_size=2, max_overflow=4,
            connect_args={"connect_timeout": 10, "application_name": "shuttle-ledger"})

    # -- setup -------------------------------------------------------------------------------------

    def ensure_schema(self) -> None:
        """Create database, schema and tables if missing; safe when several processes start at once."""
        from common.connectors.postgres import create_database

        create_database(self._url)
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('shuttle.ledger.schema'))"))
                conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
                metadata.create_all(conn, checkfirst=True)
        except sa.exc.OperationalError as exc:
            raise ServiceUnavailable(
                f"ledger database {self.public_url} is unreachable: {_first_line(exc)}; "
                "check SHUTTLE_LEDGER_URL and that PostgreSQL is running") from None

    def dispose(self) -> None:
        self.engine.dispose()

    # -- planning ----------------------------------------------------------------------------------

    def create_run(self, run: RunRecord, specs: Sequence[ChunkSpec]) -> None:
        """Record the run and its plan in one transaction: a run exists whole or not at all."""
        with self.engine.begin() as conn:
            conn.execute(runs.insert().values(
                run_id=run.run_id, migration=run.migration, status=run.status, selection=run.selection,
                options=run.options, source_url=run.source_url, target_url=run.target_url,
                total_rows=run.total_rows, chunk_count=run.chunk_count, max_rejects=run.max_rejects))
            rows = [dict(chunk_id=s.chunk_id(run.run_id), run_id=run.run_id, seq=i, entity=s.entity,
                         partition=s.partition, lo=s.lo, hi=s.hi, est_rows=s.est_rows)
                    for i, s in enumerate(specs)]
            for start in range(0, len(rows), 5000):
                conn.execute(chunks.insert(), rows[start:start + 5000])

    def get_run(self, run_id: str) -> RunRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.run_id == run_id)).mappings().first()
        return _run_record(row) if row else None

    def latest_runs(self, limit: int = 20) -> list[RunRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(runs).order_by(runs.c.created_at.desc()).limit(limit)).mappings()
            return [_run_record(r) for r in rows]

    def chunks_of(self, run_id: str, states: Iterable[str] | None = None) -> list[ChunkRecord]:
        query = sa.select(chunks).where(chunks.c.run_id == run_id).order_by(chunks.c.seq)
        if states is not None:
            query = query.where(chunks.c.state.in_(list(states)))
        with self.engine.connect() as conn:
            return [_chunk_record(r) for r in conn.execute(query).mappings()]

    # -- the worker's side -------------------------------------------------------------------------

    def claim_chunk(self, chunk_id: str, worker: str) -> tuple[RunRecord, ChunkRecord] | None:
        """Mark a chunk running; None when it should be skipped (done already, run cancelled, unknown)."""
        with self._transaction() as conn:
            row = conn.execute(
                sa.select(chunks, runs.c.status.label("run_status")).join(runs)
                .where(chunks.c.chunk_id == chunk_id).with_for_update(of=chunks)).mappings().first()
            if row is None or row["state"] == "done":
                return None  # a redelivered copy of a finished chunk: its result is already recorded
            if row["run_status"] == "cancelled":
                if row["state"] not in TERMINAL_CHUNK_STATES:
                    conn.execute(chunks.update().where(chunks.c.chunk_id == chunk_id).values(state="cancelled"))
                return None
            conn.execute(chunks.update().where(chunks.c.chunk_id == chunk_id).values(
                state="running", attempts=chunks.c.attempts + 1, worker=worker, error=None,
                started_at=sa.func.now()))
            run = conn.execute(sa.select(runs).where(runs.c.run_id == row["run_id"])).mappings().one()
            return _run_record(run), _chunk_record(row)

    def record_outcome(self, chunk: ChunkRecord, outcome: ChunkOutcome, duration_s: float) -> bool:
        """Store a finished chunk's counts and rejects; True when this was the run's last chunk.

        Rejects of earlier attempts are replaced, so a redelivered chunk is never counted twice.
        """
        totals = outcome.totals()
        with self._transaction() as conn:
            self._lock_run(conn, chunk.run_id)
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
                finished_at=sa.func.now()))
            return self._claim_finalize(conn, chunk.run_id)

    def record_failure(self, chunk: ChunkRecord, error: str) -> bool:
        """Mark a chunk failed with a masked error; True when this was the run's last chunk."""
        with self._transaction() as conn:
            self._lock_run(conn, chunk.run_id)
            conn.execute(chunks.update().where(chunks.c.chunk_id == chunk.chunk_id).values(
                state="failed", error=mask(error)[:2000], finished_at=sa.func.now()))
            return self._claim_finalize(conn, chunk.run_id)

    def claim_finalize(self, run_id: str) -> bool:
        """True for exactly one caller once no chunk of the run is queued or running."""
        with self._transaction() as conn:
            self._lock_run(conn, run_id)
            return self._claim_finalize(conn, run_id)

    def get_chunk_error(self, chunk_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(chunks.c.error).where(chunks.c.chunk_id == chunk_id)).scalar()

    def get_chunk(self, chunk_id: str) -> ChunkRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(chunks).where(chunks.c.chunk_id == chunk_id)).mappings().first()
        return _chunk_record(row) if row else None

    @staticmethod
    def _lock_run(conn: sa.Connection, run_id: str) -> None:
        # Serialises the "am I last?" check: without it two workers finishing the last two chunks
        # at once could each see the other's chunk still running, and nobody would finalize.
        conn.execute(sa.select(runs.c.run_id).where(runs.c.run_id == run_id).with_for_update())

    @staticmethod
    def _claim_finalize(conn: sa.Connection, run_id: str) -> bool:
        open_chunks = sa.select(chunks.c.chunk_id).where(
            chunks.c.run_id == run_id, chunks.c.state.in_(("queued", "running")))
        claimed = conn.execute(
            runs.update().where(runs.c.run_id == run_id, runs.c.finalize_enqueued.is_(False),
                                ~sa.exists(open_chunks))
            .values(finalize_enqueued=True).returning(runs.c.run_id)).first()
        return claimed is not None

    # -- control -----------------------------------------------------------------------------------

    def cancel(self, run_id: str) -> int:
        """Cancel a run: queued chunks will be skipped; running ones finish. Returns chunks skipped."""
        with self._transaction() as conn:
            self._lock_run(conn, run_id)
            conn.execute(runs.update().where(runs.c.run_id == run_id).values(status="cancelled"))
            skipped = conn.execute(chunks.update().where(
                chunks.c.run_id == run_id, chunks.c.state == "queued").values(state="cancelled")).rowcount
            return skipped

    def reopen(self, run_id: str, still_running: Collection[str] = ()) -> list[ChunkRecord]:
        """Prepare a resume: every chunk not done is queued again, stale `running` ones too, except the
        `running` chunks in `still_running` (a live worker is in them now: they end and record themselves)."""
        with self._transaction() as conn:
            self._lock_run(conn, run_id)
            conn.execute(runs.update().where(runs.c.run_id == run_id).values(
                status="running", finalize_enqueued=False, finished_at=None))
            live = sa.and_(chunks.c.state == "running", chunks.c.chunk_id.in_(list(still_running)))
            conn.execute(chunks.update().where(
                chunks.c.run_id == run_id, chunks.c.state != "done", ~live).values(state="queued"))
            conn.execute(reports.delete().where(reports.c.run_id == run_id))
        return self.chunks_of(run_id, states=["queued"])

    def close_run(self, run_id: str, status: str, verdict: str, body: dict[str, Any],
                  chunk_states: dict[str, int]) -> bool:
        """Give an ended run its final status and report, unless its chunks changed since the report was
        built from `chunk_states`; True when stored.

        The coordinator of a cancelled round may still be building its report when `shuttle resume`
        reopens the run. Closing it then would mark the resumed run cancelled again, and the workers
        would skip every chunk the resume queued. Under the run's lock, so no reopen slips in between.
        """
        with self._transaction() as conn:
            self._lock_run(conn, run_id)
            if {state: n for state, (n, _) in self._chunk_states(conn, run_id).items()} != chunk_states:
                return False
            conn.execute(runs.update().where(runs.c.run_id == run_id).values(status=status, finished_at=sa.func.now()))
            self._save_report(conn, run_id, verdict, body)
            return True

    def set_run_status(self, run_id: str, status: str) -> None:
        with self._transaction() as conn:
            conn.execute(runs.update().where(runs.c.run_id == run_id).values(
                status=status, finished_at=sa.func.now()))

    # -- reading for progress and reports ---------------------------------------------------------

    def progress(self, run_id: str) -> Progress:
        with self.engine.connect() as conn:
            total = conn.execute(sa.select(runs.c.total_rows).where(runs.c.run_id == run_id)).scalar_one()
            states = self._chunk_states(conn, run_id)
        done = states.get("done", (0, 0))[1]
        return Progress(total_rows=int(total), rows_done=done, chunks={state: n for state, (n, _) in states.items()})

    @staticmethod
    def _chunk_states(conn: sa.Connection, run_id: str) -> dict[str, tuple[int, int]]:
        """Per chunk state: (chunks, rows read)."""
        rows = conn.execute(
            sa.select(chunks.c.state, sa.func.count(), sa.func.coalesce(sa.func.sum(chunks.c.rows_read), 0))
            .where(chunks.c.run_id == run_id).group_by(chunks.c.state)).all()
        return {state: (int(n), int(read)) for state, n, read in rows}

    def partition_totals(self, run_id: str) -> list[dict[str, Any]]:
        """Per (entity, partition): chunks by state, rows read, rejected, and per-target writes."""
        with self.engine.connect() as conn:
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
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(rejects.c.entity, rejects.c.partition, rejects.c.key,
                                          rejects.c.reason, rejects.c.raw_excerpt)
                                .where(rejects.c.run_id == run_id).order_by(rejects.c.id).limit(limit))
            return [dict(r) for r in rows.mappings()]

    def rejected_keys(self, run_ids: Sequence[str], partitions: Sequence[str]) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(rejects.c.key).where(
                rejects.c.run_id.in_(list(run_ids)), rejects.c.partition.in_(list(partitions)))).scalars())

    def run_timing(self, run_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(sa.func.min(chunks.c.started_at), sa.func.max(chunks.c.finished_at),
                                         sa.func.sum(chunks.c.attempts))
                               .where(chunks.c.run_id == run_id)).one()
        started, finished, attempts = row
        wall = (finished - started).total_seconds() if started and finished else None
        return {"started_at": _iso(started), "finished_at": _iso(finished), "wall_seconds": wall,
                "attempts": int(attempts or 0)}

    # -- reports and verifications -----------------------------------------------------------------

    def save_report(self, run_id: str, verdict: str, body: dict[str, Any]) -> None:
        with self._transaction() as conn:
            self._save_report(conn, run_id, verdict, body)

    @staticmethod
    def _save_report(conn: sa.Connection, run_id: str, verdict: str, body: dict[str, Any]) -> None:
        stmt = pg_insert(reports).values(run_id=run_id, verdict=verdict, body=json.loads(json.dumps(body)))
        conn.execute(stmt.on_conflict_do_update(index_elements=[reports.c.run_id], set_={
            "verdict": stmt.excluded.verdict, "body": stmt.excluded.body, "created_at": sa.func.now()}))

    def get_report(self, run_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(reports.c.body).where(reports.c.run_id == run_id)).scalar()

    def save_verification(self, run_id: str, results: Sequence[dict[str, Any]]) -> None:
        if not results:
            return
        stmt = pg_insert(verifications).values([{"run_id": run_id, **r} for r in results])
        update = {c: stmt.excluded[c] for c in ("source_rows", "target_rows", "rejected_rows", "ok", "detail")}
        with self._transaction() as conn:
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["run_id", "entity", "partition"], set_={**update, "verified_at": sa.func.now()}))

    def verified_partitions(self, migration: str) -> dict[str, str]:
        """Partition -> run id, for partitions whose latest verification by a completed run passed."""
        query = (sa.select(verifications.c.partition, verifications.c.run_id, verifications.c.ok)
                 .join(runs, runs.c.run_id == verifications.c.run_id)
                 .where(runs.c.migration == migration, runs.c.status == "completed")
                 .order_by(verifications.c.verified_at))
        latest: dict[str, tuple[bool, str]] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(query).mappings():
                latest[row["partition"]] = (row["ok"], row["run_id"])
        return {partition: run_id for partition, (ok, run_id) in latest.items() if ok}

    def _transaction(self):
        return _LedgerTransaction(self)


class _LedgerTransaction:
    """`engine.begin()` that turns lost connections into `TransientError` (retried by workers)."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._cm: Any = None

    def __enter__(self) -> sa.Connection:
        try:
            self._cm = self._ledger.engine.begin()
            return self._cm.__enter__()
        except sa.exc.OperationalError as exc:
            raise TransientError(f"ledger {self._ledger.public_url}: {_first_line(exc)}") from None

    def __exit__(self, *exc_info: Any) -> bool:
        try:
            return bool(self._cm.__exit__(*exc_info))
        except sa.exc.OperationalError as exc:
            raise TransientError(f"ledger {self._ledger.public_url}: {_first_line(exc)}") from None


def _run_record(row: Any) -> RunRecord:
    return RunRecord(run_id=row["run_id"], migration=row["migration"], status=row["status"],
                     selection=row["selection"], options=row["options"], source_url=row["source_url"],
                     target_url=row["target_url"], total_rows=row["total_rows"],
                     chunk_count=row["chunk_count"], max_rejects=row["max_rejects"],
                     created_at=row["created_at"], finished_at=row["finished_at"])


def _chunk_record(row: Any) -> ChunkRecord:
    spec = ChunkSpec(entity=row["entity"], partition=row["partition"], lo=row["lo"],
                     hi=row["hi"], est_rows=row["est_rows"])
    return ChunkRecord(chunk_id=row["chunk_id"], run_id=row["run_id"], spec=spec, state=row["state"],
                       attempts=row["attempts"])


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return mask(text.strip().splitlines()[0] if text.strip() else type(exc).__name__)


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(timezone.utc).isoformat() if value else None
