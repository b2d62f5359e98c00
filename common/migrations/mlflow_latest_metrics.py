"""`mlflow-latest-metrics`: rebuild MLflow's `latest_metrics` from `metrics`, exactly as MLflow computes it.

    source (MLflow DB)                          target (the same DB, or another with MLflow's schema)
    ──────────────────────────────────────────  ──────────────────────────────────────────────────────
    metrics   one row per logged value       →  latest_metrics   one row per (key, run_uuid):
      key, value, timestamp, step, is_nan,        the row with the greatest (step, timestamp, value)
      run_uuid                                    key, value, timestamp, step, is_nan, run_uuid
    runs      run_uuid → experiment_id       →  (partition: experiment; chunks: run_uuid ranges)

"Latest" is MLflow's rule (SqlAlchemyStore._update_latest_metrics_if_necessary): a logged metric
replaces the latest one only when its (step, timestamp, value) tuple is *strictly* greater, compared
on the values as stored: NaN as value 0 with is_nan true, ±Inf as ±1.7976931348623157e308. So the
latest row of a (run, key) is the first in `ORDER BY step DESC, timestamp DESC, value DESC`.

Each chunk finds it without sorting the chunk: MLflow's own index on (run_uuid, key, step) yields
the (run, key) pairs and their row counts from an index-only scan, then one backward index probe
per pair reads only the rows at the greatest step. When the target is the source database (in
place, the usual case) the chunk is one `INSERT … SELECT` statement and no row leaves the server;
into another database the chunk's latest rows are streamed out and upserted there.

The one case that order does not decide: a NaN (stored 0) and a 0.0 at the same (step, timestamp)
tie, and MLflow keeps whichever was logged *first*, which `metrics` does not record. What is compared:
an existing row is rewritten when its step, timestamp, value or is_nan differ from the winner's, except
that (1) an existing row that ties with the winner (same step, timestamp and value 0, and a metric row
with its is_nan exists there) is kept, so a rebuild over a table MLflow maintained leaves it as MLflow
had it; (2) a missing row gets the NaN (`is_nan DESC`), as MLflow's own metric-history sampling picks
its last point. So a row wrong only in is_nan (is_nan true on a value no NaN was logged at) is repaired.

Chunks are ranges of run_uuid inside one experiment, contiguous and open-ended at both ends of the
experiment, and a run is never split, so every (run, key) group is computed whole inside exactly one
chunk; the upsert on (key, run_uuid) makes re-running a chunk change nothing. A chunk owns the
latest_metrics rows of its range's runs (by the target's `runs`): a pair whose metrics are gone is
deleted by the same statement (unless --keep-deleted or --only-missing), and an experiment with rows
left in latest_metrics but no metrics gets one chunk for its whole range. Each chunk commits in one
transaction, so after a failure or a cancel every row in latest_metrics is either as before or
correct, and `shuttle resume` redoes only what is left. No chunk is ever skipped, so there is no
fingerprint to compare (--recompute changes nothing here).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from psycopg import sql

from common.connectors.base import Column, TableSpec
from common.connectors.postgres import Sink, Source, identifier, same_database
from common.errors import ConfigError
from common.migrations.base import Check, Migration, ProgressCallback, Selection
from common.model import ChunkOutcome, ChunkSpec, PartitionCount

ENTITY = "metrics"
TARGET = "latest_metrics"

LATEST_METRICS = TableSpec(
    name=TARGET,
    columns=(
        #      MLflow column     type (MLflow's own: varchar(250), double precision, bigint, boolean)
        Column("key",            "varchar"),
        Column("value",          "float8"),
        Column("timestamp",      "int8"),
        Column("step",           "int8"),
        Column("is_nan",         "bool"),
        Column("run_uuid",       "varchar"),
    ),
    key=("key", "run_uuid"),
)
# Whether the winner is a NaN with a 0.0 logged at the same (step, timestamp): MLflow's one tie.
TIE = "tie"
# MLflow's order, greatest first; the last term only breaks the NaN-vs-0.0 tie (see the module docstring).
LATEST_FIRST = sql.SQL("m.step DESC, m.timestamp DESC, m.value DESC, m.is_nan DESC")
# Each latest row carries how many metric rows its (run, key) has: the chunk's rows scanned.
SCANNED = "scanned"


def cut_runs(run_counts: Sequence[tuple[str, int]], chunk_rows: int) -> Iterator[tuple[str, str, int]]:
    """Group consecutive (run_uuid, metric rows) into (first run, last run, rows) of at most `chunk_rows`.

    A run is never split (its groups must be computed whole), so a run above the bound becomes a chunk
    of its own; that is the only way a chunk exceeds `chunk_rows`.
    """
    first = last = None
    rows = 0
    for run_uuid, count in run_counts:
        if first is not None and rows + count > chunk_rows:
            yield first, last, rows
            first, rows = None, 0
        if first is None:
            first = run_uuid
        last, rows = run_uuid, rows + count
    if first is not None:
        yield first, last, rows


def contiguous(cuts: Sequence[tuple[str, str, int]]) -> Iterator[tuple[str, str, int]]:
    """`cut_runs`' (first, last) as half-open [lo, hi) ranges: each ends where the next begins, the first
    and the last open-ended (""), so every run_uuid of the experiment belongs to exactly one chunk."""
    cuts = list(cuts)
    for i, (first, _, rows) in enumerate(cuts):
        yield ("" if i == 0 else first), (cuts[i + 1][0] if i + 1 < len(cuts) else ""), rows


def experiment_ids(partitions: Sequence[str]) -> list[int]:
    """MLflow's experiment ids are integers; anything else is a usage error, named."""
    bad = sorted(p for p in partitions if not p.isdigit())
    if bad:
        raise ConfigError(f"experiment ids must be whole numbers, got: {', '.join(bad)}; "
                          "list them with: SELECT experiment_id, name FROM experiments")
    return [int(p) for p in partitions]


