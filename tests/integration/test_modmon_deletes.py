"""`modmon` re-runs after the source or the target changed (no Celery): deletes propagate, fingerprints
see every change of the source and of the chunk's buckets, --keep-deleted and --recompute."""

from __future__ import annotations

import psycopg
import pytest

from common.migrations.base import Selection
from common.migrations.modmon import Modmon
from common.migrations.modmon_fixtures import build_source

CHUNK_ROWS = 1500
PREDICTIONS, FEATURES = TABLES = ("prediction_stats_hourly", "feature_drift_hourly")


@pytest.fixture
def source(fresh_db):
    """A source of three deployments, migrated once into schema `stats`."""
    data = build_source(fresh_db, rows=9_000, deployments=3)
    run_all(fresh_db)
    return fresh_db, data


def run_all(url: str, **flags) -> tuple[list, list]:
    """Plan afresh (as a new run does) and run every chunk: (chunks, outcomes)."""
    migration = Modmon(url, url, Modmon.plan_options(target_schema="stats", **flags))
    try:
        migration.prepare_target()
        chunks = list(migration.plan_chunks(Selection(), CHUNK_ROWS))
        return chunks, [migration.run_chunk(spec, lambda rows: None) for spec in chunks]
    finally:
        migration.close()


def sql(url: str, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def total(outcomes, table: str, count: str) -> int:
    return sum(getattr(o.writes[table], count) for o in outcomes if table in o.writes)


def buckets(url: str, where: str = "TRUE", params: tuple = ()) -> dict[str, int]:
    return {t: sql(url, f"SELECT count(*) FROM stats.{t} WHERE {where}", params)[0][0] for t in TABLES}


def verify(url: str, chunks, outcomes) -> list:
    """The failed checks of `shuttle verify`: every archived row in a bucket or rejected, per deployment."""
    rejected: dict[str, int] = {}
    for spec, outcome in zip(chunks, outcomes):
        rejected[spec.partition] = rejected.get(spec.partition, 0) + len(outcome.rejects)
    migration = Modmon(url, url, Modmon.plan_options(target_schema="stats"))
    try:
        return [c for c in migration.verify(Selection(), sorted(rejected), rejected) if not c.ok]
    finally:
        migration.close()


def test_an_hour_emptied_in_the_source_loses_its_buckets_unless_kept(source):
    """The deployment's first hour: chunks cut from the source's hours alone would no longer reach it."""
    url, data = source
    dep = data.deployments[0]
    (hour,), = sql(url, "SELECT min(date_trunc('hour', ts)) FROM archived_predictions WHERE deployment_id = %s"
                        " AND ts > '2000-01-01'", (dep,))
    where = ("deployment_id = %s AND hour = %s", (dep, hour))
    before = buckets(url, *where)
    assert before[PREDICTIONS] > 0 and before[FEATURES] > 0
    sql(url, "DELETE FROM archived_predictions WHERE deployment_id = %s AND date_trunc('hour', ts) = %s", (dep, hour))

    chunks, kept = run_all(url, keep_deleted=True)
    assert buckets(url, *where) == before and total(kept, PREDICTIONS, "deleted") == 0

    chunks, outcomes = run_all(url)
    assert buckets(url, *where) == {PREDICTIONS: 0, FEATURES: 0}
    assert {t: total(outcomes, t, "deleted") for t in TABLES} == before
    assert not verify(url, chunks, outcomes)
    chunks, again = run_all(url)
    assert sum(o.totals().written for o in again) == 0


def test_a_deployment_with_no_rows_left_loses_all_its_buckets(source):
    url, data = source
    gone = data.deployments[-1]
    before = buckets(url, "deployment_id = %s", (gone,))
    assert before[PREDICTIONS] > 0
    sql(url, "DELETE FROM archived_predictions WHERE deployment_id = %s", (gone,))
    sql(url, "DELETE FROM deployments WHERE id = %s", (gone,))
    chunks, outcomes = run_all(url)
    assert [(c.lo, c.hi, c.est_rows) for c in chunks if c.partition == gone] == [("", "", 0)]
    assert buckets(url, "deployment_id = %s", (gone,)) == {PREDICTIONS: 0, FEATURES: 0}
    assert {t: total(outcomes, t, "deleted") for t in TABLES} == before
    assert not verify(url, chunks, outcomes)
    chunks, _ = run_all(url)
    assert gone not in {c.partition for c in chunks}  # nothing left to own


def test_a_prediction_moved_into_actual_is_seen_and_rejected(source):
    """prediction → actual, prediction NULL: the same text under concat_ws, a different row text."""
    url, data = source
    (row_id, dep, model, hour), = sql(
        url, "SELECT id, deployment_id, model_id, date_trunc('hour', ts) FROM archived_predictions"
             " WHERE actual IS NULL AND prediction IS NOT NULL ORDER BY id LIMIT 1")
    count = ("SELECT prediction_count, actual_count FROM stats.prediction_stats_hourly"
             " WHERE deployment_id = %s AND model_id = %s AND hour = %s")
    (predictions, actuals), = sql(url, count, (dep, model, hour))
    sql(url, "UPDATE archived_predictions SET actual = prediction, prediction = NULL WHERE id = %s", (row_id,))
    chunks, outcomes = run_all(url)
    assert (str(row_id), "prediction is NULL") in [(r.key, r.reason) for o in outcomes for r in o.rejects]
    assert sql(url, count, (dep, model, hour)) == [(predictions - 1, actuals)]
    assert total(outcomes, PREDICTIONS, "updated") == 1
    assert not verify(url, chunks, outcomes)


def test_a_bucket_edited_or_added_by_hand_is_repaired_by_a_plain_rerun(source):
    url, data = source
    (dep, model, hour, prediction_sum), = sql(
        url, "SELECT deployment_id, model_id, hour, prediction_sum FROM stats.prediction_stats_hourly"
             " ORDER BY 1, 2, 3 OFFSET 7 LIMIT 1")
    sql(url, "UPDATE stats.prediction_stats_hourly SET prediction_sum = prediction_sum + 1000"
             " WHERE deployment_id = %s AND model_id = %s AND hour = %s", (dep, model, hour))
    sql(url, "INSERT INTO stats.prediction_stats_hourly SELECT deployment_id, model_id, hour + interval '3 years',"
             " prediction_count, prediction_sum, prediction_sum_sq, prediction_min, prediction_max,"
             " prediction_histogram, actual_count, actual_sum, actual_sum_sq, squared_error_sum, association_count"
             " FROM stats.prediction_stats_hourly WHERE deployment_id = %s AND model_id = %s AND hour = %s",
        (dep, model, hour))
    chunks, outcomes = run_all(url)
    assert total(outcomes, PREDICTIONS, "updated") == 1 and total(outcomes, PREDICTIONS, "deleted") == 1
    assert sum(o.totals().written for o in outcomes) == 2
    assert sql(url, "SELECT prediction_sum FROM stats.prediction_stats_hourly WHERE deployment_id = %s"
                    " AND model_id = %s AND hour = %s", (dep, model, hour)) == [(prediction_sum,)]
    assert not verify(url, chunks, outcomes)


def test_unchanged_chunks_are_skipped_and_recompute_forces_every_one(source, monkeypatch):
    url, _ = source
    aggregated = []
    aggregate = Modmon._aggregate
    monkeypatch.setattr(Modmon, "_aggregate", lambda self, *args: aggregated.append(1) or aggregate(self, *args))
    chunks, skipped = run_all(url)
    assert aggregated == [] and sum(o.totals().unchanged for o in skipped) > 0
    chunks, recomputed = run_all(url, recompute=True)
    assert len(aggregated) == len(chunks) > 1
    assert sum(o.totals().written for o in recomputed) == 0
    assert [o.rows_read for o in recomputed] == [o.rows_read for o in skipped]
    assert [o.totals().unchanged for o in recomputed] == [o.totals().unchanged for o in skipped]


def test_a_state_table_recorded_before_target_fingerprints_gains_the_column(source):
    url, _ = source
    sql(url, "ALTER TABLE stats.shuttle_modmon_chunks DROP COLUMN target_fingerprint")
    chunks, outcomes = run_all(url)  # no state matches: every chunk computes, and records both fingerprints
    assert sum(o.totals().written for o in outcomes) == 0
    assert sql(url, "SELECT count(*) FROM stats.shuttle_modmon_chunks WHERE target_fingerprint IS NULL") == [(0,)]
