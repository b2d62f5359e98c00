"""The versioned `models` table: its schema, and the one way a version is added to it.

Both writers, the `model-files` migration and `save_model` (training code), go through
`versioning()`, so they follow the same rules:

- a model is (name, event, model_type); versions are numbered per name (the table's UNIQUE(name,
  version)), 1, 2, 3, … without gaps;
- content already stored for that model (same SHA-256) is not stored again;
- new content becomes the next version and the model's only active version; earlier versions are kept,
  deactivated, never deleted.

Every write holds a transaction-level advisory lock on (table, name) from reading the greatest version
to commit, so two writers of one name (two workers, a worker and a training job, a chunk delivered
twice) take turns: neither can see a version number the other is about to use, and a rolled-back
writer leaves no gap. The lock is per name, so different names are written in parallel.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from psycopg import sql

from common.connectors.postgres import identifier
from common.errors import ConfigError, DataError
from common.model import WriteCounts

DEFAULT_TABLE = "models"
# The reference schema, plus the content hash (dedupe, integrity) and the file each version came from.
CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    id SERIAL PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    version INTEGER NOT NULL,
    model_type VARCHAR(50) NOT NULL,
    event VARCHAR(255) NOT NULL,
    model_binary BYTEA NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    is_active BOOLEAN DEFAULT TRUE,
    content_hash TEXT,
    source_path TEXT,
    UNIQUE (name, version)
)
"""
#  column          type it must have (an existing table is adopted only if these match)
REQUIRED = {
    "id":           ("integer", "bigint"),
    "name":         ("character varying", "text"),
    "version":      ("integer", "bigint"),
    "model_type":   ("character varying", "text"),
    "event":        ("character varying", "text"),
    "model_binary": ("bytea",),
    "created_at":   ("timestamp without time zone", "timestamp with time zone"),
    "is_active":    ("boolean",),
}
ADDED = {"content_hash": "text", "source_path": "text"}  # added to an adopted table, filled from the binaries
# The columns a new version is written with, in COPY order (id and created_at take their defaults).
COPY_COLUMNS = ("name", "version", "model_type", "event", "model_binary", "is_active", "content_hash", "source_path")
HASH_SQL = "encode(sha256(model_binary), 'hex')"
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TRAILER = struct.pack("!h", -1)
SEND_BYTES = 1 << 20  # what the COPY buffers before sending: memory stays bounded by it plus one block


def ensure_table(conn: psycopg.Connection, table: str = DEFAULT_TABLE) -> dict[str, int]:
    """Create the table if absent, or adopt an existing one of the reference schema (adding the hash and
    path columns, hashing rows that have none). Returns the length limits of the text columns.

    Idempotent, and serialised by an advisory lock so workers and the producer may all call it."""
    target = identifier(table)
    schema, _, _ = table.rpartition(".")
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"shuttle-models-ddl:{table}",))
        if schema:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(identifier(schema)))
        created = conn.execute("SELECT to_regclass(%s) IS NULL", (target.as_string(conn),)).fetchone()[0]
        conn.execute(sql.SQL(CREATE_TABLE).format(table=target))
        if created:
            _prefer_lz4(conn, target)
        found = _columns(conn, table)
        wrong = sorted(c for c, types in REQUIRED.items() if c not in found or found[c][0] not in types)
        if wrong:
            raise ConfigError(f"table {table} exists but not with the models schema (columns missing or of another "
                              f"type: {', '.join(wrong)}); point --target-schema elsewhere or fix that table")
        for column, kind in ADDED.items():
            if column not in found:
                conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                    target, sql.Identifier(column), sql.SQL(kind)))
        conn.execute(sql.SQL("UPDATE {} SET content_hash = " + HASH_SQL + " WHERE content_hash IS NULL").format(target))
    return {c: limit for c, (_, limit) in found.items() if limit}


def _prefer_lz4(conn: psycopg.Connection, target: sql.Composable) -> None:
    """New tables compress model_binary with lz4 where the server has it (PostgreSQL 14+ built with lz4):
    measured here 3.4× faster to write than the default pglz, which spends its time trying to compress
    the mostly incompressible arrays models hold. Reading needs nothing: each value records its method."""
    try:
        with conn.transaction():
            conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN model_binary SET COMPRESSION lz4").format(target))
    except (psycopg.errors.FeatureNotSupported, psycopg.errors.SyntaxError, psycopg.errors.InvalidParameterValue):
        pass  # an older or lz4-less server keeps its default compression


