"""Back-pressure from the source: `--max-source-load 'SQL:BOUND'` holds a run's chunks while a probe
query on the source answers more than the bound (say, its active connections), as online schema-change
tools do.

The probe is any read-only query returning one number, run on a PostgreSQL source in a read-only
transaction with a short statement timeout, so it can never change the source or hang a worker. The CLI
runs it once before the run starts (a probe that fails is a usage error); a worker runs it about every
`PROBE_EVERY_SECONDS` while it streams a chunk and before it starts one. A probe that fails in a worker
is logged and taken as "not over": a broken probe must not stop a run for good.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from common.errors import ConfigError
from common.urls import libpq_url, mask

PROBE_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class SourceLoad:
    """A probe and the bound its answer must not exceed."""

    probe: str
    bound: float

    def as_dict(self) -> dict[str, Any]:
        return {"probe": self.probe, "bound": self.bound}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SourceLoad | None:
        return cls(data["probe"], float(data["bound"])) if data else None


def parse_source_load(text: str) -> SourceLoad:
    """`SQL:BOUND`, split at the last colon: `SELECT count(*) FROM pg_stat_activity WHERE state = 'active':20`."""
    probe, sep, bound = text.rpartition(":")
    try:
        value = float(bound)
    except ValueError:
        value = math.nan
    if not sep or not probe.strip() or not math.isfinite(value):
        raise ConfigError(f"--max-source-load must be SQL:BOUND, a query returning one number and the bound it "
                          f"must not exceed, e.g. \"SELECT count(*) FROM pg_stat_activity:50\"; got {text!r}")
    return SourceLoad(probe.strip(), value)


def measure(source_url: str, load: SourceLoad) -> float:
    """Run the probe on the source, read-only and bounded in time; its answer as a number."""
    import psycopg

    with psycopg.connect(libpq_url(source_url), connect_timeout=5, application_name="shuttle-load-probe") as conn:
        conn.execute("SET TRANSACTION READ ONLY")
        conn.execute(f"SET LOCAL statement_timeout = {PROBE_TIMEOUT_MS}")
        row = conn.execute(load.probe).fetchone()
        conn.rollback()
    if row is None or row[0] is None:
        raise ValueError("the probe returned no value")
    return float(row[0])


def check_probe(source_url: str, load: SourceLoad) -> float:
    """The probe run once at `run`: a probe that cannot run, or answers no number, stops the run before it starts."""
    try:
        return measure(source_url, load)
    except Exception as exc:  # noqa: BLE001 - psycopg, a value that is no number: all say the probe is wrong
        raise ConfigError(f"--max-source-load: the probe failed on the source: "
                          f"{mask(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)}; "
                          "it must be a read-only query returning one number") from None
