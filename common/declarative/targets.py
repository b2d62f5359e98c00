"""The two kinds of target a declared migration writes, over the sinks the built-ins use.

    PostgreSQL  `postgres.Sink.upsert` (COPY → temp table → guarded `INSERT … ON CONFLICT`), the chunk's
                owned rows that the source no longer yields deleted in the same transaction. A created
                table keeps the source's column types, NOT NULL and the key as primary key.
    MongoDB     `mongo.Sink.upsert_documents` (`_id`-keyed unordered bulk writes, identical documents left
                alone); the chunk's owned documents the source no longer yields deleted by `_id`. The key
                gets a unique index (built after the load, with the declared ones).

A chunk owns (partition value, chunking value in [lo, hi)) of the target.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from decimal import Decimal
from typing import Any

from common.declarative.spec import MigrationSpec
from common.errors import ConfigError
from common.model import Reject, WriteCounts

_TYPE_TEXT = re.compile(r'^[A-Za-z0-9 _",()\[\]]+$')


@dataclass(frozen=True)
class TargetColumn:
    name: str
    ddl_type: str
    copy_type: str
    not_null: bool = False


@dataclass(frozen=True)
class Owned:
    """The part of the target a chunk owns: its partition's value (None: no partition or NULL) and the
    chunking column's [lo, hi) as values (None: open)."""

    partition_column: str | None
    partition_value: Any
    chunk_column: str
    lo: Any
    hi: Any
    byte_order: bool = False  # compare text byte-wise, as MongoDB orders the `_id`s the chunk was cut at


