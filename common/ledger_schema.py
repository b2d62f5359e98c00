"""The ledger's tables (PostgreSQL schema `shuttle`), and the columns added since a ledger was first made.

`ensure_schema` creates what is missing and adds later columns to an existing ledger, so a ledger made
by an earlier version keeps working; nothing here is ever dropped or rewritten.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

SCHEMA = "shuttle"
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
    # The broker queue the run's chunks are sent to: a sweeper only re-sends chunks of its own queue.
    sa.Column("queue", sa.Text, nullable=False, server_default="shuttle"),
    sa.Column("finalize_enqueued_at", sa.DateTime(timezone=True)),
    # Run controls (common.run_controls), held here so they survive a broker loss: the rows per second
    # every worker of the run shares (NULL: unlimited), and since when the run is paused (NULL: it is not).
    sa.Column("max_rows_per_second", sa.Float),
    sa.Column("paused_at", sa.DateTime(timezone=True)),
    # {"probe": SQL, "bound": N}: chunks wait while the probe on the source answers more (common.source_load).
    sa.Column("max_source_load", JSONB),
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
    # The attempt that holds a running chunk; only it may record the chunk's outcome.
    sa.Column("attempt", sa.Text),
    # Renewed by the holding attempt while it works; a stale one means its worker is gone.
    sa.Column("heartbeat_at", sa.DateTime(timezone=True)),
    # When the chunk's message was last sent: a `queued` chunk the broker does not hold is re-sent.
    sa.Column("queued_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    # Rows the holding attempt has read so far, carried by its heartbeat: progress between chunk ends
    # that works from the ledger alone, whatever the broker.
    sa.Column("rows_done", sa.BigInteger),
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

# What healed a run by itself (a stale chunk or a lost message re-sent, a coordinator started), so
# `watch`, `run --wait` and the report can say so.
events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("run_id", sa.Text, sa.ForeignKey(runs.c.run_id, ondelete="CASCADE"), nullable=False),
    sa.Column("chunk_id", sa.Text),
    sa.Column("kind", sa.Text, nullable=False),  # stale | lost | finalize
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Index("events_run", "run_id", "id"),
)

# When each queue was last swept: however many workers run a sweeper, a queue is swept once per interval.
sweeps = sa.Table(
    "sweeps", metadata,
    sa.Column("queue", sa.Text, primary_key=True),
    sa.Column("swept_at", sa.DateTime(timezone=True), nullable=False),
)

# The row throttle's schedule per run, when it cannot live in Redis (worker.throttle.LedgerBucket): when
# the run's next rows may go (epoch seconds, the ledger's clock), and at which rate that was reckoned.
throttle_buckets = sa.Table(
    "throttle_buckets", metadata,
    sa.Column("run_id", sa.Text, sa.ForeignKey(runs.c.run_id, ondelete="CASCADE"), primary_key=True),
    sa.Column("tat", sa.Float, nullable=False),
    sa.Column("rate", sa.Float, nullable=False),
)

# Columns added after the first release, as `ensure_schema` adds them to an older ledger.
ADDED_COLUMNS: dict[str, tuple[str, ...]] = {
    "runs": ("queue text NOT NULL DEFAULT 'shuttle'", "finalize_enqueued_at timestamptz",
             "max_rows_per_second double precision", "paused_at timestamptz", "max_source_load jsonb"),
    "chunks": ("attempt text", "heartbeat_at timestamptz", "queued_at timestamptz DEFAULT now()", "rows_done bigint"),
}


def add_missing_columns(conn: sa.Connection) -> None:
    """Bring a ledger made by an earlier version up to date; a no-op on a current one.

    The catalog is read first: `ALTER TABLE` takes an exclusive lock even when the column exists, and
    every command's start would then stall (or deadlock with) the workers using the ledger."""
    present = set(conn.execute(sa.text(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = :schema"),
        {"schema": SCHEMA}).all())
    for table, columns in ADDED_COLUMNS.items():
        for column in columns:
            if (table, column.split()[0]) not in present:
                conn.execute(sa.text(f"ALTER TABLE {SCHEMA}.{table} ADD COLUMN IF NOT EXISTS {column}"))
