"""Run controls an operator changes while a run is live: a row rate every worker shares, and pause.

Both are held by the ledger (columns of the run's row), never by the broker, so they survive a broker
or Redis that restarts empty: a paused run stays paused, a throttled run stays throttled.

- **Throttle**: `max_rows_per_second` caps the rows all workers of the run read together (the shared
  token bucket is `worker.throttle`); NULL means no limit. Workers re-read it about once a second, so
  `shuttle throttle RUN N` takes effect within a second or two.
- **Pause**: while `paused_at` is set, no chunk of the run is handed out (`Ledger.claim_chunk` skips
  it and the chunk stays `queued` in the ledger); chunks already running finish. `shuttle continue`
  clears it and sends the run's queued chunks again; the sweeper leaves a paused run's queued chunks
  alone, so a pause is never taken for lost messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from common.errors import ConfigError
from common.ledger import Ledger
from common.ledger_schema import chunks, runs
from common.source_load import SourceLoad


@dataclass(frozen=True)
class RunControls:
    """A run's live controls as the ledger holds them now."""

    max_rows_per_second: float | None
    paused_at: datetime | None
    source_load: SourceLoad | None = None

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    def describe(self) -> str:
        """`paused · throttled to 500 rows/s`, or '' when neither applies."""
        parts = ["paused"] if self.paused else []
        if self.max_rows_per_second is not None:
            parts.append(f"throttled to {self.max_rows_per_second:,.0f} rows/s")
        if self.source_load is not None:
            parts.append(f"held while the source load is over {self.source_load.bound:g}")
        return " · ".join(parts)

    def brief(self) -> str:
        """`paused, ≤500/s`: the same in a few characters, for a table cell on an 80-column terminal."""
        parts = ["paused"] if self.paused else []
        if self.max_rows_per_second is not None:
            parts.append(f"≤{self.max_rows_per_second:,.0f}/s")
        if self.source_load is not None:
            parts.append("load-held")
        return ", ".join(parts)


def parse_rate(text: str) -> float | None:
    """`off` (or `none`, `0`) lifts the limit; otherwise a positive number of rows per second."""
    if text.strip().lower() in ("off", "none", "unlimited", "0"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"rows per second must be a positive number or 'off', not {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"rows per second must be a positive number or 'off', not {text!r}")
    return value


def read_controls(ledger: Ledger, run_id: str) -> RunControls | None:
    """The run's controls; None when the run is not in the ledger."""
    with ledger.reading() as conn:
        row = conn.execute(sa.select(runs.c.max_rows_per_second, runs.c.paused_at, runs.c.max_source_load)
                           .where(runs.c.run_id == run_id)).first()
    return RunControls(row.max_rows_per_second, row.paused_at, SourceLoad.from_dict(row.max_source_load)) \
        if row else None


def controls_of(ledger: Ledger, run_ids: list[str]) -> dict[str, RunControls]:
    """The controls of several runs at once (the `status` list)."""
    with ledger.reading() as conn:
        rows = conn.execute(sa.select(runs.c.run_id, runs.c.max_rows_per_second, runs.c.paused_at,
                                      runs.c.max_source_load).where(runs.c.run_id.in_(run_ids))).all()
    return {row.run_id: RunControls(row.max_rows_per_second, row.paused_at, SourceLoad.from_dict(row.max_source_load))
            for row in rows}


def set_max_rows_per_second(ledger: Ledger, run_id: str, limit: float | None) -> None:
    """Set (or with None lift) the run's shared row rate; running chunks follow within a second or two."""
    with ledger.transaction() as conn:
        conn.execute(runs.update().where(runs.c.run_id == run_id).values(max_rows_per_second=limit))


def set_source_load(ledger: Ledger, run_id: str, load: SourceLoad | None) -> None:
    """Hold the run's chunks while `load.probe` on the source answers more than `load.bound` (None: never)."""
    with ledger.transaction() as conn:
        conn.execute(runs.update().where(runs.c.run_id == run_id)
                     .values(max_source_load=load.as_dict() if load else None))


def pause(ledger: Ledger, run_id: str) -> int:
    """Stop handing out the run's chunks; returns how many are running now (they finish)."""
    with ledger.transaction() as conn:
        conn.execute(runs.update().where(runs.c.run_id == run_id, runs.c.paused_at.is_(None))
                     .values(paused_at=sa.func.now()))
        return int(conn.execute(sa.select(sa.func.count()).where(
            chunks.c.run_id == run_id, chunks.c.state == "running")).scalar_one())


def unpause(ledger: Ledger, run_id: str) -> bool:
    """Hand the run's chunks out again; True when it was paused."""
    with ledger.transaction() as conn:
        return conn.execute(runs.update().where(runs.c.run_id == run_id, runs.c.paused_at.is_not(None))
                            .values(paused_at=None).returning(runs.c.run_id)).first() is not None
