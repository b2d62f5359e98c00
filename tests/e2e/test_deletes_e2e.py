"""Deletes propagate through the real CLI and workers: `modmon` and `mlflow-latest-metrics` re-run after
rows were deleted from their source, with and without --keep-deleted."""

from __future__ import annotations

import os

import psycopg
import pytest

from common.migrations.mlflow_metrics_fixtures import build_logged
from common.migrations.modmon_fixtures import build_source
from tests.conftest import _admin, create_db, drop_db

pytestmark = pytest.mark.e2e


def sql(url: str, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def own_db(request):
    """A database of this test's own, which it may change (the session's e2e source is shared)."""
    name = f"shuttle_e2e_{os.getpid()}_{request.node.name[:20].lower()}"
    url = create_db(name)
    yield url
    drop_db(name)


def test_modmon_deletes_the_buckets_of_an_emptied_hour_and_deployment(e2e, own_db):
    data = build_source(own_db, rows=6_000, deployments=3)
    args = ("run", "modmon", "--source-url", own_db, "--target-url", own_db, "--target-schema", "del",
            "--chunk-rows", "1500")
    code, report = e2e.run_json(*args)
    assert code == 0, report["verdict_reason"]
    dep, gone = data.deployments[0], data.deployments[2]
    (hour,), = sql(own_db, "SELECT date_trunc('hour', ts) FROM archived_predictions WHERE deployment_id = %s"
                           " GROUP BY 1 ORDER BY 1 OFFSET 10 LIMIT 1", (dep,))
    stale = ("SELECT (SELECT count(*) FROM del.prediction_stats_hourly WHERE {0})"
             " + (SELECT count(*) FROM del.feature_drift_hourly WHERE {0})").format(
        "(deployment_id = %s AND hour = %s) OR deployment_id = %s")
    expected = sql(own_db, stale, (dep, hour, gone) * 2)[0][0]
    sql(own_db, "DELETE FROM archived_predictions WHERE (deployment_id = %s AND date_trunc('hour', ts) = %s)"
                " OR deployment_id = %s", (dep, hour, gone))

    code, report = e2e.run_json(*args, "--keep-deleted")
    assert report["totals"]["rows_deleted"] == 0 and sql(own_db, stale, (dep, hour, gone) * 2)[0][0] == expected
    assert code == 1 and "rows more than are archived" in report["verdict_reason"]

    code, report = e2e.run_json(*args)
    assert code == 0 and report["verdict"] == "clean", report["verdict_reason"]
    assert report["totals"]["rows_deleted"] == expected > 0
    assert sql(own_db, stale, (dep, hour, gone) * 2) == [(0,)]
    assert {r["partition"]: r["rows_deleted"] for r in report["partitions"]
            if r["entity"] == "prediction_stats_hourly" and r["rows_deleted"]}.keys() == {dep, gone}


def test_latest_metrics_deletes_pairs_with_no_metrics_left_and_repairs_is_nan(e2e, own_db):
    data = build_logged(own_db)
    with _admin() as conn:  # MLflow's engine pools connections; close them so the test owns the database
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                     (own_db.rsplit("/", 1)[1],))
    run_uuid = data.runs[data.experiments[0]][0]
    sql(own_db, "DELETE FROM metrics WHERE run_uuid = %s AND key = 'lr'", (run_uuid,))
    sql(own_db, "UPDATE latest_metrics SET is_nan = true WHERE run_uuid = %s AND key = 'loss'", (run_uuid,))
    args = ("run", "mlflow-latest-metrics", "--source-url", own_db, "--target-url", own_db, "--chunk-rows", "300")
    code, report = e2e.run_json(*args, "--keep-deleted")
    assert report["totals"]["rows_deleted"] == 0 and code == 1  # verify counts the pair left behind
    assert report["totals"]["targets"]["latest_metrics"]["updated"] == 1  # is_nan alone was wrong
    code, report = e2e.run_json(*args)
    assert code == 0 and report["verdict"] == "clean", report["verdict_reason"]
    assert report["totals"]["rows_deleted"] == 1 and report["totals"]["targets"]["latest_metrics"]["updated"] == 0
    assert sql(own_db, "SELECT count(*) FROM latest_metrics WHERE run_uuid = %s AND key = 'lr'", (run_uuid,)) == [(0,)]
    assert sql(own_db, "SELECT is_nan FROM latest_metrics WHERE run_uuid = %s AND key = 'loss'", (run_uuid,)) == \
        [(False,)]
