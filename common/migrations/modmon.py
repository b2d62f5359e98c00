"""`modmon`: archived model-monitoring predictions → compact hourly statistics (PostgreSQL → PostgreSQL).

    source                                   target (one row per …)
    ───────────────────────────────────────  ─────────────────────────────────────────────────────────
    archived_predictions, per deployment  →  prediction_stats_hourly   (deployment, model, hour)
      prediction, actual, association_id       count, sum, sum of squares, min, max, histogram,
                                               actuals, squared error, associations
      features (JSON text)                →  feature_drift_hourly      (deployment, model, feature, hour)
                                               count, nulls, moments, histogram, top categories
    deployments (after a clean run)       →  drift_tracking_settings   (deployment): re-enabled

Chunks are (deployment, hour-aligned time range), so every hourly bucket is computed inside exactly
one chunk and its upsert replaces it whole: re-running a chunk rewrites identical rows, which the
guarded upsert reports as unchanged. A deployment's ranges are contiguous, the first and last open-ended
(or ending at --since/--until), so every hour belongs to one chunk, hours with no rows left included; a
chunk deletes the buckets of its range that the source no longer yields (unless --keep-deleted). A
deployment whose rows are all gone but whose buckets remain gets one chunk for all of its time.

A chunk is skipped (its recorded outcome reported) only when both fingerprints match what it recorded
in the same transaction as its buckets: the source range's (every column read, NULL distinct from
empty) and its buckets' in the target (so a bucket edited by hand is recomputed). --recompute skips
nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from common.connectors.base import Column, TableSpec
from common.connectors.postgres import Sink, Source, identifier
from common.errors import ConfigError
from common.migrations.base import Check, Migration, ProgressCallback, Selection
from common.migrations.hourly_stats import FeatureStats, PredictionStats
from common.model import ChunkOutcome, ChunkSpec, PartitionCount, Reject, WriteCounts

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
HOUR_FORMAT = "%Y%m%dT%H"
ENTITY = "predictions"
PROGRESS_EVERY = 20_000
EARLIEST_VALID = datetime(2000, 1, 1, tzinfo=timezone.utc)

_KEY = (Column("deployment_id", "text"), Column("model_id", "text"))
PREDICTION_STATS = TableSpec(
    name="prediction_stats_hourly",
    columns=(*_KEY, Column("hour", "timestamptz"),
             Column("prediction_count", "int8"), Column("prediction_sum", "float8"),
             Column("prediction_sum_sq", "float8"), Column("prediction_min", "float8"),
             Column("prediction_max", "float8"), Column("prediction_histogram", "int8[]"),
             Column("actual_count", "int8"), Column("actual_sum", "float8"), Column("actual_sum_sq", "float8"),
             Column("squared_error_sum", "float8"), Column("association_count", "int8")),
    key=("deployment_id", "model_id", "hour"),
)
FEATURE_DRIFT = TableSpec(
    name="feature_drift_hourly",
    columns=(*_KEY, Column("feature", "text"), Column("hour", "timestamptz"),
             Column("value_count", "int8"), Column("null_count", "int8"), Column("numeric_count", "int8"),
             Column("value_sum", "float8"), Column("value_sum_sq", "float8"), Column("value_min", "float8"),
             Column("value_max", "float8"), Column("histogram", "int8[]"), Column("category_count", "int8"),
             Column("top_categories", "jsonb"), Column("other_category_count", "int8")),
    key=("deployment_id", "model_id", "feature", "hour"),
)
# What each chunk last read and wrote, committed with its rows: a re-run whose source range is
# unchanged and whose buckets are as it wrote them (both fingerprints equal) skips the read and aggregation.
CHUNK_STATE = TableSpec(
    name="shuttle_modmon_chunks",
    columns=(Column("chunk_key", "text"), Column("source_fingerprint", "text"), Column("rows_read", "int8"),
             Column("prediction_rows", "int8"), Column("feature_rows", "int8"), Column("rejects", "jsonb"),
             Column("target_fingerprint", "text")),
    key=("chunk_key",),
)
# Bumped whenever the fingerprints' definition changes, so no state recorded by an older one matches.
FINGERPRINT_VERSION = "v2"
DRIFT_TRACKING = TableSpec(
    name="drift_tracking_settings",
    columns=(Column("deployment_id", "text"), Column("drift_tracking_enabled", "bool")),
    key=("deployment_id",),
)


def hour_label(hour: int) -> str:
    return (EPOCH + timedelta(hours=hour)).strftime(HOUR_FORMAT)


def hour_number(label: str) -> int:
    moment = datetime.strptime(label, HOUR_FORMAT).replace(tzinfo=timezone.utc)
    return int((moment - EPOCH).total_seconds()) // 3600


def hour_start(hour: int) -> datetime:
    return EPOCH + timedelta(hours=hour)


def cut_hours(hour_counts: Sequence[tuple[int, int]], chunk_rows: int) -> Iterator[tuple[int, int, int]]:
    """Group consecutive (hour, rows) into ranges [lo, hi) of at most `chunk_rows` rows.

    An hour is never split (its bucket must be computed whole), so one hour above the bound becomes
    a chunk of its own; that is the only way a chunk exceeds `chunk_rows`.
    """
    lo = hi = None
    rows = 0
    for hour, count in hour_counts:
        if lo is not None and rows + count > chunk_rows:
            yield lo, hi, rows
            lo, rows = None, 0
        if lo is None:
            lo = hour
        hi, rows = hour + 1, rows + count
    if lo is not None:
        yield lo, hi, rows


def span_ranges(cuts: Sequence[tuple[int, int, int]], since: int | None, until: int | None
                ) -> Iterator[tuple[int | None, int | None, int]]:
    """Make `cut_hours`' ranges contiguous: each ends where the next begins, the first starts at `since`
    and the last ends at `until` (None: open-ended). Every hour of the deployment in the window then
    belongs to exactly one chunk, hours without rows included, so no bucket is left unowned."""
    cuts = list(cuts)
    for i, (lo, _, rows) in enumerate(cuts):
        yield (since if i == 0 else lo), (cuts[i + 1][0] if i + 1 < len(cuts) else until), rows


def chunk_hours(spec: ChunkSpec) -> tuple[datetime | None, datetime | None]:
    """The chunk's [lo, hi) as datetimes; an empty label is an open end."""
    return (hour_start(hour_number(spec.lo)) if spec.lo else None,
            hour_start(hour_number(spec.hi)) if spec.hi else None)


