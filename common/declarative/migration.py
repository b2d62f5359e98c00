"""The generic migration a TOML file declares: one catalogue entry per file, rebuilt from the run's options.

    plan        partitions = the partition column's values (or one, "(all)"); chunks = ranges of the
                chunking column cut every `chunk_rows` rows, boundaries from the data
    chunk       read the range (binary COPY / cursor), map every row (`mapping.Mapper`), upsert on the
                key; the target's rows of the range that the source no longer yields are deleted
                (unless keep_deleted); a row that breaks the mapping is a reject with key and reason,
                and its earlier copy in the target is deleted with the others (the target holds what
                the source yields and the mapping accepts, so counts add up)
    verify      per partition: source rows = target rows + rejects; `sample` rows compared field by field

The whole spec travels in the run's options (`declared`), so a worker needs no file: only the
passwords, from its own settings or from the `${ENV_VAR}`s the file's URLs name, expanded in its environment.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from common.declarative.loader import expand_env
from common.declarative.mapping import CASTS, TRANSFORMS, Mapper, MappingError, jsonable
from common.declarative.sources import (NULL_PARTITION, WHOLE, PostgresReader, decode_bound, decode_mongo_bound,
                                        open_reader)
from common.declarative.spec import MigrationSpec
from common.declarative.targets import MongoWriter, Owned, PostgresWriter, TargetColumn, bson_value, open_writer
from common.errors import ConfigError
from common.migrations.base import Check, Migration, ProgressCallback, Selection
from common.model import ChunkOutcome, ChunkSpec, PartitionCount, Reject, WriteCounts
from common.urls import with_password
from common.write_behind import WriteBehind

PROGRESS_EVERY = 5_000
# Casts PostgreSQL makes exactly as the Python mapping does and that cannot fail, by the source column's type:
# with only these, a chunk's rows still pass through in one SELECT (`_pass_through`).
SAFE_CASTS: dict[str, frozenset[str]] = {
    "int": frozenset({"int2", "int4", "int8"}),
    "float": frozenset({"int2", "int4", "int8", "float4", "float8", "numeric"}),
    "bool": frozenset({"bool"}),
    "timestamp": frozenset({"timestamptz", "timestamp"}),  # a naive time is UTC: the source session is in UTC
    "json": frozenset({"json", "jsonb"}),
    "text": frozenset({"text", "varchar"}),
}
_CONSTANT_TYPES = {bool: "bool", int: "int8", float: "float8", str: "text"}


class DeclaredMigration(Migration):
    """A migration described by a `MigrationSpec`; `declared_class` makes one subclass per spec."""

    spec: ClassVar[MigrationSpec]
    status = "declared"

    def __init__(self, source_url: str, target_url: str, options: dict[str, Any]) -> None:
        super().__init__(source_url, target_url, options)
        spec = MigrationSpec.from_dict(options["declared"]) if "declared" in options else self.spec
        self.spec = spec  # type: ignore[misc]
        # A worker learns a password the run's URL lacks from the file's ${ENV_VAR}s, in its own environment.
        source_url = with_password(source_url, [expand_env(spec.source.url, "[source] url", required=False)])
        target_url = with_password(target_url, [expand_env(spec.target.url, "[target] url", required=False)])
        self.reader = open_reader(source_url, spec.source)
        self.writer = open_writer(target_url, spec, options.get("batch_size"))
        # Reports name the target table without its schema, as the built-ins do.
        self.entity = spec.target.name.rpartition(".")[2]
        self._counts: dict[str, int] | None = None
        self._mapper: Mapper | None = None
        self._refused: dict[Any, str] = {}
        self._coerce: dict[str, Any] | None = None
        self._copy_select: Any = None  # the pass-through SELECT, False when the mapping needs Python
        self._writes = WriteBehind("shuttle-declared-write")

    @classmethod
    def plan_options(cls, **flags: Any) -> dict[str, Any]:
        return {"declared": cls.spec.as_dict(),
                "keep_deleted": bool(flags.get("keep_deleted")) or cls.spec.keep_deleted,
                "sample": flags.get("sample") if flags.get("sample") is not None else cls.spec.validate.sample,
                "batch_size": flags.get("batch_size")}

    # -- where columns land ------------------------------------------------------------------------

    @property
    def none_label(self) -> str:
        if self.spec.source.partition is None:
            return WHOLE
        if self.spec.source.kind == "mongo":
            from common.connectors.mongo_source import NO_PARTITION

            return NO_PARTITION
        return NULL_PARTITION

    @property
    def partition_column(self) -> str | None:
        partition = self.spec.source.partition
        return self.spec.target_name(partition) if partition is not None else None

    @property
    def mapper(self) -> Mapper:
        if self._mapper is None:
            rest = self.spec.rest_column if self.spec.source.kind == "mongo" and self.spec.target.kind == "postgres" \
                else None
            promoted = tuple(dict.fromkeys(n for n in (*self.spec.source.key, self.spec.source.partition,
                                                       self.spec.source.chunk_by) if n is not None))
            self._mapper = Mapper(self.spec, rest_column=rest, promoted=promoted)
        return self._mapper

    def target_columns(self) -> list[TargetColumn]:
        """The target's columns and their types: a cast's, a transform's, a constant's, else the source's."""
        spec = self.spec
        source = {c.name: c for c in self.reader.columns()}
        key = set(spec.target_key)
        columns: list[TargetColumn] = []
        for rule in spec.columns:
            if rule.cast is not None:
                ddl = CASTS[rule.cast]
            elif rule.has_constant:
                ddl = _CONSTANT_TYPES[type(rule.constant)]
            elif rule.transform is not None:
                ddl = TRANSFORMS[rule.transform]
            elif rule.path is not None:
                ddl = "jsonb"
            elif spec.source.kind == "mongo":
                ddl = "text" if rule.source in self.mapper.promoted or rule.source == "_id" else "jsonb"
            else:
                if rule.source not in source:
                    raise ConfigError(f"[columns] {rule.target}: from = {rule.source!r} is not a column of "
                                      f"{self.reader.what}; it has: {', '.join(source)}")
                found = source[rule.source]
                columns.append(TargetColumn(rule.target, found.ddl_type, found.copy_type,
                                            found.not_null or rule.target in key))
                continue
            columns.append(TargetColumn(rule.target, ddl, ddl, rule.target in key))
        if spec.source.kind == "postgres":
            for rule in spec.columns:
                if rule.source is not None and rule.source not in source:
                    raise ConfigError(f"[columns] {rule.target}: from = {rule.source!r} is not a column of "
                                      f"{self.reader.what}; it has: {', '.join(source)}")
            for name in self.mapper.unmapped(list(source)):
                found = source[name]
                columns.append(TargetColumn(name, found.ddl_type, found.copy_type, found.not_null or name in key))
        elif spec.keep_unmapped:
            for name in self.mapper.promoted:
                columns.append(TargetColumn(name, "text", "text", name in key))
            columns.append(TargetColumn(spec.rest_column, "jsonb", "jsonb"))
        return columns

    def _typed(self, row: dict[str, Any]) -> dict[str, Any]:
        """From MongoDB into PostgreSQL, values as their column takes them: a `text` column gets the text of
        an ObjectId (or any value), a `jsonb` one a JSON value. Other pairs' values are typed already."""
        if self._coerce is None:
            self._coerce = {}
            if self.spec.source.kind == "mongo" and self.spec.target.kind == "postgres":
                for column in self.target_columns():
                    if column.ddl_type == "jsonb":
                        self._coerce[column.name] = jsonable
                    elif column.ddl_type == "text":
                        self._coerce[column.name] = lambda v: v if isinstance(v, str) else str(v)
        for name, convert in self._coerce.items():
            value = row.get(name)
            if value is not None:
                row[name] = convert(value)
        return row

    # -- planning ----------------------------------------------------------------------------------

    def check_services(self) -> None:
        self.reader.check_reachable()
        self.writer.check_reachable()

    def count_partitions(self, selection: Selection) -> list[PartitionCount]:
        if selection.since or selection.until or selection.model_names:
            raise ConfigError(f"{self.spec.name} is a declared migration: it selects by partition only "
                              "(--partitions); --since, --until and --model-names do not apply")
        counts = self.reader.count(selection.partitions)
        if self.spec.target.kind == "postgres" or self.spec.source.kind == "postgres":
            self.reader.columns()  # names the missing key, partition or chunking column before anything runs
        if not self.options.get("keep_deleted") and self.spec.source.partition is not None:
            # Partitions whose rows are all gone from the source still get a chunk, which deletes their rows.
            for label in self.writer.counts(self.partition_column, self.none_label):
                if label not in counts and (selection.partitions is None or label in selection.partitions):
                    counts[label] = 0
        if selection.partitions is not None:
            unknown = sorted(set(selection.partitions) - set(counts))
            if unknown:
                raise ConfigError(f"unknown partitions of {self.spec.name}: {', '.join(unknown)} (no "
                                  f"{self.spec.source.partition or 'partition'} with that value in the source)")
        # Stored with the run: into an empty target no chunk has anything to delete.
        self.options["target_was_empty"] = self.writer.is_empty()
        self._counts = counts
        return [PartitionCount(self.entity, p, n) for p, n in sorted(counts.items())]

    def plan_chunks(self, selection: Selection, chunk_rows: int) -> Iterator[ChunkSpec]:
        counts = self._counts if self._counts is not None else \
            {p.partition: p.rows for p in self.count_partitions(selection)}
        for partition, rows in sorted(counts.items()):
            if rows <= chunk_rows:
                yield ChunkSpec(self.entity, partition, "", "", rows)
                continue
            bounds = ["", *self.reader.boundaries(partition, chunk_rows), ""]
            for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
                yield ChunkSpec(self.entity, partition, lo, hi, max(0, min(chunk_rows, rows - i * chunk_rows)))

    def prepare_target(self) -> None:
        self.writer.prepare(self.target_columns())

    def finish_target(self) -> None:
        """Indexes, once every chunk has ended: the declared ones, and with copy_indexes the source's."""
        self._refused = self.writer.finish(self.copied_indexes())

    def copied_indexes(self) -> list[tuple[tuple[str, ...], bool]]:
        """The source table's indexes whose every column reaches the target unchanged, in target names."""
        if not self.spec.target.copy_indexes or not isinstance(self.reader, PostgresReader):
            return []
        unchanged = {name: name for name in self.mapper.unmapped([c.name for c in self.reader.columns()])}
        unchanged.update({r.source: r.target for r in self.spec.columns if r.is_plain and r.cast is None})
        return [(tuple(unchanged[c] for c in columns), unique) for columns, unique in self.reader.indexes()
                if all(c in unchanged for c in columns)]

    # -- one chunk -----------------------------------------------------------------------------------

    def run_chunk(self, spec: ChunkSpec, progress: ProgressCallback) -> ChunkOutcome:
        if isinstance(self.writer, PostgresWriter) and self.writer.table is None:
            self.writer.prepare(self.target_columns())
        if self._copy_select is None:
            self._copy_select = self._pass_through() or False
        if self._copy_select is not False:
            return self._run_pass_through(spec, progress)
        outcome = ChunkOutcome(writes={self.entity: WriteCounts()})
        mapper, key = self.mapper, self.spec.target_key
        to_mongo = isinstance(self.writer, MongoWriter)
        columns = () if to_mongo else self.writer.table.column_names  # type: ignore[union-attr]
        batch: list[Any] = []
        seen: set[Any] = set()
        try:
            for row in self.reader.rows(spec.partition, spec.lo, spec.hi):
                outcome.rows_read += 1
                try:
                    out = self._typed(mapper.apply(row))
                    missing = [k for k in key if out.get(k) is None]
                    if missing:
                        raise MappingError(f"key column {missing[0]} is NULL")
                except MappingError as exc:
                    outcome.rejects.append(Reject(self.entity, self._key_text(row), str(exc), _excerpt(row)))
                    continue
                if to_mongo:
                    out = self.writer.document(out)  # type: ignore[union-attr]
                    seen.add(out["_id"])
                    batch.append(out)
                    if len(batch) >= self.writer.sink.batch_size:  # type: ignore[union-attr]
                        # Written by the write-behind thread while the next batch is read (it alone touches
                        # `outcome.writes`; rejects are appended from both threads, atomic list operations).
                        self._writes.submit(self._write, batch, None, seen, outcome)
                        batch = []
                else:
                    batch.append(tuple(out.get(n) for n in columns))  # a third of a dict's memory per row
                if outcome.rows_read % PROGRESS_EVERY == 0:
                    progress(outcome.rows_read)
            self._writes.finish()
        except BaseException:
            self._writes.abandon()
            raise
        self._write(batch, self._owned(spec), seen, outcome)
        progress(outcome.rows_read)
        return outcome

    def _pass_through(self) -> Any:
        """The SELECT list that yields the target's columns straight from the source, when the mapping is
        only renames, drops, copies and constants between PostgreSQL databases and every target column has
        its source column's type (or a cast of `SAFE_CASTS`): then no row can break the mapping, and the chunk's binary COPY data
        goes from source to target undecoded (`Sink.upsert_copy_data`), the path DESIGN §6 measured fastest.
        None otherwise (casts, paths, transforms, a nullable key: rows are mapped in Python)."""
        from psycopg import sql

        if not (isinstance(self.reader, PostgresReader) and isinstance(self.writer, PostgresWriter)):
            return None
        source = {c.name: c for c in self.reader.columns()}
        made: dict[str, tuple[Any, str]] = {}
        for rule in self.spec.columns:
            if rule.has_constant and rule.cast is None:
                kind = _CONSTANT_TYPES[type(rule.constant)]
                made[rule.target] = (sql.SQL("{}::{}").format(sql.Literal(rule.constant), sql.SQL(kind)), kind)
            elif rule.is_plain and rule.cast is None and rule.source in source:
                made[rule.target] = (sql.Identifier(rule.source), source[rule.source].copy_type)
            elif rule.is_plain and rule.source in source and source[rule.source].copy_type in SAFE_CASTS[rule.cast]:
                kind = CASTS[rule.cast]
                made[rule.target] = (sql.SQL("{}::{}").format(sql.Identifier(rule.source), sql.SQL(kind)), kind)
            else:
                return None
        for name in self.mapper.unmapped(list(source)):
            made[name] = (sql.Identifier(name), source[name].copy_type)
        table = self.writer.table
        if table is None or set(made) != set(table.column_names):
            return None
        if any(made[c.name][1] != c.type for c in table.columns):
            return None  # an existing target's column of another type: values must be converted
        key_sources = [self.spec.rule_from(k).source if self.spec.rule_from(k) else k  # type: ignore[union-attr]
                       for k in self.spec.source.key]
        if not all(source[k].not_null for k in key_sources):
            return None  # a NULL key is a reject, which only the row-by-row path makes
        return sql.SQL(", ").join(made[c][0] for c in table.column_names)

    def _run_pass_through(self, spec: ChunkSpec, progress: ProgressCallback) -> ChunkOutcome:

        reader, writer = self.reader, self.writer
        assert isinstance(reader, PostgresReader) and isinstance(writer, PostgresWriter) and writer.table
        query = reader.chunk_select(self._copy_select, spec.partition, spec.lo, spec.hi)
        owned = self._owned(spec)
        counted: list[int] = []
        counts, rows = writer.sink.upsert_copy_data(writer.table, reader.db.stream_raw(query, counted),
                                                    owned=writer.owned_sql(owned) if owned is not None else None)
        progress(rows)
        return ChunkOutcome(rows_read=rows, writes={self.entity: counts})

    def _write(self, batch: list[Any], owned: Owned | None, seen: set[Any], outcome: ChunkOutcome) -> None:
        if isinstance(self.writer, MongoWriter):
            in_range = self.reader.within if isinstance(self.reader, PostgresReader) else None
            counts, rejects = self.writer.write(batch, owned, seen, in_range)
        else:
            counts, rejects = self.writer.write(batch, owned)
        outcome.writes[self.entity] += counts
        outcome.rejects.extend(rejects)

    def _owned(self, spec: ChunkSpec) -> Owned | None:
        """What of the target this chunk owns (and deletes from), or None when it must delete nothing."""
        if self.options.get("keep_deleted"):
            return None
        if isinstance(self.writer, MongoWriter) and self.options.get("target_was_empty"):
            return None  # nothing there to be gone; saves a read of the range per chunk of a first load
        source = self.spec.source
        partition_column = self.partition_column if source.partition is not None else None
        chunk_column = self.spec.target_name(source.chunk_by)
        if source.kind == "mongo":
            if not self.reader.owns_deletes(spec.partition):  # type: ignore[union-attr]
                return None
            lo, hi = decode_mongo_bound(spec.lo), decode_mongo_bound(spec.hi)
            if isinstance(self.writer, PostgresWriter):
                # `_id`s in a PostgreSQL text column: ObjectIds and strings compare there as in MongoDB only
                # byte-wise (COLLATE "C"); integer `_id`s as text do not compare as numbers at all.
                rule = self.spec.rule_from("_id")
                as_text = rule is None or rule.cast in (None, "text")
                if as_text and any(isinstance(b, int) for b in (lo, hi)):
                    return None
                return Owned(partition_column, self.reader.partition_value(spec.partition), chunk_column,
                             lo, hi, byte_order=as_text)
            return Owned(partition_column, self.reader.partition_value(spec.partition), chunk_column, lo, hi)
        return Owned(partition_column, self.reader.partition_value(spec.partition), chunk_column,
                     decode_bound(spec.lo), decode_bound(spec.hi))

    def _key_text(self, row: dict[str, Any]) -> str:
        return json.dumps([str(row.get(k)) for k in self.spec.source.key])[:200]

    # -- after the run -------------------------------------------------------------------------------

    def target_counts(self, partitions: Sequence[str]) -> dict[tuple[str, str], int]:
        found = self.writer.counts(self.partition_column if self.spec.source.partition else None, self.none_label)
        return {(self.entity, p): found.get(p, 0) for p in partitions}

    def verify(self, selection: Selection, partitions: Sequence[str], rejected: dict[str, int]) -> list[Check]:
        """Per partition, every source row is in the target or a reject; then the sampled comparison."""
        source = self.reader.count(list(partitions))
        target = self.writer.counts(self.partition_column if self.spec.source.partition else None, self.none_label)
        checks = []
        for partition in partitions:
            src, dst, rej = source.get(partition, 0), target.get(partition, 0), rejected.get(partition, 0)
            ok = src == dst + rej
            detail = "" if ok else (f"{src - dst - rej} source rows are neither in the target nor rejects" if src > dst + rej
                                    else f"the target holds {dst + rej - src} rows more than the source")
            checks.append(Check(self.entity, partition, ok, src, dst, rej, detail))
        for columns, reason in self._refused.items():
            checks.append(Check(f"{self.entity} (indexes)", "", False, 0, 0, 0,
                                f"index on {', '.join(columns)} refused: {reason}"))
        sample = int(self.options.get("sample") or 0)
        if sample:
            checks.append(self._sample_check(list(partitions), sample))
        return checks

    def _sample_check(self, partitions: list[str], size: int) -> Check:
        """`size` source rows of the partitions, mapped again and compared field by field with the target."""
        compared, differing = 0, []
        each = max(1, -(-size // max(1, len(partitions))))  # spread over the partitions
        for partition in partitions:
            for row in self.reader.rows(partition, "", "", limit=min(each, size - compared)):
                try:
                    expected = self._typed(self.mapper.apply(row))
                except MappingError:
                    continue  # a reject: counted by the count check
                compared += 1
                if isinstance(self.writer, MongoWriter):
                    expected = self.writer.document(expected)
                    stored = self.writer.fetch([expected["_id"]]).get(expected["_id"])
                else:
                    values = tuple(expected[k] for k in self.spec.target_key)
                    stored = self.writer.fetch([values]).get(values)
                if stored is None:
                    differing.append(f"{self._key_text(row)}: missing")
                    continue
                for field, value in expected.items():
                    if not _same(stored.get(field), value):
                        differing.append(f"{self._key_text(row)}: {field} is {stored.get(field)!r}, expected {value!r}")
                        break
            if compared >= size:
                break
        detail = "; ".join(differing[:3])
        return Check(f"{self.entity} (sample)", "", not differing, compared, compared - len(differing), 0, detail)

    def close(self) -> None:
        self._writes.close()
        self.reader.close()
        self.writer.close()


def _same(stored: Any, expected: Any) -> bool:
    if stored == expected:
        return True
    return jsonable(bson_value(stored)) == jsonable(bson_value(expected))


def _excerpt(row: dict[str, Any]) -> str:
    return json.dumps(jsonable(row), default=str)[:500]


def declared_class(spec: MigrationSpec) -> type[DeclaredMigration]:
    """The catalogue entry of one spec: a subclass carrying its name, summary, kinds and the spec itself."""
    return type(f"Declared[{spec.name}]", (DeclaredMigration,), {
        "spec": spec, "name": spec.name, "summary": spec.summary, "source_kind": spec.source.kind,
        "target_kind": spec.target.kind, "partition_label": spec.source.partition or "(none)",
        "__module__": __name__})