class PostgresWriter:
    def __init__(self, url: str, spec: MigrationSpec) -> None:
        from common.connectors.postgres import Sink

        self.spec = spec
        self.sink = Sink(url)
        self.table_name = spec.target.table or ""
        self.table = None  # TableSpec, once prepared

    def check_reachable(self) -> None:
        self.sink.check_reachable()

    def close(self) -> None:
        self.sink.close()

    def existing_columns(self) -> list[tuple[str, str, str]]:
        """(name, format_type, copy type name) of the target table, [] when it does not exist."""
        rows = self.sink.query(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typname FROM pg_attribute a"
            " JOIN pg_type t ON t.oid = a.atttypid WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0"
            " AND NOT a.attisdropped ORDER BY a.attnum", [self.table_name])
        return [(n, ddl, typname[1:] + "[]" if typname.startswith("_") else typname) for n, ddl, typname in rows]

    def is_empty(self) -> bool:
        from common.connectors.postgres import identifier

        if not self.existing_columns():
            return True
        return not self.sink.query(sql_text("SELECT 1 FROM {} LIMIT 1", identifier(self.table_name)))

    def prepare(self, columns: list[TargetColumn]) -> None:
        """Create the table if absent (when the file allows), else check it holds every column and the key."""
        from psycopg import sql

        from common.connectors.base import Column, TableSpec
        from common.connectors.postgres import identifier

        key = self.spec.target_key
        names = {c.name for c in columns}
        for index in self.spec.target.indexes:
            unknown = [c for c in index if c not in names]
            if unknown:
                raise ConfigError(f"[target] indexes: {unknown[0]!r} is not a column of the target; its columns: "
                                  f"{', '.join(c.name for c in columns)}")
        existing = self.existing_columns()
        if not existing:
            if not self.spec.target.create:
                raise ConfigError(f"target table {self.table_name} does not exist in {self.sink.public_url} and "
                                  "[target] create = false; create it, or set create = true")
            for c in columns:
                if not _TYPE_TEXT.match(c.ddl_type):
                    raise ConfigError(f"column {c.name}: type {c.ddl_type!r} cannot be created")
            schema = self.table_name.rpartition(".")[0]
            statements = [sql.SQL("SELECT pg_advisory_xact_lock(hashtext({}))").format(sql.Literal(self.table_name))]
            if schema:
                statements.append(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(identifier(schema)))
            statements.append(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(
                identifier(self.table_name),
                sql.SQL(", ").join(sql.SQL("{} {}{}").format(sql.Identifier(c.name), sql.SQL(c.ddl_type),
                                                            sql.SQL(" NOT NULL" if c.not_null else ""))
                                   for c in columns),
                sql.SQL(", ").join(sql.Identifier(k) for k in key)))
            self.sink.execute(sql.SQL("; ").join(statements))
            existing = self.existing_columns()
        found = {n: copy for n, _, copy in existing}
        missing = [c.name for c in columns if c.name not in found]
        if missing:
            raise ConfigError(f"target table {self.table_name} in {self.sink.public_url} has no column(s) "
                              f"{', '.join(missing)}; add them, or map them elsewhere in [columns]")
        unique = self.sink.query(
            "SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_index i JOIN pg_attribute a"
            " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) WHERE i.indrelid = to_regclass(%s)"
            " AND i.indisunique GROUP BY i.indexrelid", [self.table_name])
        if sorted(key) not in [sorted(u) for (u,) in unique]:
            raise ConfigError(f"target table {self.table_name} has no primary key or unique index on "
                              f"({', '.join(key)}), which every upsert is keyed on; add one")
        self.table = TableSpec(self.table_name, tuple(Column(c.name, found[c.name]) for c in columns), key)

    def finish(self, copied: Sequence[tuple[tuple[str, ...], bool]] = ()) -> dict[tuple[str, ...], str]:
        """The declared indexes and the source's `copied` ones (columns, unique), built after the load;
        idempotent. Returns those the server refused (e.g. a unique one over duplicates), with the reason."""
        import psycopg
        from psycopg import sql

        from common.connectors.postgres import identifier

        refused: dict[tuple[str, ...], str] = {}
        wanted = [(tuple(c), False) for c in self.spec.target.indexes] + list(copied)
        for columns, unique in dict.fromkeys(wanted):
            try:
                self.sink.execute(sql.SQL("CREATE {}INDEX IF NOT EXISTS {} ON {} ({})").format(
                    sql.SQL("UNIQUE " if unique else ""), sql.Identifier(index_name(self.table_name, columns)),
                    identifier(self.table_name), sql.SQL(", ").join(sql.Identifier(c) for c in columns)))
            except psycopg.errors.UniqueViolation as exc:
                refused[columns] = str(exc).splitlines()[0]
        return refused

    def write(self, rows: list[tuple], owned: Owned | None) -> tuple[WriteCounts, list[Reject]]:
        """Upsert rows (tuples in the table's column order); with `owned`, the owned rows not among them go."""
        assert self.table is not None, "prepare() first"
        return self.sink.upsert(self.table, rows, owned=self.owned_sql(owned) if owned is not None else None), []

    @staticmethod
    def owned_sql(owned: Owned):
        from psycopg import sql

        conditions: list[Any] = [sql.SQL("TRUE")]
        if owned.partition_column is not None:
            conditions.append(sql.SQL("{} IS NULL").format(sql.Identifier(owned.partition_column))
                              if owned.partition_value is None else
                              sql.SQL("{} = {}").format(sql.Identifier(owned.partition_column),
                                                        sql.Literal(owned.partition_value)))
        collate = sql.SQL(' COLLATE "C"' if owned.byte_order else "")
        for value, op in ((owned.lo, ">="), (owned.hi, "<")):
            if value is not None:
                conditions.append(sql.SQL("{}{} " + op + " {}").format(sql.Identifier(owned.chunk_column), collate,
                                                                        sql.Literal(_plain(value))))
        return sql.SQL(" AND ").join(conditions)

    def counts(self, partition_column: str | None, none_label: str) -> dict[str, int]:
        from psycopg import sql

        from common.connectors.postgres import identifier

        if not self.existing_columns():
            return {}
        if partition_column is None:
            return {none_label: int(self.sink.query(sql_text("SELECT count(*) FROM {}", identifier(self.table_name)))[0][0])}
        rows = self.sink.query(sql.SQL("SELECT {}::text, count(*) FROM {} GROUP BY 1").format(
            sql.Identifier(partition_column), identifier(self.table_name)))
        return {(p if p is not None else none_label): int(n) for p, n in rows}

    def checksum(self, partition_column: str | None, value: Any, columns: Sequence[str]) -> str:
        """An order-independent content hash of a partition's rows over `columns`."""
        from psycopg import sql

        from common.connectors.postgres import identifier

        where = sql.SQL("TRUE") if partition_column is None else (
            sql.SQL("{} IS NULL").format(sql.Identifier(partition_column)) if value is None else
            sql.SQL("{} = {}").format(sql.Identifier(partition_column), sql.Literal(value)))
        return str(self.sink.query(sql.SQL(
            "SELECT count(*) || ':' || coalesce(sum(hashtextextended(row({})::text, 0)::numeric), 0) FROM {} WHERE {}"
        ).format(sql.SQL(", ").join(sql.Identifier(c) for c in columns), identifier(self.table_name), where))[0][0])

    def fetch(self, key_values: Sequence[tuple]) -> dict[tuple, dict[str, Any]]:
        """Target rows by key, for the sampled comparison."""
        from psycopg import sql

        from common.connectors.postgres import identifier

        if not key_values:
            return {}
        key = self.spec.target_key
        rows: dict[tuple, dict[str, Any]] = {}
        names = [n for n, _, _ in self.existing_columns()]
        for values in key_values:
            found = self.sink.query(sql.SQL("SELECT * FROM {} WHERE {}").format(
                identifier(self.table_name),
                sql.SQL(" AND ").join(sql.SQL("{} = {}").format(sql.Identifier(k), sql.Literal(v))
                                      for k, v in zip(key, values))))
            if found:
                rows[tuple(values)] = dict(zip(names, found[0]))
        return rows


