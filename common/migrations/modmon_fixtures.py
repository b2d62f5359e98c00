"""A realistic `modmon` source: deployments of skewed sizes, archived predictions, a few bad rows.

Used by `shuttle demo`, the tests and the benchmarks. Rows are generated inside PostgreSQL (one
`INSERT … SELECT generate_series` per deployment), so a million rows take seconds, and seeded, so
the same arguments always build the same data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg
from psycopg import sql

from common.connectors.postgres import create_database
from common.urls import libpq_url

SOURCE_DDL = """
CREATE TABLE IF NOT EXISTS {schema}.deployments (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS {schema}.archived_predictions (
    id              bigint PRIMARY KEY,
    deployment_id   text NOT NULL,
    model_id        text,
    ts              timestamptz NOT NULL,
    prediction      double precision,
    actual          double precision,
    association_id  text,
    features        text
);
CREATE INDEX IF NOT EXISTS archived_predictions_deployment_ts ON {schema}.archived_predictions (deployment_id, ts);
"""

# Rows that cannot be migrated, one of each kind the migration must reject with a reason:
# (the reason it will give, timestamp, prediction, features text).
NORMAL_TS = datetime(2026, 6, 1, 13, 0, tzinfo=timezone.utc)
MALFORMED = (
    ("features is not valid JSON", NORMAL_TS, 0.5, '{"age": 41, "region": "north"'),
    ("features is not valid JSON", NORMAL_TS, 0.25, "not json at all"),
    ("features must be a JSON object", NORMAL_TS, 0.75, "[1, 2, 3]"),
    ("prediction is NULL", NORMAL_TS, None, '{"age": 30}'),
    ("prediction is NULL", NORMAL_TS, None, None),
    ("outside the valid range", datetime(1999, 12, 31, 23, 30, tzinfo=timezone.utc), 0.5, '{"age": 30}'),
    ("outside the valid range", datetime(2199, 1, 1, tzinfo=timezone.utc), 0.5, '{"age": 30}'),
)


@dataclass(frozen=True)
class Dataset:
    """What was built: deployment ids (largest first), row counts, and ids of the malformed rows."""

    deployments: tuple[str, ...]
    rows_per_deployment: dict[str, int]
    malformed_ids: tuple[int, ...]

    @property
    def total_rows(self) -> int:
        return sum(self.rows_per_deployment.values())


def deployment_id(index: int) -> str:
    """24-hex ids like the monitored platform's, deterministic in the index."""
    return hashlib.md5(f"deployment-{index}".encode()).hexdigest()[:24]


def skewed_sizes(total: int, count: int, skew: float = 1.1) -> list[int]:
    """Zipf-like sizes: the first deployment is the largest, sizes add up to `total` exactly."""
    weights = [1 / (i + 1) ** skew for i in range(count)]
    scale = total / sum(weights)
    sizes = [int(w * scale) for w in weights]
    sizes[0] += total - sum(sizes)
    return sizes


def build_source(url: str, *, rows: int = 1_000_000, deployments: int = 30, malformed: bool = True,
                 days: int = 7, schema: str = "public", seed: float = 0.42) -> Dataset:
    """Replace the source tables in `schema` with freshly generated, deterministic data."""
    create_database(url)
    ids = [deployment_id(i) for i in range(deployments)]
    sizes = skewed_sizes(rows, deployments)
    schema_id = sql.Identifier(schema)
    with psycopg.connect(libpq_url(url)) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema_id))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {s}.archived_predictions, {s}.deployments").format(s=schema_id))
        conn.execute(sql.SQL(SOURCE_DDL.replace("{schema}", "{s}")).format(s=schema_id))
        conn.execute("SELECT setseed(%s)", (seed,))
        next_id = 1
        for index, (dep, size) in enumerate(zip(ids, sizes)):
            conn.execute(sql.SQL("INSERT INTO {}.deployments VALUES (%s, %s, timestamptz '2026-01-01' + %s * interval '1 day')")
                         .format(schema_id), (dep, f"deployment {index + 1}", index))
            conn.execute(sql.SQL(_ROWS).format(s=schema_id), {"dep": dep, "first": next_id, "n": size, "days": days})
            next_id += size
        bad_ids = []
        if malformed:
            for i, (_, ts, prediction, features) in enumerate(MALFORMED):
                dep = ids[i % len(ids)]
                conn.execute(sql.SQL(
                    "INSERT INTO {}.archived_predictions (id, deployment_id, model_id, ts, prediction, features)"
                    " VALUES (%s, %s, %s, %s, %s, %s)").format(schema_id),
                    (next_id, dep, f"{dep[:12]}model000000", ts, prediction, features))
                bad_ids.append(next_id)
                sizes[i % len(ids)] += 1
                next_id += 1
        conn.execute(sql.SQL("ANALYZE {}.archived_predictions").format(schema_id))
    return Dataset(tuple(ids), dict(zip(ids, sizes)), tuple(bad_ids))


def drop_target(url: str, schema: str = "public") -> None:
    """Remove modmon's target tables, so a demo rebuilt from new data starts from an empty target."""
    from common.migrations.modmon import CHUNK_STATE, DRIFT_TRACKING, FEATURE_DRIFT, PREDICTION_STATS

    with psycopg.connect(libpq_url(url)) as conn:
        for spec in (PREDICTION_STATS, FEATURE_DRIFT, DRIFT_TRACKING, CHUNK_STATE):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(schema, spec.name)))


_ROWS = """
INSERT INTO {s}.archived_predictions
SELECT %(first)s + g,
       %(dep)s,
       left(%(dep)s, 12) || CASE WHEN r1 < 0.8 THEN 'model000000' ELSE 'model000001' END,
       timestamptz '2026-06-01' + (r2 * %(days)s) * interval '1 day',
       r3,
       CASE WHEN r4 < 0.3 THEN (r5 < r3)::int::float8 END,
       CASE WHEN r4 < 0.6 THEN 'assoc-' || (%(first)s + g) END,
       json_build_object(
           'age', 18 + floor(r5 * 60)::int,
           'income', round((r6 * 150000)::numeric, 2),
           'region', (ARRAY['north', 'south', 'east', 'west', 'central'])[1 + floor(r7 * 5)::int],
           'score', r6 * 10 - 2,
           'is_member', r7 < 0.4,
           'segment', CASE WHEN r1 < 0.1 THEN NULL ELSE 'seg-' || floor(r2 * 14)::int END
       )::text
FROM (SELECT g, random() r1, random() r2, random() r3, random() r4, random() r5, random() r6, random() r7
      FROM generate_series(0, %(n)s - 1) g) s
"""
