"""The two kinds of source a declared migration reads, over the connectors the built-ins use.

    PostgreSQL  a table or a query, read with `postgres.Source.stream` (binary COPY); partitions are the
                partition column's values as text (NULL: `NULL_PARTITION`), chunks are ranges of the
                chunking column [lo, hi), boundaries every `chunk_rows`-th value (JSON text of the value)
    MongoDB     a collection, read with `mongo_source.Source` (partition field, `_id` ranges)

Both answer the same questions: the partitions and their rows, the chunk boundaries, a chunk's rows
(as dicts), and the values a chunk's bounds and partition have, so the target can find the rows it owns.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg.pq import Format

from common.declarative.spec import SourceSpec
from common.errors import ConfigError

NULL_PARTITION = "(null)"
WHOLE = "(all)"  # the one partition of a source without a partition column
_INTEGER_TYPES = {"int2", "int4", "int8"}


@dataclass(frozen=True)
class SourceColumn:
    """A source column as a created target copies it: name, type (with modifiers), and NOT NULL."""

    name: str
    ddl_type: str  # format_type, e.g. "character varying(40)", "numeric(10,2)", "integer[]"
    copy_type: str  # psycopg's name for binary COPY, e.g. "varchar", "int4[]"
    not_null: bool
    oid: int


def encode_bound(value: Any) -> str:
    return json.dumps([value], default=str)


def decode_bound(text: str) -> Any:
    return json.loads(text)[0] if text else None


class PostgresReader:
    """A table or query of a PostgreSQL source."""

    def __init__(self, url: str, spec: SourceSpec) -> None:
        from common.connectors.postgres import Source, identifier

        self.spec = spec
        self.db = Source(url)
        if spec.table is not None:
            self._from: sql.Composable = identifier(spec.table)
        else:
            self._from = sql.SQL("({}) AS q").format(sql.SQL(spec.query.rstrip().rstrip(";")))  # type: ignore[union-attr]
        self._columns: list[SourceColumn] | None = None

    @property
    def what(self) -> str:
        return f"table {self.spec.table}" if self.spec.table else "the query in [source]"

    def check_reachable(self) -> None:
        self.db.check_reachable()

    def close(self) -> None:
        self.db.close()

    def columns(self) -> list[SourceColumn]:
        """The source's columns in order, read from the catalogue (a query's: from its result's description)."""
        if self._columns is None:
            if self.spec.table is not None:
                rows = self.db.query(
                    "SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typname, a.attnotnull, a.atttypid"
                    " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
                    " WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                    [self.spec.table])
                if not rows:
                    raise ConfigError(f"source table {self.spec.table} does not exist in {self.db.public_url}")
            else:
                described = self._describe()
                rows = []
                for name, oid in described:
                    ddl, typname = self.db.query("SELECT format_type(%s, NULL), typname FROM pg_type WHERE oid = %s",
                                                 [oid, oid])[0]
                    rows.append((name, ddl, typname, False, oid))
            self._columns = [SourceColumn(n, ddl, typname[1:] + "[]" if typname.startswith("_") else typname,
                                          bool(nn), int(oid)) for n, ddl, typname, nn, oid in rows]
            names = {c.name for c in self._columns}
            for what, wanted in (("key", self.spec.key), ("partition", (self.spec.partition,)),
                                 ("chunk_by", (self.spec.chunk_by,))):
                missing = [w for w in wanted if w is not None and w not in names]
                if missing:
                    raise ConfigError(f"[source] {what}: column {missing[0]!r} is not in {self.what}; "
                                      f"it has: {', '.join(sorted(names))}")
        return self._columns

    def indexes(self) -> list[tuple[tuple[str, ...], bool]]:
        """The table's plain indexes other than the primary key: (columns in order, unique). Indexes on
        expressions or with a WHERE are left out (their text would name source columns)."""
        if self.spec.table is None:
            return []
        rows = self.db.query(
            "SELECT i.indisunique, array_agg(a.attname::text ORDER BY k.ord) FROM pg_index i"
            " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            " WHERE i.indrelid = to_regclass(%s) AND NOT i.indisprimary AND i.indexprs IS NULL"
            " AND i.indpred IS NULL GROUP BY i.indexrelid, i.indisunique ORDER BY i.indexrelid", [self.spec.table])
        return [(tuple(columns), bool(unique)) for unique, columns in rows]

    def _describe(self) -> list[tuple[str, int]]:
        from common.connectors.postgres import translate_errors

        with translate_errors(f"source {self.db.public_url}"):
            conn = self.db.connection()
            try:
                cur = conn.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(self._from))
                return [(d.name, d.type_code) for d in cur.description or ()]
            finally:
                conn.rollback()

    @property
    def partition_is_integer(self) -> bool:
        return any(c.name == self.spec.partition and c.copy_type in _INTEGER_TYPES for c in self.columns())

    def partition_value(self, label: str) -> Any:
        """The partition's value as stored (the label is its text)."""
        if label == NULL_PARTITION:
            return None
        return int(label) if self.partition_is_integer else label

    def _in_partition(self, label: str) -> sql.Composable:
        if self.spec.partition is None:
            return sql.SQL("TRUE")
        if label == NULL_PARTITION:
            return sql.SQL("{} IS NULL").format(sql.Identifier(self.spec.partition))
        return sql.SQL("{} = {}").format(sql.Identifier(self.spec.partition), sql.Literal(self.partition_value(label)))

    def count(self, partitions: Sequence[str] | None) -> dict[str, int]:
        if self.spec.partition is None:
            total = self.db.query(sql.SQL("SELECT count(*) FROM {}").format(self._from))[0][0]
            return {WHOLE: int(total)}
        rows = self.db.query(sql.SQL("SELECT {}::text, count(*) FROM {} GROUP BY 1").format(
            sql.Identifier(self.spec.partition), self._from))
        counts = {(label if label is not None else NULL_PARTITION): int(n) for label, n in rows}
        return counts if partitions is None else {p: counts[p] for p in partitions if p in counts}

    def boundaries(self, partition: str, chunk_rows: int) -> list[str]:
        """The chunking value starting every `chunk_rows`-th row of the partition, in order, each once."""
        column = sql.Identifier(self.spec.chunk_by)
        rows = self.db.query(sql.SQL(
            "SELECT v FROM (SELECT {c} AS v, row_number() OVER (ORDER BY {c}) AS rn FROM {f} WHERE {p}"
            " AND {c} IS NOT NULL) s WHERE rn > 1 AND rn %% %s = 1 ORDER BY rn"
        ).format(c=column, f=self._from, p=self._in_partition(partition)), [chunk_rows])
        return [encode_bound(v) for v in dict.fromkeys(v for (v,) in rows)]

    def in_range(self, column: str, lo: str, hi: str) -> sql.Composable:
        """`column` in [lo, hi) (values inlined as literals; an empty bound is open)."""
        conditions: list[sql.Composable] = [sql.SQL("TRUE")]
        for bound, op in ((lo, ">="), (hi, "<")):
            if bound:
                conditions.append(sql.SQL("{} " + op + " {}").format(sql.Identifier(column),
                                                                      sql.Literal(decode_bound(bound))))
        if not lo:  # the first chunk of a partition also owns rows whose chunking value is NULL
            return sql.SQL("({} OR {} IS NULL)").format(sql.SQL(" AND ").join(conditions), sql.Identifier(column))
        return sql.SQL(" AND ").join(conditions)

    def within(self, values: list[Any], lo: Any, hi: Any) -> list[bool]:
        """Whether each chunking value lies in [lo, hi) as this database orders the column (its type and
        collation), for a target that orders values otherwise."""
        column = next(c for c in self.columns() if c.name == self.spec.chunk_by)
        conditions: list[sql.Composable] = [sql.SQL("TRUE")]
        params: list[Any] = [list(range(len(values))), values]
        for bound, op in ((lo, ">="), (hi, "<")):
            if bound is not None:
                conditions.append(sql.SQL("v " + op + " %s::{}").format(sql.SQL(column.ddl_type)))
                params.append(bound)
        inside = {i for (i,) in self.db.query(sql.SQL(
            "SELECT i FROM unnest(%s::int[], %s::{}[]) AS c(i, v) WHERE {}").format(
                sql.SQL(column.ddl_type), sql.SQL(" AND ").join(conditions)), params)}
        return [i in inside for i in range(len(values))]

    def chunk_select(self, columns: sql.Composable, partition: str, lo: str, hi: str) -> sql.Composable:
        """`SELECT columns` of a chunk's rows: its partition and its range of the chunking column."""
        return sql.SQL("SELECT {} FROM {} WHERE {} AND {}").format(
            columns, self._from, self._in_partition(partition), self.in_range(self.spec.chunk_by, lo, hi))

    def rows(self, partition: str, lo: str, hi: str, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """The chunk's rows as dicts, streamed by binary COPY; columns psycopg cannot read in binary as text."""
        columns = self.columns()
        adapters = self.db.connection().adapters
        selected, types = [], []
        for c in columns:
            if adapters.get_loader(c.oid, Format.BINARY) is None:
                selected.append(sql.SQL("{}::text").format(sql.Identifier(c.name)))
                types.append("text")
            else:
                selected.append(sql.Identifier(c.name))
                types.append(c.copy_type)
        query = self.chunk_select(sql.SQL(", ").join(selected), partition, lo, hi)
        if limit is not None:
            query = sql.SQL("{} LIMIT {}").format(query, sql.Literal(limit))
        names = [c.name for c in columns]
        for row in self.db.stream(query, types):
            yield dict(zip(names, row))


class MongoReader:
    """A collection of a MongoDB source, read by partition field and `_id` range."""

    def __init__(self, url: str, spec: SourceSpec) -> None:
        from common.connectors.mongo_source import Source

        self.spec = spec
        self.db = Source(url, spec.collection or "", partition_field=spec.partition)
        self.partition_is_integer = False

    def check_reachable(self) -> None:
        self.db.check_reachable()

    def close(self) -> None:
        self.db.close()

    def columns(self) -> list[SourceColumn]:
        return []  # documents have no fixed columns

    def partition_value(self, label: str) -> Any:
        return label

    def count(self, partitions: Sequence[str] | None) -> dict[str, int]:
        from common.connectors.mongo_source import WHOLE as MONGO_WHOLE

        counts = self.db.count_partitions(partitions)
        return {WHOLE if k == MONGO_WHOLE else k: v for k, v in counts.items()}

    def boundaries(self, partition: str, chunk_rows: int) -> list[str]:
        return self.db.boundaries(partition, chunk_rows)

    def owns_deletes(self, partition: str) -> bool:
        """Whether a chunk of `partition` can find its own documents in the target (not the documents
        whose partition field is missing or not text: those have no value to look them up by)."""
        from common.connectors.mongo_source import NO_PARTITION

        return partition != NO_PARTITION

    def rows(self, partition: str, lo: str, hi: str, limit: int | None = None) -> Iterator[dict[str, Any]]:
        read = 0
        for documents in self.db.read(partition, lo, hi, min(limit or 1_000, 1_000)):
            for document in documents:
                if limit is not None and read >= limit:
                    return
                read += 1
                yield document


def decode_mongo_bound(text: str) -> Any:
    from common.connectors.mongo_source import decode_id

    return decode_id(text) if text else None


def open_reader(url: str, spec: SourceSpec) -> PostgresReader | MongoReader:
    return MongoReader(url, spec) if spec.kind == "mongo" else PostgresReader(url, spec)