class MongoWriter:
    def __init__(self, url: str, spec: MigrationSpec, batch_size: int | None = None) -> None:
        from common.connectors.mongo import MIN_BATCH, Sink

        self.spec = spec
        self.sink = Sink(url, batch_size=batch_size or MIN_BATCH)
        self.collection = spec.target.collection or ""
        self.key = spec.target_key

    def check_reachable(self) -> None:
        self.sink.check_reachable()

    def close(self) -> None:
        self.sink.close()

    def is_empty(self) -> bool:
        from common.connectors.mongo import translate_errors

        with translate_errors(f"target {self.sink.public_url}"):
            return self.sink.db[self.collection].find_one({}, {"_id": 1}) is None

    def prepare(self, columns: list[TargetColumn]) -> None:
        if not self.spec.target.create:
            from common.connectors.mongo import translate_errors

            with translate_errors(f"target {self.sink.public_url}"):
                if self.collection not in self.sink.db.list_collection_names():
                    raise ConfigError(f"target collection {self.collection} does not exist in {self.sink.public_url} "
                                      "and [target] create = false; create it, or set create = true")
        self.sink.ensure_collections([self.collection])

    def indexes(self, copied: Sequence[tuple[tuple[str, ...], bool]] = ()) -> list[Any]:
        from common.connectors.mongo import Index

        wanted = []
        if self.key != ("_id",):
            wanted.append(Index(tuple((k, 1) for k in self.key), unique=True))
        wanted += [Index(tuple((c, 1) for c in columns)) for columns in self.spec.target.indexes]
        wanted += [Index(tuple((c, 1) for c in columns), unique) for columns, unique in copied]
        return list(dict.fromkeys(wanted))

    def finish(self, copied: Sequence[tuple[tuple[str, ...], bool]] = ()) -> dict[tuple[str, ...], str]:
        """The unique key index, the declared and the `copied` ones, after the load; returns those the
        server refused, with its reason."""
        refused = self.sink.ensure_indexes(self.collection, self.indexes(copied))
        return {tuple(k for k, _ in index.keys): reason for index, reason in refused.items()}

    def document(self, row: dict[str, Any]) -> dict[str, Any]:
        from common.migrations.mlflow_mapping import document_id

        values = tuple(row.get(k) for k in self.key)
        if "_id" in self.key:
            doc_id = row["_id"]
        elif len(values) == 1 and type(values[0]) in (str, int):
            doc_id = values[0]
        else:
            doc_id = document_id(tuple(_plain(v) for v in values))
        return {"_id": doc_id, **{k: bson_value(v) for k, v in row.items() if k != "_id"}}

    def write(self, rows: list[dict[str, Any]], owned: Owned | None, seen: set[Any] | None = None,
              in_range: Callable[[list[Any], Any, Any], list[bool]] | None = None) -> tuple[WriteCounts, list[Reject]]:
        """Upsert `rows` (already documents); with `owned`, delete the owned documents whose `_id` is not in
        `seen`. `in_range` decides which documents lie in the chunk's range when MongoDB cannot (a source
        that orders the chunking values otherwise, e.g. text under a PostgreSQL collation)."""
        result = self.sink.upsert_documents(self.collection, rows, entity=self.spec.name, key=self.key) \
            if rows else None
        counts = result.counts if result is not None else WriteCounts()
        rejects = result.rejects if result is not None else []
        if owned is not None:
            counts.deleted += self._delete_stale(owned, seen or set(), in_range)
        return counts, rejects

    def _delete_stale(self, owned: Owned, seen: set[Any],
                      in_range: Callable[[list[Any], Any, Any], list[bool]] | None) -> int:
        from common.connectors.mongo import translate_errors

        query: dict[str, Any] = {}
        if owned.partition_column is not None:
            if owned.partition_value is None:
                return 0  # `{field: None}` with a range is answered wrongly by a stand-in (DESIGN §5): not owned
            query[owned.partition_column] = owned.partition_value
        bounds = {op: bson_value(v) for op, v in (("$gte", owned.lo), ("$lt", owned.hi)) if v is not None}
        numeric = all(type(v) in (int, float) for v in bounds.values())
        if bounds and (in_range is None or numeric):
            query[owned.chunk_column] = bounds
            in_range = None
        projection = {"_id": 1, owned.chunk_column: 1}
        with translate_errors(f"target {self.sink.public_url}"):
            candidates = [d for d in self.sink.db[self.collection].find(query, projection) if d["_id"] not in seen]
        if in_range is not None and bounds and candidates:
            inside = in_range([d.get(owned.chunk_column) for d in candidates], owned.lo, owned.hi)
            candidates = [d for d, keep in zip(candidates, inside) if keep]
        stale = [d["_id"] for d in candidates]
        return self.sink.delete_ids(self.collection, stale) if stale else 0

    def counts(self, partition_column: str | None, none_label: str) -> dict[str, int]:
        from common.connectors.mongo import translate_errors

        with translate_errors(f"target {self.sink.public_url}"):
            if partition_column is None:
                return {none_label: self.sink.db[self.collection].count_documents({})}
            counts: dict[str, int] = {}
            for group in self.sink.db[self.collection].aggregate(
                    [{"$group": {"_id": f"${partition_column}", "n": {"$sum": 1}}}]):
                label = str(group["_id"]) if group["_id"] not in (None, "") else none_label
                counts[label] = counts.get(label, 0) + int(group["n"])
        return counts

    def fetch(self, ids: Sequence[Any]) -> dict[Any, dict[str, Any]]:
        found = {}
        for doc in self.sink.find(self.collection, {"_id": {"$in": list(ids)}}):
            found[doc["_id"]] = doc
        return found


