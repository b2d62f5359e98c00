"""`shuttle run mlflow-latest-metrics` with two real workers, against what MLflow's own client maintained."""

from __future__ import annotations

import os
import signal

import psycopg
import pytest

from common.migrations.mlflow_metrics_fixtures import build_bulk, build_logged
from common.settings import load_settings
from producer import commands
from tests.conftest import _admin, create_db, drop_db
from tests.harness import wait_for

pytestmark = pytest.mark.e2e
MIGRATION = "mlflow-latest-metrics"
COLUMNS = "key, value, timestamp, step, is_nan, run_uuid"


def sql(url: str, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def table(url: str) -> list[tuple]:
    return sql(url, f"SELECT {COLUMNS} FROM latest_metrics ORDER BY run_uuid, key")


def _mlflow_db(kind: str, build):
    name = f"shuttle_lm_{os.getpid()}_e2e_{kind}"
    url = create_db(name)
    data = build(url)
    with _admin() as conn:  # MLflow's engine pools connections; close them so the test owns the database
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    return name, url, data


@pytest.fixture(scope="module")
def logged():
    """An MLflow database filled through MLflow's client, and latest_metrics as MLflow left it."""
    name, url, data = _mlflow_db("logged", build_logged)
    yield url, data, table(url)
    drop_db(name)


def run(e2e, url: str, *args: str) -> tuple[int, dict]:
    return e2e.run_json("run", MIGRATION, "--source-url", url, "--target-url", url, *args)


def test_rebuild_of_an_emptied_table_equals_mlflow_s_own(e2e, logged):
    url, data, saved = logged
    sql(url, "DELETE FROM latest_metrics")
    code, report = run(e2e, url, "--chunk-rows", "300")
    assert code == 0, report["verdict_reason"]
    assert table(url) == saved and len(saved) == data.pairs
    assert report["chunks"]["total"] > len(data.experiments)
    assert report["totals"]["rows_read"] == report["totals"]["source_rows"] == data.metric_rows
    assert report["totals"]["targets"]["latest_metrics"] == {
        "inserted": data.pairs, "updated": 0, "unchanged": 0, "deleted": 0, "target_rows": data.pairs}
    # every experiment, MLflow's "Default" (0) and one without runs included
    assert {c["partition"] for c in report["checks"]} == {"0", *data.experiments, data.empty_experiment}
    assert all(c["ok"] for c in report["checks"])


def test_rerun_changes_nothing(e2e, logged):
    url, data, saved = logged
    code, report = run(e2e, url, "--chunk-rows", "300")
    assert code == 0 and report["totals"]["rows_written"] == 0
    assert report["totals"]["targets"]["latest_metrics"]["unchanged"] == data.pairs
    assert table(url) == saved


def test_only_missing_for_selected_experiments(e2e, logged):
    url, data, saved = logged
    chosen, other = data.experiments[1], data.experiments[0]
    sql(url, "DELETE FROM latest_metrics WHERE key = 'loss'")
    sql(url, "UPDATE latest_metrics SET value = -1 WHERE key = 'lr' AND run_uuid = ANY(%s)", (list(data.runs[chosen]),))
    code, report = run(e2e, url, "--only-missing", "--experiment-ids", chosen)
    assert code == 0, report["verdict_reason"]
    assert {r["partition"] for r in report["partitions"]} == {chosen}
    assert report["totals"]["targets"]["latest_metrics"]["inserted"] == len(data.runs[chosen])
    assert report["totals"]["targets"]["latest_metrics"]["updated"] == 0
    assert sql(url, "SELECT count(*) FROM latest_metrics WHERE key = 'loss' AND run_uuid = ANY(%s)",
               (list(data.runs[other]),)) == [(0,)]
    assert sql(url, "SELECT DISTINCT value FROM latest_metrics WHERE key = 'lr' AND run_uuid = ANY(%s)",
               (list(data.runs[chosen]),)) == [(-1,)]
    code, report = run(e2e, url)
    assert code == 0 and table(url) == saved
    assert report["totals"]["targets"]["latest_metrics"]["updated"] == len(data.runs[chosen])


def test_unknown_experiment_is_a_usage_error_before_anything_is_written(e2e, logged):
    url, *_ = logged
    result = e2e.shuttle("run", MIGRATION, "--source-url", url, "--target-url", url, "--experiment-ids", "4242")
    assert result.returncode == 2 and "unknown experiment ids: 4242" in result.stderr


REFERENCE = (f"SELECT {COLUMNS} FROM (SELECT DISTINCT ON (run_uuid, key) {COLUMNS} FROM metrics"
             " ORDER BY run_uuid, key, step DESC, timestamp DESC, value DESC, is_nan DESC) latest ORDER BY run_uuid, key")


def test_worker_killed_mid_run_cancelled_then_resumed_gives_the_same_table(e2e):
    """Killed mid-chunk, then cancelled: every row already written is right; resume redoes only the rest."""
    name, url, rows = _mlflow_db("bulk", lambda u: build_bulk(u, runs=3000, rows=300_000, experiments=4))
    try:
        reference = sql(url, REFERENCE)  # one statement, no chunks: an independent computation
        result = e2e.shuttle("run", MIGRATION, "--source-url", url, "--target-url", url, "--chunk-rows", "2000")
        assert result.returncode == 0, result.stderr
        run_id = result.stdout.strip().splitlines()[-1]

        def running_chunk():
            found = e2e.ledger_sql(
                "SELECT chunk_id, worker FROM shuttle.chunks WHERE run_id = %s AND state = 'running'"
                " AND started_at > now() - interval '60 milliseconds'"
                " AND (SELECT count(*) FROM shuttle.chunks WHERE run_id = %s AND state = 'done') >= 2", (run_id, run_id))
            return found[0] if found else None

        chunk_id, worker = wait_for(running_chunk, interval=0.005)
        os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)  # the pool process computing that chunk
        # `shuttle cancel` in this process (what the command runs), so it lands while most chunks are queued.
        commands.cancel(load_settings(ledger_url=e2e.ledger_url, broker_url=e2e.broker_url, queue=e2e.queue), run_id)
        code, report = e2e.run_json("watch", run_id)
        assert code == 1 and report["verdict"] == "cancelled", report["verdict_reason"]
        partial = table(url)
        assert 0 < len(partial) < len(reference) and set(partial) <= set(reference)  # usable: every row right
        done = dict(e2e.ledger_sql("SELECT chunk_id, attempts FROM shuttle.chunks WHERE run_id = %s AND state = 'done'",
                                   (run_id,)))
        code, report = e2e.run_json("resume", run_id)
        assert code == 0 and report["verdict"] == "clean", report["verdict_reason"]
        assert report["totals"]["rows_read"] == rows and all(c["ok"] for c in report["checks"])
        assert table(url) == reference
        again = dict(e2e.ledger_sql("SELECT chunk_id, attempts FROM shuttle.chunks WHERE run_id = %s", (run_id,)))
        assert {c: again[c] for c in done} == done, "chunks done before the resume were not redone"
        assert again[chunk_id] >= 2 or chunk_id in done
    finally:
        drop_db(name)
