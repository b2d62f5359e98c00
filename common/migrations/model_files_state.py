"""What `model-files` recorded about each file when it read it: the table `shuttle_model_files`.

    source_path   PRIMARY KEY   the file (root + relative path)
    name, event, model_type     the model it names
    size, mtime_ns              its status (stat) just before it was read
    content_hash                the SHA-256 of the bytes read, the version's `content_hash`

Written in the same transaction as the versions it describes, so it never claims a version that was
rolled back. It serves two readers:

- a re-run skips reading a file whose (size, mtime_ns) are those recorded *and* whose recorded hash is
  a stored version of its model: the hash stays the truth, the status only saves re-reading what it
  already proved (`--recompute` reads every file again);
- verification compares each file's recorded hash and size with the stored version's `content_hash`
  and `octet_length(model_binary)`, which PostgreSQL answers without reading the binaries; the hash was
  taken over the very bytes the worker streamed into that version. `--option verify_bytes=true`
  re-hashes every stored binary as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import psycopg
from psycopg import sql

from common.connectors.postgres import identifier

STATE_TABLE = "shuttle_model_files"
COLUMNS = ("source_path", "name", "event", "model_type", "size", "mtime_ns", "content_hash")
CREATE = """
CREATE TABLE IF NOT EXISTS {table} (
    source_path TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    event TEXT NOT NULL,
    model_type TEXT NOT NULL,
    size BIGINT NOT NULL,
    mtime_ns BIGINT NOT NULL,
    content_hash TEXT NOT NULL
)
"""
# A session's staging table for one chunk's records: filled by COPY, emptied at commit.
STAGE = ("CREATE TEMP TABLE IF NOT EXISTS shuttle_model_files_stage (source_path text, name text, event text,"
         " model_type text, size bigint, mtime_ns bigint, content_hash text) ON COMMIT DELETE ROWS")


class FileRecord(NamedTuple):
    """One row of the state table."""

    source_path: str
    name: str
    event: str
    model_type: str
    size: int
    mtime_ns: int
    content_hash: str


def state_table(models_table: str) -> str:
    """The state table beside `models_table` (same schema)."""
    schema, _, _ = models_table.rpartition(".")
    return f"{schema}.{STATE_TABLE}" if schema else STATE_TABLE


def ensure_state(conn: psycopg.Connection, models_table: str) -> None:
    """Create the state table if absent; idempotent."""
    table = identifier(state_table(models_table))
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"shuttle-models-ddl:{models_table}",))
        conn.execute(sql.SQL(CREATE).format(table=table))
        conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (name)").format(
            sql.Identifier(f"{STATE_TABLE}_name"), table))


def recorded(cur: psycopg.Cursor, models_table: str, names: Sequence[str]) -> dict[str, FileRecord]:
    """The records of these names' files, by path."""
    rows = cur.execute(sql.SQL("SELECT {} FROM {} WHERE name = ANY(%s)").format(
        sql.SQL(", ").join(map(sql.Identifier, COLUMNS)), identifier(state_table(models_table))), (list(names),))
    return {row[0]: FileRecord(*row) for row in rows.fetchall()}


def record(cur: psycopg.Cursor, models_table: str, records: Iterable[FileRecord]) -> None:
    """Upsert records on their path: COPY into the session's staging table, then one guarded
    `INSERT … ON CONFLICT`, so a record already equal is not rewritten."""
    rows = list(records)
    if not rows:
        return
    cur.execute(STAGE)
    with cur.copy(sql.SQL("COPY shuttle_model_files_stage ({}) FROM STDIN").format(
            sql.SQL(", ").join(map(sql.Identifier, COLUMNS)))) as copy:
        for row in rows:
            copy.write_row(row)
    target = identifier(state_table(models_table))
    others = [c for c in COLUMNS if c != "source_path"]
    cur.execute(sql.SQL(
        "INSERT INTO {target} AS s ({cols}) SELECT DISTINCT ON (source_path) {cols} FROM shuttle_model_files_stage"
        " ORDER BY source_path ON CONFLICT (source_path) DO UPDATE SET {sets} WHERE ({old}) IS DISTINCT FROM ({new})"
    ).format(target=target, cols=sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
             sets=sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in others),
             old=sql.SQL(", ").join(sql.SQL("s.{}").format(sql.Identifier(c)) for c in others),
             new=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in others)))
    cur.execute("DELETE FROM shuttle_model_files_stage")  # one record() per transaction needs none; two would


def matching_query(models_table: str) -> sql.Composable:
    """(path, whether a stored version of its model has the recorded hash and size) for the records of
    the paths given as its one parameter (an array).

    Reads the versions' hashes, and their sizes from the TOAST pointers: never the binaries."""
    return sql.SQL(
        "SELECT s.source_path, EXISTS (SELECT 1 FROM {models} m WHERE m.name = s.name AND m.event = s.event"
        " AND m.model_type = s.model_type AND m.content_hash = s.content_hash"
        " AND octet_length(m.model_binary) = s.size) FROM {state} s WHERE s.source_path = ANY(%s)").format(
        models=identifier(models_table), state=identifier(state_table(models_table)))