def index_name(table: str, columns: Iterable[str]) -> str:
    columns = list(columns)
    digest = hashlib.blake2b(f"{table}:{','.join(columns)}".encode(), digest_size=4).hexdigest()
    return f"{table.rpartition('.')[2][:30]}_{'_'.join(columns)[:20]}_{digest}_idx"


def sql_text(template: str, *parts: Any):
    from psycopg import sql

    return sql.SQL(template).format(*parts)


def _plain(value: Any) -> Any:
    """A bound's value as the target compares it: ObjectIds as their hex text."""
    from bson.objectid import ObjectId

    return str(value) if isinstance(value, ObjectId) else value


def bson_value(value: Any) -> Any:
    """A value BSON can store: Decimals as Decimal128, dates as datetimes, tuples as lists."""
    kind = type(value)
    if kind in (str, int, float, bool, type(None)):
        return value
    if kind is datetime:
        # What BSON keeps: UTC, milliseconds, no zone; stored so, an unchanged row compares equal on a re-run.
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value.replace(microsecond=value.microsecond // 1000 * 1000)
    if isinstance(value, dict):
        return {str(k): bson_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [bson_value(v) for v in value]
    if isinstance(value, Decimal):
        from bson.decimal128 import Decimal128

        return Decimal128(value)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day)
    if isinstance(value, (memoryview, bytearray)):
        return bytes(value)
    if isinstance(value, time):
        return value.isoformat()
    if kind.__module__.startswith("bson") or isinstance(value, bytes):
        return value
    return str(value)  # UUID, IP addresses, ranges …


def open_writer(url: str, spec: MigrationSpec, batch_size: int | None = None) -> PostgresWriter | MongoWriter:
    """The target's writer; `batch_size` (--batch-size) sets MongoDB's documents per bulk write (a PostgreSQL
    chunk is one transaction, whatever its size)."""
    return MongoWriter(url, spec, batch_size) if spec.target.kind == "mongo" else PostgresWriter(url, spec)
