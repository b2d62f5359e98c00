"""`mlflow-to-mongo`: every table of an MLflow tracking + registry database, PostgreSQL → MongoDB.

    source (reflected, parents first)        target
    ───────────────────────────────────────  ───────────────────────────────────────────────────────
    experiments, runs, metrics, params, …  → one collection per table, `_id` from the primary key,
      partition: experiment id                 conversions in `mlflow_mapping`, unique index on the
    registered_models, model_versions, …   →   primary key, indexes on foreign keys and query paths
      partition: "model:<name>"
    anything else (workspaces, jobs, …)    →   partition "global"

Chunks are (table, partition, primary-key range [lo, hi)), boundaries taken from the data; documents are
inserted, or replaced whole by `_id`, and identical ones are not rewritten, so re-running a chunk rewrites
nothing. A chunk owns its range of the target: documents of its partition and key range whose row is gone
from the source are deleted after its writes (unless --keep-deleted), and a (table, partition) with
documents left but no rows gets one chunk for all of it. No chunk is ever skipped: there is no fingerprint. `prepare_target` creates the collections; the indexes are built by `finish_target` once all chunks
are done, before verification. Verification: every index present, counts per collection and partition,
referential integrity in the target, and a sampled field-by-field comparison.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

from psycopg import sql

from common.connectors.mongo import Index, Sink, same
from common.connectors.mongo import translate_errors as translate_mongo_errors
from common.connectors.postgres import Source, translate_errors
from common.errors import ConfigError
from common.migrations.base import Check, Migration, ProgressCallback, Selection
from common.migrations.mlflow_mapping import (JSON_TEXT, KNOWN_TABLES, PARTITION_FIELD, document_id, id_text,
                                              indexes_for, to_document)
from common.migrations.mlflow_schema import GLOBAL, MODEL_PREFIX, Table, parents_first, reflect, references
from common.model import ChunkOutcome, ChunkSpec, PartitionCount, Reject, WriteCounts
from common.write_behind import WriteBehind

log = logging.getLogger("shuttle.mlflow_to_mongo")
DEFAULT_BATCH = 1_000
DEFAULT_SAMPLE = 50
SAMPLE_OVERDRAW = 20  # a large table's sample is drawn from about 20 × --sample rows (see _sample_rows)
STALE_BATCH = 10_000  # documents of a partition checked against a chunk's key range per source query
# Collations that order text by code point, as MongoDB compares strings: a key range on such a column can be
# narrowed in the target by the column's own bounds.
BYTE_ORDER_COLLATIONS = frozenset({"C", "POSIX", "C.UTF-8", "C.utf8", "ucs_basic", "pg_c_utf8"})
ORDERED_ALIKE_TYPES = frozenset({"smallint", "integer", "bigint", "real", "double precision", "boolean"})


class MlflowToMongo(Migration):
    name = "mlflow-to-mongo"
    summary = "Every table of an MLflow database (PostgreSQL) → MongoDB collections, verified"
    source_kind = "postgres"
    target_kind = "mongo"
    partition_label = "experiment"
    status = "available"

    def __init__(self, source_url: str, target_url: str, options: dict[str, Any]) -> None:
        super().__init__(source_url, target_url, options)
        self.source = Source(source_url)
        self.schema = options.get("source_schema") or "public"
        self.prefix = options.get("collection_prefix") or ""
        self.sink = Sink(target_url, database=options.get("target_database") or None,
                         batch_size=int(options.get("batch_size") or DEFAULT_BATCH))
        self._tables: dict[str, Table] | None = None
        self._counts: dict[tuple[str, str], int] | None = None
        self._refused_indexes: dict[tuple[str, Index], str] = {}  # by finish_target, for verify
        self._narrowable: dict[str, bool] = {}  # per table: its first key column orders as MongoDB does
        self._writes = WriteBehind()

    @classmethod
    def plan_options(cls, **flags: Any) -> dict[str, Any]:
        extra = flags.get("options") or {}
        target_schema = flags.get("target_schema")
        return {
            "source_schema": flags.get("source_schema") or "public",
            # --target-schema names the MongoDB database (else the URL's path does).
            "target_database": target_schema if target_schema and target_schema != "public" else None,
            "collection_prefix": extra.get("collection_prefix", ""),
            "batch_size": int(flags.get("batch_size") or extra.get("batch_size") or DEFAULT_BATCH),
            "sample": int(flags["sample"] if flags.get("sample") is not None else extra.get("sample", DEFAULT_SAMPLE)),
            "keep_deleted": bool(flags.get("keep_deleted")),
            "recompute": bool(flags.get("recompute")),  # every chunk is recomputed anyway: nothing is skipped
        }

    # -- the source as found ---------------------------------------------------------------------

    @property
    def tables(self) -> dict[str, Table]:
        if self._tables is None:
            self._tables = reflect(self.source, self.schema)
            if not self._tables:
                raise ConfigError(f"no tables in schema '{self.schema}' of {self.source.public_url}; "
                                  "is this an MLflow database? (--source-schema names the schema)")
            unknown = sorted(set(self._tables) - KNOWN_TABLES)
            if unknown:
                log.warning("mlflow-to-mongo: tables unknown to this version's mapping, migrated generically: %s",
                            ", ".join(unknown))
        return self._tables

    def collection(self, table: str) -> str:
        return f"{self.prefix}{table}"

    def check_services(self) -> None:
        self.source.check_reachable()
        self.sink.check_reachable()

    def _wanted(self, selection: Selection) -> tuple[list[str] | None, bool, bool]:
        """(experiment partitions or None for all, include registry, include global)."""
        if selection.partitions is None and selection.model_names is None:
            return None, True, True
        experiments = list(selection.partitions or [])
        return experiments, selection.model_names is not None, False

    def _selected(self, table: Table, partition: str, selection: Selection) -> bool:
        """Whether the selection covers `partition` of `table`."""
        experiments, registry, global_ = self._wanted(selection)
        if partition == GLOBAL:  # global tables, and rows whose experiment cannot be resolved
            return global_
        if table.kind == "registry":
            return registry and (selection.model_names is None or
                                 partition in {MODEL_PREFIX + n for n in selection.model_names})
        return experiments is None or partition in experiments

    def _source_counts(self, selection: Selection) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for name in parents_first(self.tables):
            table = self.tables[name]
            query = sql.SQL("SELECT {p}, count(*) FROM {f} GROUP BY 1").format(
                p=table.partition_expr(), f=table.from_clause(self.schema))
            for partition, rows in self.source.query(query):
                if self._selected(table, partition, selection):
                    counts[(name, partition)] = int(rows)
        return counts

    def _emptied(self, selection: Selection, counts: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
        """(table, partition) pairs with documents in the target but no rows in the source: each gets a
        chunk that deletes them. One `$group` on `_partition` per collection, as `target_counts` counts
        (not `distinct`, whose answer is one document capped at 16 MB)."""
        emptied = []
        with translate_mongo_errors(f"target {self.sink.public_url}"):
            # A database not there yet holds nothing to delete, and planning must not create it (a server
            # may create a database on a mere read).
            if self.sink.database_name not in self.sink.client.list_database_names():
                return []
            present = set(self.sink.db.list_collection_names())
            for name, table in self.tables.items():
                if self.collection(name) not in present:
                    continue
                for group in self.sink.db[self.collection(name)].aggregate([{"$group": {"_id": f"${PARTITION_FIELD}"}}]):
                    partition = group["_id"]
                    if isinstance(partition, str) and (name, partition) not in counts \
                            and self._selected(table, partition, selection):
                        emptied.append((name, partition))
        return emptied

    def count_partitions(self, selection: Selection) -> list[PartitionCount]:
        counts = self._source_counts(selection)
        if selection.partitions:
            known = {str(r[0]) for r in self.source.query(
                sql.SQL("SELECT experiment_id FROM {}").format(sql.Identifier(self.schema, "experiments")))}
            unknown = sorted(set(selection.partitions) - known)
            if unknown:
                raise ConfigError(f"unknown experiment ids: {', '.join(unknown)}; "
                                  "list them with: SELECT experiment_id, name FROM experiments")
        if selection.model_names:
            known = {r[0] for r in self.source.query(
                sql.SQL("SELECT name FROM {}").format(sql.Identifier(self.schema, "registered_models")))}
            unknown = sorted(set(selection.model_names) - known)
            if unknown:
                raise ConfigError(f"unknown registered model names: {', '.join(unknown)}; "
                                  "list them with: SELECT name FROM registered_models")
        self._counts = counts
        return [PartitionCount(t, p, n) for (t, p), n in counts.items()]

    def plan_chunks(self, selection: Selection, chunk_rows: int) -> Iterator[ChunkSpec]:
        counts = self._counts if self._counts is not None else self._source_counts(selection)
        if not self.options.get("keep_deleted"):
            counts = {**counts, **{pair: 0 for pair in self._emptied(selection, counts)}}
        order = {name: i for i, name in enumerate(parents_first(self.tables))}
        for (name, partition), rows in sorted(counts.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
            if rows <= chunk_rows:
                yield ChunkSpec(name, partition, "", "", rows)
                continue
            bounds = ["", *self._boundaries(self.tables[name], partition, chunk_rows), ""]
            for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
                yield ChunkSpec(name, partition, lo, hi, min(chunk_rows, rows - i * chunk_rows))

    def _boundaries(self, table: Table, partition: str, chunk_rows: int) -> list[str]:
        """Key values starting every `chunk_rows`-th row of the partition (JSON arrays of the key)."""
        key = [sql.SQL("t.{}").format(sql.Identifier(c)) for c in table.key]
        aliased = sql.SQL(", ").join(sql.SQL("{} AS {}").format(k, sql.Identifier(f"k{i}")) for i, k in enumerate(key))
        query = sql.SQL(
            "SELECT {cols} FROM (SELECT {aliased}, row_number() OVER (ORDER BY {key}) AS rn FROM {f} WHERE {p} = %s) s"
            " WHERE rn > 1 AND rn %% %s = 1 ORDER BY rn"
        ).format(cols=sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in range(len(key))), aliased=aliased,
                 key=sql.SQL(", ").join(key), f=table.from_clause(self.schema), p=table.partition_expr())
        return [_encode_key(row) for row in self.source.query(query, [partition, chunk_rows])]

    def prepare_target(self) -> None:
        """The collections only: their secondary indexes are built after the load (`finish_target`)."""
        self.sink.ensure_collections([self.collection(name) for name in self.tables])

    def indexes(self) -> dict[str, list[Index]]:
        """Every collection's indexes: unique on the primary key, foreign keys, query paths, `_partition`."""
        wanted = {}
        for name, table in self.tables.items():
            fks = [fk.columns for fk in references(table, self.tables)]
            wanted[name] = [Index(keys, unique)
                            for keys, unique in indexes_for(name, table.columns, table.primary_key, fks)]
        return wanted

    def finish_target(self) -> None:
        """Build the indexes once all chunks are done, before verification.

        Kept up to date on every insert, five secondary indexes on `metrics` halved the load rate, while
        building them on the filled collections takes seconds (ops/bench/RESULTS.md). Idempotent: an
        existing index is left as it is. An index the server refuses (a unique primary-key index over
        duplicate documents, e.g. ones a key-less tool wrote earlier) is remembered for `verify`, which
        fails the run on it; the other indexes are still built."""
        self._refused_indexes = {}
        for name, indexes in self.indexes().items():
            for index, reason in self.sink.ensure_indexes(self.collection(name), indexes).items():
                self._refused_indexes[(name, index)] = reason

    # -- one chunk -------------------------------------------------------------------------------

    def run_chunk(self, spec: ChunkSpec, progress: ProgressCallback) -> ChunkOutcome:
        """Rows → documents → batches; each batch is written while the next is read (`WriteBehind`)."""
        table = self.tables[spec.entity]
        outcome = ChunkOutcome()
        batch: list[dict[str, Any]] = []
        batch_size = self.sink.batch_size
        seen: set[Any] = set()  # the `_id` of every row the source yields in the range: the rest is stale
        try:
            for row in self._rows(table, spec.partition, spec.lo, spec.hi):
                outcome.rows_read += 1
                try:
                    doc, _ = to_document(table.name, table.columns, table.key, row, spec.partition)
                except (TypeError, ValueError, OverflowError) as exc:
                    outcome.rejects.append(Reject(table.name, json.dumps([str(row.get(k)) for k in table.key]),
                                                  f"cannot convert: {exc}", str(row)[:500]))
                    seen.add(_row_id(table, row))
                    continue
                seen.add(doc["_id"])
                batch.append(doc)
                if len(batch) >= batch_size:
                    self._writes.submit(self._flush, table.name, batch, outcome)
                    batch = []
                    progress(outcome.rows_read)
            self._writes.submit(self._flush, table.name, batch, outcome)
            self._writes.finish()
        except BaseException:
            self._writes.abandon()
            raise
        if not self.options.get("keep_deleted"):
            counts = outcome.writes.setdefault(table.name, WriteCounts())
            counts.deleted += self._delete_stale(table, spec, seen, found=bool(counts.updated or counts.unchanged))
        progress(outcome.rows_read)
        return outcome

    def _delete_stale(self, table: Table, spec: ChunkSpec, seen: set[Any], found: bool) -> int:
        """Delete the documents of the chunk's partition and key range whose row the source no longer has.

        Read through the `_partition` index. Before the first run's indexes exist, the read would scan the
        whole collection for every chunk of a fresh load, so it is done then only if the chunk `found`
        some of its documents already stored (a re-run or resume of an unfinished load)."""
        collection = self.collection(table.name)
        if not found and not self.sink.has_index_on(collection, PARTITION_FIELD):
            return 0
        ranged = bool(spec.lo or spec.hi)
        query: dict[str, Any] = {PARTITION_FIELD: spec.partition, **(self._narrowed(table, spec) if ranged else {})}
        projection = {"_id": 1, **({k: 1 for k in table.key} if ranged else {})}
        stale: list[Any] = []
        candidates: list[dict[str, Any]] = []
        with translate_mongo_errors(f"target {self.sink.public_url}"):
            for doc in self.sink.db[collection].find(query, projection, batch_size=STALE_BATCH):
                if doc["_id"] in seen:
                    continue
                candidates.append(doc)
                if len(candidates) >= STALE_BATCH:
                    stale += self._in_range(table, spec, candidates) if ranged else [d["_id"] for d in candidates]
                    candidates = []
        stale += self._in_range(table, spec, candidates) if ranged else [d["_id"] for d in candidates]
        return self.sink.delete_ids(collection, stale) if stale else 0

    def _in_range(self, table: Table, spec: ChunkSpec, docs: list[dict[str, Any]]) -> list[Any]:
        """The `_id`s of `docs` whose key lies in the chunk's [lo, hi), compared by the source database
        exactly as `_rows` compares (the column types and collations the planner cut the ranges with)."""
        if not docs:
            return []
        columns = [sql.SQL("{}[]").format(sql.SQL(table.columns[k])) for k in table.key]
        names = sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in range(len(table.key)))
        conditions, params = [sql.SQL("TRUE")], [list(range(len(docs)))] + [[d.get(k) for d in docs] for k in table.key]
        for bound, op in ((spec.lo, ">="), (spec.hi, "<")):
            if bound:
                values = json.loads(bound)
                conditions.append(sql.SQL("({}) " + op + " ({})").format(
                    names, sql.SQL(", ").join(sql.Placeholder() for _ in values)))
                params += values
        query = sql.SQL("SELECT i FROM unnest(%s::int[], {arrays}) AS c(i, {names}) WHERE {where}").format(
            arrays=sql.SQL(", ").join(sql.SQL("%s::{}").format(c) for c in columns), names=names,
            where=sql.SQL(" AND ").join(conditions))
        return [docs[i]["_id"] for (i,) in self.source.query(query, params)]

    def _narrowed(self, table: Table, spec: ChunkSpec) -> dict[str, Any]:
        """A filter on the first key field bounding the range in the target, where MongoDB orders that
        field as the source does (numbers, or text under a code-point collation); else no filter, and
        `_in_range` sees the whole partition. Inclusive at both ends: later key fields decide the rest."""
        first = table.key[0]
        if table.name not in self._narrowable:
            kind, collation = self.source.query(
                "SELECT format_type(a.atttypid, NULL), CASE WHEN a.attcollation = 100"
                " THEN (SELECT datcollate FROM pg_database WHERE datname = current_database())"
                " ELSE co.collname END FROM pg_attribute a LEFT JOIN pg_collation co ON co.oid = a.attcollation"
                " WHERE a.attrelid = to_regclass(format('%%I.%%I', %s::text, %s::text)) AND a.attname = %s",
                [self.schema, table.name, first])[0]
            self._narrowable[table.name] = kind in ORDERED_ALIKE_TYPES or (
                kind in ("text", "character varying") and collation in BYTE_ORDER_COLLATIONS)
        if not self._narrowable[table.name]:
            return {}
        bounds = {}
        if spec.lo:
            bounds["$gte"] = json.loads(spec.lo)[0]
        if spec.hi:
            bounds["$lte"] = json.loads(spec.hi)[0]
        return {first: bounds}

    def _flush(self, entity: str, docs: list[dict[str, Any]], outcome: ChunkOutcome) -> None:
        """Runs in the write-behind thread. It alone touches `outcome.writes`; its `rejects.extend` and
        the reading thread's conversion rejects (`append`) are single list operations, atomic in CPython."""
        result = self.sink.upsert_documents(self.collection(entity), docs, entity=entity, key=self.tables[entity].key)
        outcome.rejects.extend(result.rejects)
        outcome.writes.setdefault(entity, WriteCounts())
        outcome.writes[entity] += result.counts

    def _rows(self, table: Table, partition: str, lo: str, hi: str) -> Iterator[dict[str, Any]]:
        """The chunk's rows through a server-side cursor (memory stays flat), in the order the server finds them.

        Not sorted by key: the chunk is a key range either way, its documents are written by `_id` in any
        order (a composite key's digest does not follow key order anyway), and a sort made the worker wait
        for the whole partition to be read and sorted before its first row (0.3 s per 47k-row chunk of
        metrics, the server idle meanwhile)."""
        key = sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in table.key)
        conditions = [sql.SQL("{} = %s").format(table.partition_expr())]
        params: list[Any] = [partition]
        for bound, op in ((lo, ">="), (hi, "<")):
            if bound:
                values = json.loads(bound)
                conditions.append(sql.SQL("({}) " + op + " ({})").format(
                    key, sql.SQL(", ").join(sql.Placeholder() for _ in values)))
                params += values
        query = sql.SQL("SELECT t.* FROM {f} WHERE {w}").format(
            f=table.from_clause(self.schema), w=sql.SQL(" AND ").join(conditions))
        with translate_errors(f"source {self.source.public_url}"):
            conn = self.source.connection()
            try:
                with conn.cursor(name=f"shuttle_{uuid.uuid4().hex[:12]}") as cur:
                    cur.itersize = self.sink.batch_size
                    cur.execute(query, params)
                    names = [d.name for d in cur.description]
                    for row in cur:
                        yield dict(zip(names, row))
            finally:
                conn.rollback()

    # -- after the run ---------------------------------------------------------------------------

    def target_counts(self, partitions: Sequence[str]) -> dict[tuple[str, str], int]:
        """Documents per (collection, partition), counted by the server in one `$group` per collection.

        Over the whole collection, then kept for `partitions`: a `$match` on `$in` first makes nx-27017
        evaluate the filter in Python (10× slower), and a full run counts every partition anyway."""
        wanted = set(partitions)
        counts: dict[tuple[str, str], int] = {}
        with translate_mongo_errors(f"target {self.sink.public_url}"):
            for name in self.tables:
                for group in self.sink.db[self.collection(name)].aggregate(
                        [{"$group": {"_id": f"${PARTITION_FIELD}", "n": {"$sum": 1}}}]):
                    if group["_id"] in wanted:
                        counts[(name, group["_id"])] = int(group["n"])
        return counts

    def verify(self, selection: Selection, partitions: Sequence[str], rejected: dict[str, int]) -> list[Check]:
        """Counts per collection and partition, references in the target, and a sampled comparison."""
        source = self._source_counts(selection)
        target = self.target_counts(partitions)
        checks = []
        for name, partition in sorted(set(source) | {k for k in target if k[1] in partitions}):
            src, dst, rej = source.get((name, partition), 0), target.get((name, partition), 0), rejected.get(partition, 0)
            ok = src == dst or (rej > 0 and dst < src and src - dst <= rej)
            detail = "" if src == dst else (f"{src - dst} documents missing" if src > dst else
                                            f"{dst - src} extra documents, not in the source") + \
                (f" ({rej} rejects)" if rej else "")
            checks.append(Check(name, partition, ok, src, dst, rej if src != dst else 0, detail))
        whole = selection.partitions is None and selection.model_names is None
        rows_per_table: dict[str, int] = {}
        for (name, _), n in source.items():
            rows_per_table[name] = rows_per_table.get(name, 0) + n
        checks += self._index_checks()
        checks += self._reference_checks(list(partitions), whole)
        checks += self._sample_checks(list(partitions), int(self.options.get("sample", DEFAULT_SAMPLE)), rejected,
                                      rows_per_table)
        checks += self._warnings(list(partitions))
        return checks

    def _index_checks(self) -> list[Check]:
        """One line per collection: every index of the contract is there, unique where it must be.

        Compared by field names and uniqueness: nx-27017 lists every direction as 1 (a stand-in gap)."""
        checks = []
        for name, wanted in sorted(self.indexes().items()):
            present = {(_fields(i), i.unique) for i in self.sink.indexes(self.collection(name))}
            absent = [i for i in wanted if (_fields(i), i.unique) not in present]
            problems = []
            for index in absent:
                if refused := self._refused_indexes.get((name, index)):
                    problems.append(f"{_describe(index)} could not be built: {refused}")
                else:
                    problems.append(f"{_describe(index)} missing")
            checks.append(Check(f"{name} (indexes)", "indexes", not problems, len(wanted), len(wanted) - len(absent),
                                0, "; ".join(problems)))
        return checks

    def _reference_checks(self, partitions: list[str], whole: bool) -> list[Check]:
        """Every reference value of the run's documents names a document of its parent collection.

        `whole`: the run covers every partition, so the child values are read without a partition filter,
        and each parent collection's values are read once (runs are the parent of metrics, params, tags …)
        rather than looked up per child collection."""
        checks = []
        parents: dict[tuple[str, tuple[str, ...]], set[tuple]] = {}
        for name in parents_first(self.tables):
            table = self.tables[name]
            for fk in references(table, self.tables):
                if not fk.ref_columns:
                    continue
                child = self._distinct_values(name, fk.columns, None if whole else partitions)
                child = {v for v in child if None not in v}
                if not child:
                    continue
                if whole:
                    ref = (fk.table, fk.ref_columns)
                    if ref not in parents:
                        parents[ref] = self._distinct_values(fk.table, fk.ref_columns, None)
                    present = parents[ref] & child
                else:
                    present = self._present(fk.table, fk.ref_columns, child)
                missing = sorted(child - present, key=str)
                label = f"{name}({', '.join(fk.columns)}) → {fk.table}"
                checks.append(Check(label, "references", not missing, len(child), len(child) - len(missing), 0,
                                    f"missing in {fk.table}: {missing[:3]}" if missing else ""))
        return checks

    def _distinct_values(self, table: str, columns: tuple[str, ...], partitions: list[str] | None) -> set[tuple]:
        """Distinct values of `columns` in a collection of the target (`partitions` None: all of it).

        Grouped in the server for one column (nx-27017 cannot group on a compound key, so composite
        references, all small registry tables, are read). A `$group`, not `distinct`: its answer is one
        document capped at 16 MB, and nx-27017 ignores its filter. No `$match` for a whole run: nx-27017
        evaluates `$in` in Python, ten times the cost of the grouping itself."""
        match = {PARTITION_FIELD: {"$in": partitions}} if partitions is not None else {}
        if len(columns) == 1:
            with translate_mongo_errors(f"target {self.sink.public_url}"):
                groups = self.sink.db[self.collection(table)].aggregate(
                    ([{"$match": match}] if match else []) + [{"$group": {"_id": f"${columns[0]}"}}])
                return {(g["_id"],) for g in groups}
        return {tuple(d.get(c) for c in columns)
                for d in self.sink.find(self.collection(table), match, {c: 1 for c in columns} | {"_id": 0})}

    def _present(self, table: str, columns: tuple[str, ...], values: set[tuple]) -> set[tuple]:
        found: set[tuple] = set()
        ordered = sorted(values, key=str)
        for start in range(0, len(ordered), 1000):
            part = ordered[start:start + 1000]
            query = {columns[0]: {"$in": sorted({v[0] for v in part}, key=str)}}
            for d in self.sink.find(self.collection(table), query, {c: 1 for c in columns} | {"_id": 0}):
                found.add(tuple(d.get(c) for c in columns))
        return found & values

    def _sample_checks(self, partitions: list[str], sample: int, rejected: dict[str, int],
                       rows_per_table: dict[str, int]) -> list[Check]:
        """`sample` source rows per table (a fixed pseudo-random pick) compared field by field with their documents.

        A sampled row without a document is a failure unless its partition has rejects (the ledger lists
        them with their keys); a document that differs from its row always is."""
        if sample <= 0:
            return []
        checks = []
        for name in parents_first(self.tables):
            table = self.tables[name]
            rows = self._sample_rows(table, partitions, sample, rows_per_table.get(name, 0))
            if not rows:
                continue
            expected = [to_document(name, table.columns, table.key, row, partition)[0] for partition, row in rows]
            stored = {json.dumps(d["_id"], default=str): d for d in self.sink.find(
                self.collection(name), {"_id": {"$in": [d["_id"] for d in expected]}})}
            differences, excused = [], 0
            for doc in expected:
                got = stored.get(json.dumps(doc["_id"], default=str))
                if got is None and rejected.get(doc[PARTITION_FIELD], 0):
                    excused += 1
                    continue
                if got is None:
                    differences.append(f"{doc['_id']}: missing")
                    continue
                fields = [f for f in doc if not same(_bson_time(doc[f]), got.get(f, _ABSENT))]
                if fields:
                    differences.append(f"{doc['_id']}: {', '.join(fields)} differ")
            detail = "; ".join(differences[:3]) or (f"{excused} sampled rows absent, their partitions have rejects"
                                                    if excused else "")
            checks.append(Check(f"{name} (sample)", "field by field", not differences, len(expected),
                                len(expected) - len(differences) - excused, excused, detail))
        return checks

    def _sample_rows(self, table: Table, partitions: list[str], sample: int, rows: int) -> list[tuple[str, dict]]:
        """(partition, row) of `sample` rows, the first in md5 order of their key.

        A large table is first thinned to about SAMPLE_OVERDRAW × `sample` of its `rows` with a repeatable
        Bernoulli sample, so the md5 ordering sorts a thousand rows rather than the whole table; in the
        unlikely case the thinned table has too few rows of the run's partitions, the whole table is read."""
        key = sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in table.key)
        shares = [None] if rows <= SAMPLE_OVERDRAW * sample else [100.0 * SAMPLE_OVERDRAW * sample / rows, None]
        for share in shares:
            query = sql.SQL("SELECT {p}, t.* FROM {f} WHERE {p} = ANY(%s) ORDER BY md5(row({k})::text) LIMIT %s").format(
                p=table.partition_expr(), f=table.from_clause(self.schema, share), k=key)
            with translate_errors(f"source {self.source.public_url}"):
                conn = self.source.connection()
                try:
                    cur = conn.execute(query, [partitions, sample])
                    names = [d.name for d in cur.description][1:]
                    picked = [(r[0], dict(zip(names, r[1:]))) for r in cur.fetchall()]
                finally:
                    conn.rollback()
            if len(picked) == sample:
                break
        return picked

    def _warnings(self, partitions: list[str]) -> list[Check]:
        """Informational lines: JSON text kept as text, tables migrated without a specific mapping."""
        checks = []
        for name, columns in sorted(JSON_TEXT.items()):
            if name not in self.tables:
                continue
            for column in columns:
                if column not in self.tables[name].columns:
                    continue
                kept = self.sink.count(self.collection(name), {PARTITION_FIELD: {"$in": partitions},
                                                                column: {"$type": "string"}})
                if kept:
                    checks.append(Check(f"{name}.{column}", "warning", True, kept, kept, 0,
                                        f"{kept} values are not JSON objects; kept as their original text"))
        for name in sorted(set(self.tables) - KNOWN_TABLES):
            checks.append(Check(name, "warning", True, 0, 0, 0, "table unknown to this mapping; migrated generically"))
        return checks

    def close(self) -> None:
        self._writes.close()
        self.source.close()
        self.sink.close()


_ABSENT = object()


def _fields(index: Index) -> tuple[str, ...]:
    return tuple(field for field, _ in index.keys)


def _describe(index: Index) -> str:
    return f"{'unique ' if index.unique else ''}index ({', '.join(_fields(index))})"


def _row_id(table: Table, row: dict[str, Any]) -> Any:
    """The `_id` a row's document has, or None when even its key cannot be converted."""
    try:
        return document_id(tuple(row[k] for k in table.key))
    except (TypeError, ValueError, OverflowError):
        return None


def _encode_key(values: Sequence[Any]) -> str:
    return id_text(tuple(values))


def _bson_time(value: Any) -> Any:
    """What BSON keeps of a datetime: UTC, milliseconds, no time zone."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value.replace(microsecond=value.microsecond // 1000 * 1000)
    return value
