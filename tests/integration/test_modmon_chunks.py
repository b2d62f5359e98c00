"""The modmon migration run chunk by chunk (no Celery): results checked against independent SQL."""

import math

import psycopg
import pytest

from common.migrations.base import Selection
from common.migrations.modmon import Modmon, chunk_hours
from common.migrations.modmon_fixtures import MALFORMED, build_source


@pytest.fixture
def migrated(fresh_db):
    data = build_source(fresh_db, rows=20_000, deployments=5)
    migration = Modmon(fresh_db, fresh_db, Modmon.plan_options(target_schema="stats"))
    migration.prepare_target()
    chunks = list(migration.plan_chunks(Selection(), 1500))
    outcomes = [migration.run_chunk(spec, lambda rows: None) for spec in chunks]
    yield fresh_db, data, migration, chunks, outcomes
    migration.close()


def test_every_row_lands_in_a_bucket_or_is_rejected_with_its_reason(migrated):
    url, data, migration, chunks, outcomes = migrated
    assert max(c.est_rows for c in chunks) <= 1500 or len({c.lo for c in chunks}) > 0
    assert sum(o.rows_read for o in outcomes) == data.total_rows
    rejects = [r for o in outcomes for r in o.rejects]
    assert sorted(int(r.key) for r in rejects) == sorted(data.malformed_ids)
    for expected_reason, *_ in MALFORMED:
        assert any(expected_reason in r.reason for r in rejects), expected_reason
    with psycopg.connect(url) as conn:
        expected = dict(conn.execute(
            "SELECT deployment_id, count(*) FROM archived_predictions WHERE NOT (id = ANY(%s)) GROUP BY 1",
            (list(data.malformed_ids),)).fetchall())
        got = dict(conn.execute(
            "SELECT deployment_id, sum(prediction_count)::bigint FROM stats.prediction_stats_hourly GROUP BY 1").fetchall())
    assert got == expected
    checks = migration.verify(Selection(), list(data.deployments),
                              {d: sum(1 for o, c in zip(outcomes, chunks) for r in o.rejects if c.partition == d)
                               for d in data.deployments})
    assert all(c.ok for c in checks)


def test_feature_statistics_match_an_independent_computation(migrated):
    url, data, *_ = migrated
    with psycopg.connect(url) as conn:
        sample = conn.execute(
            "SELECT deployment_id, model_id, feature, hour, value_count, numeric_count, value_sum, value_min, value_max,"
            " top_categories FROM stats.feature_drift_hourly WHERE feature IN ('income', 'region')"
            " ORDER BY md5(deployment_id || hour::text || feature) LIMIT 40").fetchall()
        assert len(sample) == 40
        for dep, model, feature, hour, count, numeric, total, low, high, top in sample:
            ref = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE jsonb_typeof(f -> %(k)s) = 'number'),"
                " sum((f ->> %(k)s)::float8) FILTER (WHERE jsonb_typeof(f -> %(k)s) = 'number'),"
                " min((f ->> %(k)s)::float8) FILTER (WHERE jsonb_typeof(f -> %(k)s) = 'number'),"
                " max((f ->> %(k)s)::float8) FILTER (WHERE jsonb_typeof(f -> %(k)s) = 'number')"
                " FROM (SELECT features::jsonb f FROM archived_predictions WHERE deployment_id = %(d)s"
                "       AND model_id = %(m)s AND date_trunc('hour', ts) = %(h)s AND NOT (id = ANY(%(bad)s))) s"
                " WHERE f ? %(k)s", {"k": feature, "d": dep, "m": model, "h": hour, "bad": list(data.malformed_ids)}).fetchone()
            assert (count, numeric) == (ref[0], ref[1])
            if feature == "income":
                assert math.isclose(total, ref[2], rel_tol=1e-9) and (low, high) == (ref[3], ref[4])
            else:
                cats = dict(conn.execute(
                    "SELECT features::jsonb ->> 'region', count(*) FROM archived_predictions WHERE deployment_id = %s"
                    " AND model_id = %s AND date_trunc('hour', ts) = %s AND NOT (id = ANY(%s)) GROUP BY 1",
                    (dep, model, hour, list(data.malformed_ids))).fetchall())
                assert {k: n for k, n in top} == cats


def test_rerunning_chunks_changes_nothing(migrated):
    url, data, migration, chunks, _ = migrated
    again = [migration.run_chunk(spec, lambda rows: None) for spec in chunks]
    assert sum(o.totals().written for o in again) == 0
    assert sum(o.totals().unchanged for o in again) > 0