class LatestMetrics(Migration):
    name = "mlflow-latest-metrics"
    summary = "MLflow metrics → latest_metrics, recomputed in parallel by MLflow's own rule"
    source_kind = "postgres"
    target_kind = "postgres"
    partition_label = "experiment"
    status = "available"

    def __init__(self, source_url: str, target_url: str, options: dict[str, Any]) -> None:
        super().__init__(source_url, target_url, options)
        self.source = Source(source_url)
        self.in_place = same_database(source_url, target_url)
        self.sink = Sink(target_url)
        src, dst = options.get("source_schema", "public"), options.get("target_schema", "public")
        self._metrics = identifier(f"{src}.metrics")
        self._runs = identifier(f"{src}.runs")
        self._experiments = identifier(f"{src}.experiments")
        self._target_runs = identifier(f"{dst}.runs")
        self.table = LATEST_METRICS if dst == "public" else \
            TableSpec(f"{dst}.{TARGET}", LATEST_METRICS.columns, LATEST_METRICS.key)
        self._run_counts: dict[tuple[str, ...] | None, list[tuple[str, str, int]]] = {}

    @classmethod
    def plan_options(cls, **flags: Any) -> dict[str, Any]:
        return {"source_schema": flags.get("source_schema") or "public",
                "target_schema": flags.get("target_schema") or "public",
                "only_missing": bool(flags.get("only_missing")),
                "keep_deleted": bool(flags.get("keep_deleted")),
                "recompute": bool(flags.get("recompute"))}

    @property
    def _deletes(self) -> bool:
        """Whether chunks delete pairs the source no longer yields (not for --only-missing or --keep-deleted)."""
        return not (self.options.get("only_missing") or self.options.get("keep_deleted"))

    # -- planning ----------------------------------------------------------------------------------

    def check_services(self) -> None:
        self.source.check_reachable()
        self.sink.check_reachable()

    def _per_run(self, selection: Selection) -> list[tuple[str, str, int]]:
        """(experiment, run_uuid, metric rows) in byte order of run_uuid: one aggregate, no metric rows."""
        if selection.partitions not in self._run_counts:
            where, params = sql.SQL("TRUE"), []
            if selection.partitions is not None:
                where, params = sql.SQL("r.experiment_id = ANY(%s)"), [experiment_ids(selection.partitions)]
            query = sql.SQL(
                "SELECT r.experiment_id::text, r.run_uuid, m.n FROM {runs} r"
                " JOIN (SELECT run_uuid, count(*) AS n FROM {metrics} GROUP BY run_uuid) m USING (run_uuid)"
                " WHERE {where} ORDER BY r.experiment_id, r.run_uuid COLLATE \"C\""
            ).format(runs=self._runs, metrics=self._metrics, where=where)
            self._run_counts[selection.partitions] = [(e, r, int(n)) for e, r, n in self.source.query(query, params)]
        return self._run_counts[selection.partitions]

    def count_partitions(self, selection: Selection) -> list[PartitionCount]:
        totals: dict[str, int] = {}
        for experiment, _, rows in self._per_run(selection):
            totals[experiment] = totals.get(experiment, 0) + rows
        known = {str(e) for (e,) in self.source.query(sql.SQL("SELECT experiment_id FROM {}").format(self._experiments))}
        if selection.partitions is not None:
            unknown = sorted(set(selection.partitions) - known, key=lambda p: (len(p), p))
            if unknown:
                raise ConfigError(f"unknown experiment ids: {', '.join(unknown)}; "
                                  "list them with: SELECT experiment_id, name FROM experiments")
            wanted = set(selection.partitions)
        else:
            wanted = known | set(totals)
        return [PartitionCount(ENTITY, e, totals.get(e, 0)) for e in sorted(wanted, key=lambda p: (len(p), p))]

    def plan_chunks(self, selection: Selection, chunk_rows: int) -> Iterator[ChunkSpec]:
        by_experiment: dict[str, list[tuple[str, int]]] = {}
        for experiment, run_uuid, rows in self._per_run(selection):
            by_experiment.setdefault(experiment, []).append((run_uuid, rows))
        if self._deletes:
            for experiment in self._experiments_in_target(selection):
                by_experiment.setdefault(experiment, [])
        for experiment in sorted(by_experiment, key=lambda p: (len(p), p)):
            cuts = list(cut_runs(by_experiment[experiment], chunk_rows)) or [("", "", 0)]
            for lo, hi, rows in contiguous(cuts):
                yield ChunkSpec(ENTITY, experiment, lo, hi, rows)

    def _experiments_in_target(self, selection: Selection) -> list[str]:
        """Experiments with rows in the target's latest_metrics: one whose metrics are all gone still gets
        a chunk, which deletes its rows. One pass over latest_metrics (a row per pair, not per metric)."""
        where, params = sql.SQL("TRUE"), []
        if selection.partitions is not None:
            where, params = sql.SQL("r.experiment_id = ANY(%s)"), [experiment_ids(selection.partitions)]
        query = sql.SQL("SELECT DISTINCT r.experiment_id::text FROM {latest} l JOIN {runs} r USING (run_uuid)"
                        " WHERE {where}").format(latest=identifier(self.table.name), runs=self._target_runs, where=where)
        return [e for (e,) in self._target_query(query, params)]

    def prepare_target(self) -> None:
        """The target is MLflow's own table: never created here, only checked to have MLflow's columns."""
        exists = self._target_query(sql.SQL("SELECT to_regclass(%s) IS NOT NULL"), [self.table.name])[0][0]
        if not exists:
            raise ConfigError(f"target {self.sink.public_url} has no table {self.table.name}; point --target-url at "
                              "an MLflow database, or create MLflow's schema there first (`mlflow db upgrade URL`)")
        self.sink.ensure_table(self.table)

    # -- one chunk ---------------------------------------------------------------------------------

    def run_chunk(self, spec: ChunkSpec, progress: ProgressCallback) -> ChunkOutcome:
        """In place: one statement computes and upserts the chunk. Elsewhere: stream out, upsert there."""
        only_missing = bool(self.options.get("only_missing"))
        owned = self._owned(spec) if self._deletes else None
        if self.in_place:
            written, scanned = self.sink.upsert_query(self.table, self._latest(spec), only_missing=only_missing,
                                                      tally=SCANNED, owned=owned)
            progress(scanned)
            return ChunkOutcome(rows_read=scanned, writes={TARGET: written})
        rows, ties, scanned = [], [], 0
        types = [*(c.type for c in LATEST_METRICS.columns), "int8", "bool"]
        for *row, group_rows, tie in self.source.stream(self._latest(spec), types):
            (ties if tie else rows).append(tuple(row))
            scanned += group_rows
        progress(scanned)
        rows += self._keep_tied(ties)
        if only_missing:
            written = self.sink.insert_missing(self.table, rows)
        else:
            written = self.sink.upsert(self.table, rows, owned=owned)
        return ChunkOutcome(rows_read=scanned, writes={TARGET: written})

    def _keep_tied(self, ties: list[tuple]) -> list[tuple]:
        """Winners of MLflow's NaN-vs-0.0 tie (into another database): each takes the is_nan of the target's
        row when that row holds the same (step, timestamp, value), since either is MLflow's answer."""
        if not ties:
            return []
        found = {(k, r): nan for k, r, nan in self._target_query(sql.SQL(
            "SELECT t.key, t.run_uuid, t.is_nan FROM {} t JOIN unnest(%s::text[], %s::text[], %s::int8[], %s::int8[])"
            " AS w(key, run_uuid, step, timestamp) USING (key, run_uuid) WHERE t.step = w.step"
            " AND t.timestamp = w.timestamp AND t.value = 0").format(identifier(self.table.name)),
            [[t[0] for t in ties], [t[5] for t in ties], [t[3] for t in ties], [t[2] for t in ties]])}
        return [(key, value, ts, step, found.get((key, run), is_nan), run) for key, value, ts, step, is_nan, run in ties]

    def _runs_in(self, runs: sql.Composable, spec: ChunkSpec) -> sql.Composable:
        """The run_uuids of `runs` (a runs table) in the chunk's experiment and [lo, hi) range (byte order)."""
        conditions = [sql.SQL("experiment_id = {}").format(sql.Literal(int(spec.partition)))]
        if spec.lo:
            conditions.append(sql.SQL("run_uuid COLLATE \"C\" >= {}").format(sql.Literal(spec.lo)))
        if spec.hi:
            conditions.append(sql.SQL("run_uuid COLLATE \"C\" < {}").format(sql.Literal(spec.hi)))
        return sql.SQL("SELECT run_uuid FROM {} WHERE {}").format(runs, sql.SQL(" AND ").join(conditions))

    def _owned(self, spec: ChunkSpec) -> sql.Composable:
        """The latest_metrics rows a chunk owns: those of its range's runs, as the target's `runs` has them
        (so a run deleted from another source database is still found in the target's)."""
        return sql.SQL("run_uuid = ANY(ARRAY({}))").format(self._runs_in(self._target_runs, spec))

    def _latest(self, spec: ChunkSpec) -> sql.Composable:
        """The chunk's latest row per (run, key), with the metric rows of that pair, by MLflow's index.

        The chunk's runs come first as a small array, so both reads of metrics are index lookups:
        the pairs and their counts from an index-only scan of (run_uuid, key, step), each pair's
        latest row from a backward probe that stops after the greatest step. Only a NaN winner is
        probed once more, for a 0.0 at its (step, timestamp): MLflow's tie. In place, a tied winner
        takes the is_nan of the existing row at that point (either is MLflow's answer); elsewhere the
        `tie` column lets `_keep_tied` do that in the target.
        """
        tie = sql.SQL(
            "(l.is_nan AND EXISTS (SELECT 1 FROM {metrics} t WHERE t.run_uuid = l.run_uuid AND t.key = l.key"
            " AND t.step = l.step AND t.timestamp = l.timestamp AND t.value = l.value AND NOT t.is_nan))"
        ).format(metrics=self._metrics)
        if self.in_place:
            is_nan = sql.SQL(
                "CASE WHEN {tie} THEN coalesce((SELECT c.is_nan FROM {latest} c WHERE c.key = l.key"
                " AND c.run_uuid = l.run_uuid AND c.step = l.step AND c.timestamp = l.timestamp"
                " AND c.value = l.value), true) ELSE l.is_nan END"
            ).format(tie=tie, latest=identifier(self.table.name))
            tie = sql.SQL("false")
        else:
            is_nan = sql.SQL("l.is_nan")
        return sql.SQL(
            "SELECT l.key, l.value, l.timestamp, l.step, {is_nan} AS is_nan, l.run_uuid, p.n AS {scanned},"
            " {tie} AS {tie_name}"
            " FROM (SELECT run_uuid, key, count(*) AS n FROM {metrics}"
            "       WHERE run_uuid = ANY(ARRAY({runs}))"
            "       GROUP BY run_uuid, key) p"
            " CROSS JOIN LATERAL (SELECT m.key, m.value, m.timestamp, m.step, m.is_nan, m.run_uuid"
            "   FROM {metrics} m WHERE m.run_uuid = p.run_uuid AND m.key = p.key"
            "   ORDER BY {order} LIMIT 1) l"
        ).format(runs=self._runs_in(self._runs, spec), metrics=self._metrics, order=LATEST_FIRST,
                 scanned=sql.Identifier(SCANNED), is_nan=is_nan, tie=tie, tie_name=sql.Identifier(TIE))

    # -- after the run -----------------------------------------------------------------------------

    def target_counts(self, partitions: Sequence[str]) -> dict[tuple[str, str], int]:
        query = sql.SQL("SELECT r.experiment_id::text, count(*) FROM {latest} l JOIN {runs} r USING (run_uuid)"
                        " WHERE r.experiment_id = ANY(%s) GROUP BY 1").format(
            latest=identifier(self.table.name), runs=self._target_runs)
        counts = {(TARGET, p): 0 for p in partitions}
        for experiment, n in self._target_query(query, [experiment_ids(partitions)]):
            counts[(TARGET, experiment)] = int(n)
        return counts

    def verify(self, selection: Selection, partitions: Sequence[str], rejected: dict[str, int]) -> list[Check]:
        """Per experiment: distinct (run, key) pairs in metrics == rows of latest_metrics for its runs."""
        # GROUP BY rather than DISTINCT: PostgreSQL then streams the pairs straight off MLflow's
        # (run_uuid, key, step) index, about a third faster than DISTINCT's plan at 2M metric rows.
        query = sql.SQL("SELECT r.experiment_id::text, count(*) FROM (SELECT run_uuid, key FROM {metrics}"
                        " GROUP BY run_uuid, key) p JOIN {runs} r USING (run_uuid)"
                        " WHERE r.experiment_id = ANY(%s) GROUP BY 1").format(metrics=self._metrics, runs=self._runs)
        pairs = {e: int(n) for e, n in self.source.query(query, [experiment_ids(partitions)])}
        target = self.target_counts(partitions)
        checks = []
        for experiment in partitions:
            src, dst = pairs.get(experiment, 0), target[(TARGET, experiment)]
            ok = src == dst
            detail = "" if ok else (f"{src} (run, key) pairs in metrics but {dst} rows in latest_metrics"
                                    + (" (--only-missing leaves other rows as they were)"
                                       if self.options.get("only_missing") else ""))
            checks.append(Check(TARGET, experiment, ok, src, dst, rejected.get(experiment, 0), detail))
        return checks

    def storage_sizes(self) -> dict[str, int]:
        size = sql.SQL("SELECT coalesce(pg_total_relation_size(to_regclass(%s)), 0)")
        schema = self.options.get("source_schema", "public")
        return {"source_bytes": int(self.source.query(size, [f"{schema}.metrics"])[0][0]),
                "target_bytes": int(self._target_query(size, [self.table.name])[0][0])}

    def _target_query(self, query: sql.Composable, params: Sequence[Any]) -> list[tuple]:
        return self.sink.query(query, params)  # a lost connection is transient there, so the chunk retries

    def close(self) -> None:
        self.source.close()
        self.sink.close()