def column_limits(conn: psycopg.Connection, table: str = DEFAULT_TABLE) -> dict[str, int]:
    """Length limits of the table's varchar columns (a value over its limit is a reject, not a failed chunk)."""
    with conn.transaction():
        return {c: limit for c, (_, limit) in _columns(conn, table).items() if limit}


def _columns(conn: psycopg.Connection, table: str) -> dict[str, tuple[str, int | None]]:
    """column → (type name without modifiers, varchar length limit or None)."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, NULL),"
        " CASE WHEN a.atttypid = 'varchar'::regtype AND a.atttypmod > 4 THEN a.atttypmod - 4 END"
        " FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
        (identifier(table).as_string(conn),)).fetchall()
    return {name: (kind, limit) for name, kind, limit in rows}


@dataclass
class Version:
    """One stored version, without its binary."""

    name: str
    version: int
    event: str
    model_type: str
    is_active: bool
    created_at: datetime
    size: int
    content_hash: str
    source_path: str | None

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "event": self.event, "model_type": self.model_type,
                "is_active": self.is_active, "created_at": self.created_at.isoformat(sep=" ", timespec="seconds"),
                "size": self.size, "content_hash": self.content_hash, "source_path": self.source_path}


@dataclass
class NameWriter:
    """Adds versions of one or more names inside a transaction that holds each name's lock (see `versioning`).

    `name` is the only name (`save_model`) or None when the writer holds several (a chunk of the
    migration packs many small names into one transaction); then every call names its own."""

    cur: psycopg.Cursor
    table: str
    name: str | None
    limits: dict[str, int]
    known: dict[tuple[str, str, str, str], int]  # (name, event, model_type, content hash) → version
    next_version: dict[str, int]  # name → its next version number
    counts: WriteCounts = field(default_factory=WriteCounts)
    newest: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (name, event, model_type) → version added
    _stack: ExitStack = field(default_factory=ExitStack)
    _copy: psycopg.Copy | None = None
    _pending: bytearray = field(default_factory=bytearray)

    def _name(self, name: str | None) -> str:
        chosen = name if name is not None else self.name
        if chosen is None or chosen not in self.next_version:
            raise ValueError(f"this writer does not hold the lock of name {chosen!r}")
        return chosen

    def check(self, event: str, model_type: str, name: str | None = None) -> None:
        """A DataError when the name, event or type cannot be stored (too long for its column, not UTF-8)."""
        for column, value in (("name", self._name(name)), ("event", event), ("model_type", model_type)):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{column} {value!r} is not valid UTF-8") from None
            limit = self.limits.get(column)
            if limit is not None and len(value) > limit:
                raise DataError(f"{column} {value!r} is longer than {limit} characters (the table's limit)")

    def stored(self, event: str, model_type: str, content_hash: str, name: str | None = None) -> int | None:
        """The version already holding this content for this model, if any."""
        return self.known.get((self._name(name), event, model_type, content_hash))

    def add(self, event: str, model_type: str, content_hash: str, size: int, blocks: Iterable[bytes],
            source_path: str | None, name: str | None = None) -> int:
        """Store `blocks` (exactly `size` bytes hashing to `content_hash`) as the next version, or return the
        version already holding that content. Streams through binary COPY: one block in memory at a time."""
        name = self._name(name)
        self.check(event, model_type, name)
        existing = self.stored(event, model_type, content_hash, name)
        if existing is not None:
            self.counts.unchanged += 1
            return existing
        version = self.next_version[name]
        self._open_copy()
        self._put(struct.pack("!h", len(COPY_COLUMNS)) + _text(name) + struct.pack("!ii", 4, version)
                  + _text(model_type) + _text(event) + struct.pack("!i", size))
        for block in blocks:
            self._put(block)
        self._put(struct.pack("!ib", 1, 1) + _text(content_hash) + _text(source_path))
        self.next_version[name] = version + 1
        self.known[(name, event, model_type, content_hash)] = version
        self.newest[(name, event, model_type)] = version
        self.counts.inserted += 1
        return version

    def _put(self, data: bytes) -> None:
        """Small pieces (row headers, small files) are sent together: each send waits for the socket."""
        if len(data) >= SEND_BYTES:  # a large block goes as it is, never copied into the buffer
            if self._pending:
                self._copy.write(self._pending)
                self._pending = bytearray()
            self._copy.write(data)
            return
        self._pending += data
        if len(self._pending) >= SEND_BYTES:
            self._copy.write(self._pending)
            self._pending = bytearray()

    def _open_copy(self) -> psycopg.Copy:
        if self._copy is None:
            self._copy = self._stack.enter_context(self.cur.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                identifier(self.table), sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS)))))
            self._copy.write(_COPY_SIGNATURE)
        return self._copy

    def end_copy(self) -> None:
        """End the COPY of new versions, so the transaction can run other statements; idempotent."""
        if self._copy is not None:
            self._put(_COPY_TRAILER)
            self._copy.write(self._pending)
            self._pending = bytearray()
            self._stack.close()
            self._copy = None

    def finish(self) -> int:
        """End the COPY and make each model's newest version its only active one; returns rows deactivated."""
        self.end_copy()
        if not self.newest:
            return 0
        names, events, types, versions = zip(*((n, e, t, v) for (n, e, t), v in sorted(self.newest.items())))
        self.cur.execute(sql.SQL(
            "UPDATE {} m SET is_active = false FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[])"
            " n(name, event, model_type, v) WHERE m.name = n.name AND m.event = n.event"
            " AND m.model_type = n.model_type AND m.version < n.v AND m.is_active IS NOT false"
        ).format(identifier(self.table)), (list(names), list(events), list(types), list(versions)))
        return self.cur.rowcount

    def abort(self, exc: BaseException) -> None:
        """Fail the COPY (the server discards it); the transaction then rolls back."""
        self._stack.__exit__(type(exc), exc, exc.__traceback__)
        self._copy = None