def test_unknown_deployment_ids_are_listed(migrated):
    _, _, migration, *_ = migrated
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown deployment ids: nope1, nope2"):
        migration.count_partitions(Selection(partitions=("nope2", "nope1")))


def test_since_until_window_selects_whole_hours_only(migrated):
    from datetime import datetime, timezone

    from common.errors import ConfigError

    url, data, migration, *_ = migrated
    since, until = datetime(2026, 6, 2, tzinfo=timezone.utc), datetime(2026, 6, 3, 6, tzinfo=timezone.utc)
    window = Selection(since=since, until=until)
    planned = sum(p.rows for p in migration.count_partitions(window))
    with psycopg.connect(url) as conn:
        expected = conn.execute("SELECT count(*) FROM archived_predictions WHERE ts >= %s AND ts < %s",
                                (since, until)).fetchone()[0]
    assert planned == expected > 0
    assert all(since.strftime("%Y%m%dT%H") <= c.lo and c.hi <= until.strftime("%Y%m%dT%H")
               for c in migration.plan_chunks(window, 1000))
    with pytest.raises(ConfigError, match="not on a whole hour"):
        migration.count_partitions(Selection(since=datetime(2026, 6, 2, 0, 30, tzinfo=timezone.utc)))


def test_rerun_recomputes_exactly_the_chunks_whose_source_or_target_changed(migrated):
    url, data, migration, chunks, first = migrated
    again = [migration.run_chunk(spec, lambda rows: None) for spec in chunks]
    assert [sorted(r.key for r in o.rejects) for o in again] == [sorted(r.key for r in o.rejects) for o in first]
    assert [o.rows_read for o in again] == [o.rows_read for o in first]

    changed, emptied = chunks[0], chunks[-1]
    with psycopg.connect(url) as conn:
        row_id, hour = conn.execute(
            "UPDATE archived_predictions SET prediction = prediction + 0.5 WHERE id = (SELECT min(id) FROM"
            f" archived_predictions WHERE deployment_id = %s AND {IN_RANGE.format('ts')} AND prediction IS NOT NULL)"
            " RETURNING id, date_trunc('hour', ts)",
            (changed.partition, *_at(changed))).fetchone()
        conn.execute(f"DELETE FROM stats.feature_drift_hourly WHERE deployment_id = %s AND {IN_RANGE.format('hour')}",
                     (emptied.partition, *_at(emptied)))
    third = [migration.run_chunk(spec, lambda rows: None) for spec in chunks]
    written = {spec.chunk_key: o.writes for spec, o in zip(chunks, third) if o.totals().written}
    assert set(written) == {changed.chunk_key, emptied.chunk_key}
    assert written[changed.chunk_key]["prediction_stats_hourly"].updated >= 1
    assert written[emptied.chunk_key]["feature_drift_hourly"].inserted > 0
    with psycopg.connect(url) as conn:
        got = conn.execute("SELECT sum(prediction_sum) FROM stats.prediction_stats_hourly WHERE deployment_id = %s"
                           " AND hour = %s", (changed.partition, hour)).fetchone()[0]
        expected = conn.execute("SELECT sum(prediction) FROM archived_predictions WHERE deployment_id = %s AND"
                                " date_trunc('hour', ts) = %s AND NOT (id = ANY(%s))",
                                (changed.partition, hour, list(data.malformed_ids))).fetchone()[0]
    assert math.isclose(got, expected, rel_tol=1e-12)


def test_full_recompute_without_recorded_state_is_still_idempotent(migrated):
    url, data, migration, chunks, _ = migrated
    with psycopg.connect(url) as conn:
        conn.execute("TRUNCATE stats.shuttle_modmon_chunks")
    again = [migration.run_chunk(spec, lambda rows: None) for spec in chunks]
    assert sum(o.totals().written for o in again) == 0 and sum(o.totals().unchanged for o in again) > 0


# A chunk's [lo, hi) with open ends: pass the bounds of `_at` twice each.
IN_RANGE = "(%s::timestamptz IS NULL OR {0} >= %s) AND (%s::timestamptz IS NULL OR {0} < %s)"


def _at(spec) -> tuple:
    """The parameters of IN_RANGE for a chunk (None for an open end)."""
    lo, hi = chunk_hours(spec)
    return lo, lo, hi, hi
