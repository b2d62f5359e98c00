"""`example-scores`: archived predictions → a compact, labelled `prediction_scores` table.

    target column   from             how
    id              id               as is: the natural key, so every write is an upsert on it
    deployment_id   deployment_id    as is: the partition (--deployment-ids selects)
    ts              ts               as is
    score           prediction       rounded to 4 decimals; NULL → reject
    label           prediction       'positive' at 0.5 and above, else 'negative'
    region          features (JSON)  its "region" key; text that is not a JSON object → reject

A chunk is one deployment's id range [lo, hi) (an empty bound is open); it owns that range of the
target, so a row deleted from the source is deleted from the target by the next run. Everything that
touches a database goes through Shuttle's own PostgreSQL connectors: streamed binary COPY out of the
source, and COPY into a staging table + one guarded `INSERT … ON CONFLICT` per chunk into the target,
so a re-run over unchanged data writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from psycopg import sql

from common.connectors.base import Column, TableSpec
from common.connectors.postgres import Sink, Source, identifier
from common.errors import ConfigError
from common.migrations.base import Check, Migration, ProgressCallback, Selection
from common.model import ChunkOutcome, ChunkSpec, PartitionCount, Reject

ENTITY = "prediction_scores"
SCORES = TableSpec(
    name="prediction_scores",
    columns=(Column("id", "int8"), Column("deployment_id", "text"), Column("ts", "timestamptz"),
             Column("score", "float8"), Column("label", "text"), Column("region", "text")),
    key=("id",),
)
SOURCE_COLUMNS = ("id", "deployment_id", "ts", "prediction", "features")
SOURCE_TYPES = ("int8", "text", "timestamptz", "float8", "text")
POSITIVE_FROM = 0.5
PROGRESS_EVERY = 10_000


def transform(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """One source row → one target row; ValueError (the reject's reason) for a row that cannot be mapped."""
    row_id, deployment, ts, prediction, features = row
    if prediction is None:
        raise ValueError("prediction is NULL")
    try:
        parsed = json.loads(features) if features is not None else {}
    except json.JSONDecodeError:
        raise ValueError("features is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"features must be a JSON object, got {type(parsed).__name__}")
    label = "positive" if prediction >= POSITIVE_FROM else "negative"
    return (row_id, deployment, ts, round(prediction, 4), label, parsed.get("region"))


class PredictionScores(Migration):
    name = "example-scores"
    summary = "Example plugin: archived predictions → prediction_scores (rounded score, label, region)"
    source_kind = "postgres"
    target_kind = "postgres"
    partition_label = "deployment"
    status = "available"

    def __init__(self, source_url: str, target_url: str, options: dict[str, Any]) -> None:
        super().__init__(source_url, target_url, options)
        self.source = Source(source_url)
        self.sink = Sink(target_url)
        self.predictions = identifier(f"{options.get('source_schema', 'public')}.archived_predictions")
        schema = options.get("target_schema", "public")
        self.table = SCORES if schema == "public" else TableSpec(f"{schema}.{SCORES.name}", SCORES.columns, SCORES.key)
        self.target = identifier(self.table.name)

    @classmethod
    def plan_options(cls, **flags: Any) -> dict[str, Any]:
        return {"source_schema": flags.get("source_schema") or "public",
                "target_schema": flags.get("target_schema") or "public"}

    def check_services(self) -> None:
        self.source.check_reachable()
        self.sink.check_reachable()

    # -- planning ----------------------------------------------------------------------------------

    def _target_exists(self) -> bool:
        return bool(self.sink.query("SELECT to_regclass(%s) IS NOT NULL", [self.table.name])[0][0])

    def _partitions(self, selection: Selection) -> dict[str, int]:
        """Source rows per deployment, plus deployments only the target still has (their rows are to be
        deleted), limited to the selection."""
        counts = {d: int(n) for d, n in self.source.query(
            sql.SQL("SELECT deployment_id, count(*) FROM {} GROUP BY 1").format(self.predictions))}
        if self._target_exists():
            for (d,) in self.sink.query(sql.SQL("SELECT DISTINCT deployment_id FROM {}").format(self.target)):
                counts.setdefault(d, 0)
        if selection.partitions is None:
            return counts
        unknown = sorted(set(selection.partitions) - set(counts))
        if unknown:
            raise ConfigError(f"unknown deployment ids: {', '.join(unknown)}; "
                              "list them with: SELECT DISTINCT deployment_id FROM archived_predictions")
        return {d: counts[d] for d in selection.partitions}

    def count_partitions(self, selection: Selection) -> list[PartitionCount]:
        return [PartitionCount(ENTITY, d, n) for d, n in sorted(self._partitions(selection).items())]

    def plan_chunks(self, selection: Selection, chunk_rows: int) -> Iterator[ChunkSpec]:
        """Every chunk_rows-th id of a deployment starts a chunk; the first and last are open-ended, so
        the chunks of a deployment cover every id the target might hold."""
        partitions = self._partitions(selection)
        starts: dict[str, list[int]] = {d: [] for d in partitions}
        query = sql.SQL(
            "SELECT deployment_id, id FROM (SELECT deployment_id, id, row_number() OVER"
            " (PARTITION BY deployment_id ORDER BY id) - 1 AS n FROM {} WHERE deployment_id = ANY(%s)) s"
            " WHERE mod(n, %s) = 0 AND n > 0 ORDER BY 1, 2").format(self.predictions)
        for deployment, row_id in self.source.query(query, [list(partitions), chunk_rows]):
            starts[deployment].append(int(row_id))
        for deployment in sorted(partitions):
            bounds = ["", *map(str, starts[deployment]), ""]
            remaining = partitions[deployment]
            for lo, hi in zip(bounds, bounds[1:]):
                est = min(chunk_rows, remaining)
                remaining -= est
                yield ChunkSpec(ENTITY, deployment, lo, hi, est)

    def prepare_target(self) -> None:
        self.sink.ensure_table(self.table)

    # -- one chunk ---------------------------------------------------------------------------------

    @staticmethod
    def _owned(spec: ChunkSpec) -> sql.Composable:
        """The rows a chunk owns, in source and target alike: its deployment, its id range."""
        parts = [sql.SQL("deployment_id = {}").format(sql.Literal(spec.partition))]
        if spec.lo:
            parts.append(sql.SQL("id >= {}").format(sql.Literal(int(spec.lo))))
        if spec.hi:
            parts.append(sql.SQL("id < {}").format(sql.Literal(int(spec.hi))))
        return sql.SQL(" AND ").join(parts)

    def _query(self, spec: ChunkSpec) -> sql.Composable:
        return sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY id").format(
            sql.SQL(", ").join(map(sql.Identifier, SOURCE_COLUMNS)), self.predictions, self._owned(spec))

    def run_chunk(self, spec: ChunkSpec, progress: ProgressCallback) -> ChunkOutcome:
        outcome = ChunkOutcome()
        rows = []
        for row in self.source.stream(self._query(spec), SOURCE_TYPES):
            outcome.rows_read += 1
            try:
                rows.append(transform(row))
            except ValueError as exc:
                outcome.rejects.append(Reject(ENTITY, str(row[0]), str(exc), json.dumps(row, default=str)[:500]))
            if outcome.rows_read % PROGRESS_EVERY == 0:
                progress(outcome.rows_read)  # rows read so far in this chunk (Flower, `shuttle watch`)
        progress(outcome.rows_read)
        outcome.writes = {ENTITY: self.sink.upsert(self.table, rows, owned=self._owned(spec))}
        return outcome

    # -- checks ------------------------------------------------------------------------------------

    def _per_deployment(self, run_query: Any, table: sql.Composable, partitions: Sequence[str]) -> dict[str, int]:
        query = sql.SQL("SELECT deployment_id, count(*) FROM {} WHERE deployment_id = ANY(%s) GROUP BY 1").format(table)
        return {d: int(n) for d, n in run_query(query, [list(partitions)])}

    def target_counts(self, partitions: Sequence[str]) -> dict[tuple[str, str], int]:
        found = self._per_deployment(self.sink.query, self.target, partitions) if self._target_exists() else {}
        return {(ENTITY, d): found.get(d, 0) for d in partitions}

    def verify(self, selection: Selection, partitions: Sequence[str], rejected: dict[str, int]) -> list[Check]:
        """Every source row of a deployment is in the target or a reject, and nothing else is there."""
        source = self._per_deployment(self.source.query, self.predictions, partitions)
        target = self._per_deployment(self.sink.query, self.target, partitions)
        checks = []
        for d in partitions:
            src, dst, rej = source.get(d, 0), target.get(d, 0), rejected.get(d, 0)
            ok = src == dst + rej
            detail = "" if ok else f"source {src:,} rows ≠ target {dst:,} + rejects {rej:,}"
            checks.append(Check(ENTITY, d, ok, src, dst, rej, detail))
        return checks

    def close(self) -> None:
        self.source.close()
        self.sink.close()