@contextmanager
def versioning(conn: psycopg.Connection, names: str | Sequence[str], table: str = DEFAULT_TABLE,
               limits: dict[str, int] | None = None) -> Iterator[NameWriter]:
    """A transaction holding the lock of `names` (one name, or several), with what is stored for them;
    commits when the block ends.

    Several names are locked in sorted order, so two writers of overlapping sets cannot deadlock."""
    target = identifier(table)
    wanted = sorted({names} if isinstance(names, str) else set(names))
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT count(pg_advisory_xact_lock(hashtextextended(%s || n, 0))) FROM unnest(%s::text[]) n",
                    (f"shuttle-models:{table}:", wanted))
        # Versions another writer stored without a hash (code predating the column) get one first.
        cur.execute(sql.SQL("UPDATE {} SET content_hash = " + HASH_SQL + " WHERE name = ANY(%s) AND content_hash IS NULL")
                    .format(target), (wanted,))
        cur.execute(sql.SQL("SELECT name, event, model_type, content_hash, version FROM {} WHERE name = ANY(%s)")
                    .format(target), (wanted,))
        known: dict[tuple[str, str, str, str], int] = {}
        top = dict.fromkeys(wanted, 0)
        for name, event, model_type, content_hash, version in cur.fetchall():
            known.setdefault((name, event, model_type, content_hash), version)
            top[name] = max(top[name], version)
        writer = NameWriter(cur, table, names if isinstance(names, str) else None, limits or {}, known,
                            {name: v + 1 for name, v in top.items()})
        try:
            yield writer
        except BaseException as exc:
            writer.abort(exc)
            raise
        writer.finish()


def list_versions(conn: psycopg.Connection, table: str = DEFAULT_TABLE, name: str | None = None,
                  event: str | None = None, model_type: str | None = None) -> list[Version]:
    """Stored versions (never their binaries), by name then version."""
    conditions, params = [sql.SQL("TRUE")], []
    for column, value in (("name", name), ("event", event), ("model_type", model_type)):
        if value is not None:
            conditions.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            params.append(value)
    rows = conn.execute(sql.SQL(
        "SELECT name, version, event, model_type, coalesce(is_active, true), created_at, octet_length(model_binary),"
        " content_hash, source_path FROM {} WHERE {} ORDER BY name, version").format(
        identifier(table), sql.SQL(" AND ").join(conditions)), params).fetchall()
    return [Version(*row) for row in rows]


def _text(value: str | None) -> bytes:
    if value is None:
        return struct.pack("!i", -1)
    data = value.encode("utf-8")
    return struct.pack("!i", len(data)) + data