def _in_range(column: str, lo: datetime | None, hi: datetime | None) -> sql.Composable:
    """`column` in [lo, hi), either end open when None (values inlined as literals)."""
    conditions: list[sql.Composable] = [sql.SQL("TRUE")]
    if lo is not None:
        conditions.append(sql.SQL("{} >= {}").format(sql.Identifier(column), sql.Literal(lo)))
    if hi is not None:
        conditions.append(sql.SQL("{} < {}").format(sql.Identifier(column), sql.Literal(hi)))
    return sql.SQL(" AND ").join(conditions)


def _window_hours(selection: Selection) -> tuple[int | None, int | None]:
    bounds = []
    for name, moment in (("--since", selection.since), ("--until", selection.until)):
        if moment is None:
            bounds.append(None)
            continue
        moment = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
        seconds = (moment - EPOCH).total_seconds()
        if seconds % 3600:
            raise ConfigError(f"{name} {moment.isoformat()} is not on a whole hour; modmon migrates whole "
                              "hourly buckets, so give e.g. 2024-01-01T00:00")
        bounds.append(int(seconds) // 3600)
    return bounds[0], bounds[1]


def _window_conditions(column: str, selection: Selection) -> tuple[list[sql.Composable], list[Any]]:
    """SQL conditions (and parameters) limiting `column` to the selection's --since/--until window."""
    conditions: list[sql.Composable] = [sql.SQL("TRUE")]
    params: list[Any] = []
    for operator, bound in zip((">=", "<"), _window_hours(selection)):
        if bound is not None:
            conditions.append(sql.SQL("{} " + operator + " %s").format(sql.Identifier(column)))
            params.append(hour_start(bound))
    return conditions, params


class Modmon(Migration):
    name = "modmon"
    summary = "Archived model-monitoring predictions → hourly prediction and feature-drift statistics"
    source_kind = "postgres"
    target_kind = "postgres"
    partition_label = "deployment"
    status = "available"

    def __init__(self, source_url: str, target_url: str, options: dict[str, Any]) -> None:
        super().__init__(source_url, target_url, options)
        self.source = Source(source_url)
        self.sink = Sink(target_url)
        src_schema = options.get("source_schema", "public")
        dst_schema = options.get("target_schema", "public")
        self._predictions = identifier(f"{src_schema}.archived_predictions")
        self._deployments = identifier(f"{src_schema}.deployments")
        self._source_tables = (f"{src_schema}.archived_predictions",)
        self.tables = {spec.name: _in_schema(spec, dst_schema)
                       for spec in (PREDICTION_STATS, FEATURE_DRIFT, DRIFT_TRACKING, CHUNK_STATE)}
        for table in self.tables.values():
            identifier(table.name)  # a hostile --target-schema is refused before any query names it
        self._hour_counts: dict[tuple[str, ...] | None, list[tuple[str, int, int]]] = {}

    @classmethod
    def plan_options(cls, **flags: Any) -> dict[str, Any]:
        valid_until = (datetime.now(timezone.utc) + timedelta(days=1)).replace(minute=0, second=0, microsecond=0)
        return {
            "source_schema": flags.get("source_schema") or "public",
            "target_schema": flags.get("target_schema") or "public",
            "reenable_drift_tracking": bool(flags.get("reenable_drift_tracking")),
            "keep_deleted": bool(flags.get("keep_deleted")),
            "recompute": bool(flags.get("recompute")),
            # Fixed at plan time so every chunk of a run applies the same rule.
            "valid_from_hour": (int((EARLIEST_VALID - EPOCH).total_seconds()) // 3600),
            "valid_until_hour": int((valid_until - EPOCH).total_seconds()) // 3600,
        }

    # -- planning ----------------------------------------------------------------------------------

    def check_services(self) -> None:
        self.source.check_reachable()
        self.sink.check_reachable()

    def _hourly(self, selection: Selection) -> list[tuple[str, int, int]]:
        """(deployment, hour, rows) for the selection: one aggregate scan, no rows in memory."""
        cache_key = (selection.partitions, selection.since, selection.until)
        if cache_key not in self._hour_counts:
            conditions, params = _window_conditions("ts", selection)
            if selection.partitions is not None:
                conditions.append(sql.SQL("deployment_id = ANY(%s)"))
                params.append(list(selection.partitions))
            query = sql.SQL(
                "SELECT deployment_id, floor(extract(epoch FROM ts) / 3600)::int8 AS hour, count(*)"
                " FROM {} WHERE {} AND ts IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2"
            ).format(self._predictions, sql.SQL(" AND ").join(conditions))
            self._hour_counts[cache_key] = [(d, int(h), int(n)) for d, h, n in self.source.query(query, params)]
        return self._hour_counts[cache_key]

    def count_partitions(self, selection: Selection) -> list[PartitionCount]:
        totals: dict[str, int] = {}
        for deployment, _, rows in self._hourly(selection):
            totals[deployment] = totals.get(deployment, 0) + rows
        known = {row[0] for row in self.source.query(sql.SQL("SELECT id FROM {}").format(self._deployments))}
        if not self.options.get("keep_deleted"):
            known |= set(self._bucketed_deployments(selection))  # gone from the source, buckets left to delete
        if selection.partitions is not None:
            unknown = sorted(set(selection.partitions) - known - set(totals))
            if unknown:
                raise ConfigError(f"unknown deployment ids: {', '.join(unknown)}; "
                                  "list them with: SELECT id FROM deployments")
            wanted = selection.partitions
        else:
            wanted = tuple(sorted(known | set(totals)))
        return [PartitionCount(ENTITY, d, totals.get(d, 0)) for d in sorted(set(wanted))]

    def plan_chunks(self, selection: Selection, chunk_rows: int) -> Iterator[ChunkSpec]:
        by_deployment: dict[str, list[tuple[int, int]]] = {}
        for deployment, hour, rows in self._hourly(selection):
            by_deployment.setdefault(deployment, []).append((hour, rows))
        since, until = _window_hours(selection)
        if not self.options.get("keep_deleted"):
            for deployment in self._bucketed_deployments(selection):
                by_deployment.setdefault(deployment, [])
        for deployment in sorted(by_deployment):
            cuts = list(cut_hours(by_deployment[deployment], chunk_rows)) or [(since, until, 0)]
            for lo, hi, rows in span_ranges(cuts, since, until):
                yield ChunkSpec(ENTITY, deployment, _label(lo), _label(hi), rows)

    def _bucketed_deployments(self, selection: Selection) -> list[str]:
        """Deployments with buckets in the target (in the selection's window): those whose source rows
        are all gone still get a chunk, which deletes their buckets. One pass over the hourly tables (a row
        per bucket, not per prediction), only when chunks may delete."""
        names = [self.tables[n].name for n in (PREDICTION_STATS.name, FEATURE_DRIFT.name)]
        if not all(self._target_query(sql.SQL("SELECT to_regclass(%s) IS NOT NULL"), [n])[0][0] for n in names):
            return []
        conditions, params = _window_conditions("hour", selection)
        if selection.partitions is not None:
            conditions.append(sql.SQL("deployment_id = ANY(%s)"))
            params.append(list(selection.partitions))
        where = sql.SQL(" AND ").join(conditions)
        query = sql.SQL("SELECT deployment_id FROM {} WHERE {} UNION SELECT deployment_id FROM {} WHERE {}").format(
            identifier(names[0]), where, identifier(names[1]), where)
        return sorted(d for (d,) in self._target_query(query, params * 2))

    def prepare_target(self) -> None:
        # A state table recorded before the target fingerprint existed gains the column (NULL: never skips).
        # Looked up first: ALTER TABLE locks the table out even when the column is there already.
        state = self.tables[CHUNK_STATE.name].name
        lacking = self._target_query(sql.SQL(
            "SELECT to_regclass(%s) IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid ="
            " to_regclass(%s) AND attname = 'target_fingerprint' AND NOT attisdropped)"), [state, state])[0][0]
        if lacking:
            self.sink.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS target_fingerprint text").format(
                identifier(state)))
        for spec in self.tables.values():
            self.sink.ensure_table(spec)

    # -- one chunk ---------------------------------------------------------------------------------

    def run_chunk(self, spec: ChunkSpec, progress: ProgressCallback) -> ChunkOutcome:
        lo, hi = chunk_hours(spec)
        fingerprint = self._fingerprint(spec.partition, lo, hi)
        unchanged = None if self.options.get("recompute") else self._unchanged_outcome(spec, fingerprint, lo, hi)
        if unchanged is not None:
            progress(unchanged.rows_read)
            return unchanged
        query = sql.SQL(
            "SELECT id, model_id, floor(extract(epoch FROM ts) / 3600)::int8, prediction, actual,"
            " association_id IS NOT NULL, features FROM {} WHERE deployment_id = {} AND {}"
            " ORDER BY ts, id"  # a fixed order makes floating-point sums identical on every re-run
        ).format(self._predictions, sql.Literal(spec.partition), _in_range("ts", lo, hi))
        rows = self.source.stream(query, ["int8", "text", "int8", "float8", "float8", "bool", "text"])
        outcome = ChunkOutcome()
        predictions, features = self._aggregate(rows, outcome, progress)
        deployment = spec.partition
        prediction_rows = [(deployment, model, hour_start(hour), *stats.as_row())
                           for (model, hour), stats in sorted(predictions.items())]
        feature_rows = []
        for (model, feature, hour), stats in sorted(features.items()):
            row = stats.as_row()
            feature_rows.append((deployment, model, feature, hour_start(hour), *row[:9], Jsonb(row[9]), row[10]))
        buckets = {name: self._buckets(spec.partition, lo, hi) for name in (PREDICTION_STATS.name, FEATURE_DRIFT.name)}
        owned = {} if self.options.get("keep_deleted") else {self.tables[n].name: c for n, c in buckets.items()}
        state = sql.SQL(
            "INSERT INTO {state} AS s (chunk_key, source_fingerprint, rows_read, prediction_rows, feature_rows,"
            " rejects, target_fingerprint) VALUES (%s, %s, %s, %s, %s, %s, ({target}))"
            " ON CONFLICT (chunk_key) DO UPDATE SET source_fingerprint = EXCLUDED.source_fingerprint,"
            " rows_read = EXCLUDED.rows_read, prediction_rows = EXCLUDED.prediction_rows,"
            " feature_rows = EXCLUDED.feature_rows, rejects = EXCLUDED.rejects,"
            " target_fingerprint = EXCLUDED.target_fingerprint"
        ).format(state=identifier(self.tables[CHUNK_STATE.name].name), target=self._target_fingerprint_sql(buckets))
        written = self.sink.upsert_together(
            [(self.tables[PREDICTION_STATS.name], prediction_rows), (self.tables[FEATURE_DRIFT.name], feature_rows)],
            owned=owned,
            then=[(state, [spec.chunk_key, fingerprint, outcome.rows_read, len(prediction_rows), len(feature_rows),
                           Jsonb([[r.key, r.reason, r.raw] for r in outcome.rejects])])])
        # Reported under the entity's own name, whatever schema the run writes into.
        outcome.writes = {name: written[self.tables[name].name] for name in (PREDICTION_STATS.name, FEATURE_DRIFT.name)}
        return outcome

    @staticmethod
    def _buckets(deployment: str, lo: datetime | None, hi: datetime | None) -> sql.Composable:
        """The target rows a chunk owns: its deployment's buckets in its hours."""
        return sql.SQL("deployment_id = {} AND {}").format(sql.Literal(deployment), _in_range("hour", lo, hi))

    def _target_fingerprint_sql(self, buckets: dict[str, sql.Composable]) -> sql.Composable:
        """A scalar subquery: count and content hash of the chunk's buckets in both tables (a few hundred
        rows, read through the primary key), so a bucket edited, added or removed by hand is noticed."""
        parts = [sql.SQL("(SELECT count(*) || ':' || coalesce(sum(hashtextextended(t::text, 0)::numeric), 0)"
                         " FROM {} t WHERE {})").format(identifier(self.tables[name].name), condition)
                 for name, condition in buckets.items()]
        return sql.SQL("SELECT {} || '/' || {}").format(*parts)

    def _fingerprint(self, deployment: str, lo: datetime | None, hi: datetime | None) -> str:
        """Count and content hash of the chunk's source rows, plus how many fall outside the valid range
        by this run's rule: equal fingerprints mean an equal result. Computed in the database.

        Each row is hashed as its row text over every column the chunk reads, where NULL and an empty
        string differ (`concat_ws` would skip a NULL, so moving a value between columns went unseen)."""
        query = sql.SQL(
            "SELECT count(*), coalesce(sum(hashtextextended(row(id, model_id, ts, prediction, actual,"
            " association_id, features)::text, 0)::numeric), 0),"
            " count(*) FILTER (WHERE ts < %s OR ts >= %s) FROM {} WHERE deployment_id = %s AND {}"
        ).format(self._predictions, _in_range("ts", lo, hi))
        valid = hour_start(self.options["valid_from_hour"]), hour_start(self.options["valid_until_hour"])
        count, content, out_of_range = self.source.query(query, [*valid, deployment])[0]
        # What a chunk writes depends on --keep-deleted too: a chunk run with it never matches one run without.
        rule = "keep" if self.options.get("keep_deleted") else "own"
        return f"{FINGERPRINT_VERSION}:{rule}:{count}:{content}:{out_of_range}"

    def _unchanged_outcome(self, spec: ChunkSpec, fingerprint: str, lo: datetime | None,
                           hi: datetime | None) -> ChunkOutcome | None:
        """The recorded outcome when the source range and the target buckets are as last written."""
        state = self.tables[CHUNK_STATE.name].name
        buckets = {name: self._buckets(spec.partition, lo, hi) for name in (PREDICTION_STATS.name, FEATURE_DRIFT.name)}
        recorded = self._target_query(sql.SQL(
            "SELECT rows_read, prediction_rows, feature_rows, rejects FROM {} WHERE chunk_key = %s"
            " AND source_fingerprint = %s AND target_fingerprint = ({})").format(
                identifier(state), self._target_fingerprint_sql(buckets)), [spec.chunk_key, fingerprint])
        if not recorded:
            return None
        rows_read, prediction_rows, feature_rows, rejects = recorded[0]
        return ChunkOutcome(
            rows_read=rows_read, rejects=[Reject(ENTITY, key, reason, raw) for key, reason, raw in rejects],
            writes={PREDICTION_STATS.name: WriteCounts(unchanged=prediction_rows),
                    FEATURE_DRIFT.name: WriteCounts(unchanged=feature_rows)})

    def _aggregate(self, rows: Iterator[tuple], outcome: ChunkOutcome, progress: ProgressCallback):
        valid_from = self.options["valid_from_hour"]
        valid_until = self.options["valid_until_hour"]
        predictions: dict[tuple[str, int], PredictionStats] = {}
        features: dict[tuple[str, str, int], FeatureStats] = {}
        loads = json.loads
        read = 0
        for row in rows:
            read += 1
            if read % PROGRESS_EVERY == 0:
                progress(read)
            row_id, model, hour, prediction, actual, has_association, raw_features = row
            reason = None
            parsed: Any = None
            if model is None:
                reason = "model_id is NULL"
            elif prediction is None:
                reason = "prediction is NULL"
            elif not math.isfinite(prediction):
                reason = f"prediction is not a finite number ({prediction})"
            elif not valid_from <= hour < valid_until:
                reason = (f"timestamp in hour {hour_start(hour):%Y-%m-%d %H:00} UTC is outside the valid range "
                          f"{hour_start(valid_from):%Y-%m-%d} .. {hour_start(valid_until):%Y-%m-%d %H:00}")
            elif raw_features:
                try:
                    parsed = loads(raw_features)
                except ValueError as exc:
                    reason = f"features is not valid JSON: {exc}"
                else:
                    if not isinstance(parsed, dict):
                        reason = f"features must be a JSON object, got {type(parsed).__name__}"
            if reason is not None:
                outcome.rejects.append(Reject(ENTITY, str(row_id), reason, _excerpt(row)))
                continue
            stats = predictions.get((model, hour))
            if stats is None:
                stats = predictions[(model, hour)] = PredictionStats()
            stats.add(prediction, actual, has_association)
            if parsed:
                for feature, value in parsed.items():
                    fstats = features.get((model, feature, hour))
                    if fstats is None:
                        fstats = features[(model, feature, hour)] = FeatureStats()
                    fstats.add(value)
        outcome.rows_read = read
        progress(read)
        return predictions, features

    # -- after the run -----------------------------------------------------------------------------

    def target_counts(self, partitions: Sequence[str]) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for name in (PREDICTION_STATS.name, FEATURE_DRIFT.name):
            query = sql.SQL("SELECT deployment_id, count(*) FROM {} WHERE deployment_id = ANY(%s) GROUP BY 1").format(
                identifier(self.tables[name].name))
            for deployment in partitions:
                counts[(name, deployment)] = 0
            for deployment, n in self._target_query(query, [list(partitions)]):
                counts[(name, deployment)] = int(n)
        return counts

    def verify(self, selection: Selection, partitions: Sequence[str], rejected: dict[str, int]) -> list[Check]:
        """Every archived row is either counted in an hourly bucket or a reject, per deployment."""
        source = self._by_deployment(self.source.query, self._predictions, "count(*)", "ts", selection, partitions)
        target = self._by_deployment(self._target_query, identifier(self.tables[PREDICTION_STATS.name].name),
                                     "sum(prediction_count)", "hour", selection, partitions)
        checks = []
        for deployment in partitions:
            src, dst, rej = source.get(deployment, 0), target.get(deployment, 0), rejected.get(deployment, 0)
            ok = src == dst + rej
            detail = "" if ok else f"{src - dst - rej} archived rows are neither in hourly buckets nor rejects" \
                if src > dst + rej else f"hourly buckets count {dst + rej - src} rows more than are archived"
            checks.append(Check(ENTITY, deployment, ok, src, dst, rej, detail))
        return checks

    @staticmethod
    def _by_deployment(run_query: Any, table: sql.Composable, total: str, time_column: str, selection: Selection,
                       partitions: Sequence[str]) -> dict[str, int]:
        """`total` per deployment over `table`, limited to the partitions and the selection's window."""
        conditions, params = _window_conditions(time_column, selection)
        conditions.append(sql.SQL("deployment_id = ANY(%s)"))
        params.append(list(partitions))
        query = sql.SQL("SELECT deployment_id, " + total + " FROM {} WHERE {} GROUP BY 1").format(
            table, sql.SQL(" AND ").join(conditions))
        return {deployment: int(n) for deployment, n in run_query(query, params)}

    def after_run(self, partitions: Sequence[str]) -> list[str]:
        if not self.options.get("reenable_drift_tracking") or not partitions:
            return []
        counts = self.sink.upsert(self.tables[DRIFT_TRACKING.name], [(d, True) for d in sorted(partitions)])
        return [f"drift tracking re-enabled for {len(partitions)} deployments "
                f"({counts.written} changed, {counts.unchanged} already enabled)"]

    def storage_sizes(self) -> dict[str, int]:
        size = sql.SQL("SELECT coalesce(sum(pg_total_relation_size(to_regclass(t))), 0) FROM unnest(%s::text[]) t")
        source = self.source.query(size, [list(self._source_tables)])[0][0]
        target = self._target_query(size, [[s.name for s in self.tables.values()]])[0][0]
        return {"source_bytes": int(source), "target_bytes": int(target)}

    # -- purge ---------------------------------------------------------------------------------------

    def purge(self, deployments: Sequence[str], before: datetime | None, keep_ids: Sequence[str],
              dry_run: bool) -> dict[str, int | str]:
        """Delete archived rows of verified deployments, re-checking each against the target first.

        Rows that were rejected (`keep_ids`) are kept, so nothing that was not migrated is lost. A
        deployment whose archived rows no longer match its hourly counts is refused, not purged.
        """
        result: dict[str, int | str] = {}
        keep = [int(k) for k in keep_ids]
        window = sql.SQL("ts < {}").format(sql.Literal(before)) if before else sql.SQL("TRUE")
        hours = sql.SQL("hour < {}").format(sql.Literal(before)) if before else sql.SQL("TRUE")
        with self.source.writable() as conn:
            for deployment in deployments:
                archived = conn.execute(sql.SQL(
                    "SELECT count(*) FROM {} WHERE deployment_id = %s AND {} AND NOT (id = ANY(%s))"
                ).format(self._predictions, window), (deployment, keep)).fetchone()[0]
                bucketed = self._target_query(sql.SQL(
                    "SELECT coalesce(sum(prediction_count), 0) FROM {} WHERE deployment_id = %s AND {}"
                ).format(identifier(self.tables[PREDICTION_STATS.name].name), hours), [deployment])[0][0]
                if archived != bucketed:
                    result[deployment] = (f"refused: {archived} archived rows but {bucketed} in hourly buckets; "
                                          "run `shuttle verify` on a new run first")
                    continue
                if dry_run:
                    result[deployment] = int(archived)
                    continue
                deleted = conn.execute(sql.SQL(
                    "DELETE FROM {} WHERE deployment_id = %s AND {} AND NOT (id = ANY(%s))"
                ).format(self._predictions, window), (deployment, keep)).rowcount
                result[deployment] = int(deleted)
        return result

    def _target_query(self, query: sql.Composable, params: Sequence[Any]) -> list[tuple]:
        return self.sink.query(query, params)

    def close(self) -> None:
        self.source.close()
        self.sink.close()


def _label(hour: int | None) -> str:
    """An hour's chunk label; an open end is the empty label."""
    return "" if hour is None else hour_label(hour)


def _in_schema(spec: TableSpec, schema: str) -> TableSpec:
    return spec if schema == "public" else TableSpec(f"{schema}.{spec.name}", spec.columns, spec.key)


def _excerpt(row: tuple) -> str:
    row_id, model, hour, prediction, actual, has_association, raw_features = row
    text = json.dumps({"id": row_id, "model_id": model, "hour": hour, "prediction": prediction,
                       "actual": actual, "features": raw_features}, default=str)
    return text[:500]
