"""Small sources for the declared-migration tests: a PostgreSQL table and a MongoDB collection of the same
predictions, a few rows of which break the mapping, and the migration file text that maps them."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg

from common.declarative.loader import parse_spec
from common.declarative.migration import DeclaredMigration, declared_class
from common.migrations.base import Check, Selection
from common.model import ChunkOutcome, WriteCounts

ROWS = 300
DEPLOYMENTS = ("dep-a", "dep-b", "dep-c")
BAD_SCORE_IDS = (7, 150)  # payload.score is not a number: a reject
MISSING_SCORE_IDS = (42,)  # payload has no score: a reject
START = datetime(2024, 3, 1, tzinfo=timezone.utc)


def row(i: int) -> dict[str, Any]:
    score: Any = round(i / ROWS, 4)
    payload: dict[str, Any] = {"score": score, "label": f"l{i % 4}"}
    if i in BAD_SCORE_IDS:
        payload["score"] = "n/a"
    if i in MISSING_SCORE_IDS:
        del payload["score"]
    return {"id": i, "deployment_id": DEPLOYMENTS[i % len(DEPLOYMENTS)],
            "ts_ms": int((START + timedelta(minutes=i)).timestamp() * 1000),
            "email": f"User{i}@Example.COM", "payload": payload, "debug_blob": "x" * 20,
            "note": None if i % 5 else f"note {i}"}


def build_pg_source(url: str, rows: int = ROWS) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("DROP TABLE IF EXISTS archived_predictions")
        conn.execute("CREATE TABLE archived_predictions (id bigint PRIMARY KEY, deployment_id varchar(24) NOT NULL,"
                     " ts_ms bigint NOT NULL, email text, payload jsonb NOT NULL, debug_blob text, note text)")
        with conn.cursor().copy("COPY archived_predictions (id, deployment_id, ts_ms, email, payload, debug_blob, note)"
                                " FROM STDIN") as copy:
            for i in range(1, rows + 1):
                r = row(i)
                copy.write_row((r["id"], r["deployment_id"], r["ts_ms"], r["email"], json.dumps(r["payload"]),
                                r["debug_blob"], r["note"]))
        # Copied by `copy_indexes` (every column reaches the target, one renamed) and left out (ts_ms is derived).
        conn.execute("CREATE INDEX archived_by_deployment ON archived_predictions (deployment_id, id)")
        conn.execute("CREATE INDEX archived_by_time ON archived_predictions (ts_ms)")


def build_mongo_source(collection, rows: int = ROWS) -> None:
    collection.drop()
    docs = []
    for i in range(1, rows + 1):
        r = row(i)
        docs.append({"_id": f"p{i:05d}", **{k: v for k, v in r.items() if k != "id"}, "n": i})
    collection.insert_many(docs)


def migration_file(source: str, target: str, *, source_url: str | None = None, target_url: str | None = None,
                   extra_columns: str = "", options: str = "", name: str = "predictions-compact",
                   key_cast: bool = True) -> str:
    """The file text; `source` / `target` are e.g. 'table = "archived_predictions"' or 'collection = "x"'."""
    mongo_source = source.startswith("collection")
    key = 'key = ["_id"]' if mongo_source else 'key = ["id"]\nchunk_by = "id"'
    cast = ', cast = "text"' if key_cast else ""
    key_column = f'prediction_id = {{ from = "_id"{cast} }}' if mongo_source else 'prediction_id = { from = "id" }'
    return f"""
[migration]
name = "{name}"
summary = "Archived predictions into the compact table"

[source]
{f'url = "{source_url}"' if source_url else ''}
{source}
{key}
partition = "deployment_id"

[target]
{f'url = "{target_url}"' if target_url else ''}
{target}
create = true
indexes = [["deployment_id", "created_at"]]

[columns]
{key_column}
score = {{ from = "payload", path = "$.score", cast = "float" }}
label = {{ from = "payload", path = "$.label", optional = true }}
created_at = {{ from = "ts_ms", transform = "epoch_ms_to_timestamp" }}
region = {{ constant = "eu" }}
email = {{ from = "email", transform = "lower" }}
{extra_columns}

[options]
keep_unmapped = true
drop = ["debug_blob"]
{options}

[validate]
counts = true
sample = 20
"""


def open_declared(text: str, source_url: str, target_url: str, **flags: Any) -> DeclaredMigration:
    cls = declared_class(parse_spec(text, "test.toml"))
    return cls(source_url, target_url, cls.plan_options(**flags))


def migrate(migration: DeclaredMigration, selection: Selection = Selection(), chunk_rows: int = 70
            ) -> tuple[list[ChunkOutcome], list[Check]]:
    """What a run does, in this process: count, cut, prepare, every chunk, finish, verify."""
    counts = migration.count_partitions(selection)
    chunks = list(migration.plan_chunks(selection, chunk_rows))
    migration.prepare_target()
    outcomes = [migration.run_chunk(spec, lambda rows: None) for spec in chunks]
    migration.finish_target()
    rejected: dict[str, int] = {}
    for spec, outcome in zip(chunks, outcomes):
        rejected[spec.partition] = rejected.get(spec.partition, 0) + len(outcome.rejects)
    checks = migration.verify(selection, sorted({c.partition for c in counts}), rejected)
    return outcomes, checks


def totals(outcomes: list[ChunkOutcome]) -> WriteCounts:
    total = WriteCounts()
    for outcome in outcomes:
        total += outcome.totals()
    return total
