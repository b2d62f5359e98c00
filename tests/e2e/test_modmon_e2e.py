"""`shuttle run modmon` with two real workers: exact counts, idempotence, selection, faults, rejects, secrets."""

from __future__ import annotations

import json
import os
import signal

import pytest
import redis

from common.migrations import CATALOGUE
from tests.harness import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def baseline(e2e):
    """One uninterrupted run into schema `base`: the reference every other run is compared with."""
    code, report = e2e.run_json("run", "modmon", "--target-schema", "base", "--chunk-rows", "8000")
    assert code == 0, report["verdict_reason"]
    return report


def test_clean_run_counts_every_row_exactly(e2e, baseline):
    assert baseline["verdict"] == "clean" and baseline["status"] == "completed"
    expected = dict(e2e.sql("SELECT deployment_id, count(*) FROM archived_predictions WHERE NOT (id = ANY(%s))"
                            " GROUP BY 1", (list(e2e.data.malformed_ids),)))
    got = dict(e2e.sql("SELECT deployment_id, sum(prediction_count)::bigint FROM base.prediction_stats_hourly GROUP BY 1"))
    assert got == expected and len(got) == len(e2e.data.deployments)
    rows = {(r["entity"], r["partition"]): r for r in baseline["partitions"]}
    for deployment, n in e2e.data.rows_per_deployment.items():
        row = rows[("prediction_stats_hourly", deployment)]
        assert row["source_rows"] == n
        assert row["target_rows"] == e2e.sql(
            "SELECT count(*) FROM base.prediction_stats_hourly WHERE deployment_id = %s", (deployment,))[0][0]
        assert row["rows_written"] == row["target_rows"]
    assert baseline["totals"]["rows_rejected"] == len(e2e.data.malformed_ids)
    assert all(check["ok"] for check in baseline["checks"])
    sample = e2e.sql("SELECT deployment_id, hour, sum(value_count) FROM base.feature_drift_hourly"
                     " WHERE feature = 'age' GROUP BY 1, 2 ORDER BY md5(deployment_id || hour::text) LIMIT 25")
    for deployment, hour, count in sample:
        ref = e2e.sql("SELECT count(*) FROM archived_predictions WHERE deployment_id = %s AND date_trunc('hour', ts) = %s"
                      " AND features::jsonb ? 'age' AND NOT (id = ANY(%s))", (deployment, hour, list(e2e.data.malformed_ids)))
        assert count == ref[0][0]


def test_second_run_changes_nothing(e2e, baseline):
    before = e2e.checksum("base")
    code, report = e2e.run_json("run", "modmon", "--target-schema", "base", "--chunk-rows", "8000")
    assert code == 0 and report["verdict"] == "clean"
    assert report["totals"]["rows_written"] == 0
    assert report["totals"]["rows_unchanged"] == sum(t["target_rows"] for t in report["totals"]["targets"].values())
    assert e2e.checksum("base") == before


def test_deployment_ids_select_exactly_those(e2e, baseline):
    a, b = e2e.data.deployments[3], e2e.data.deployments[7]
    code, report = e2e.run_json("run", "modmon", "--target-schema", "sel", "--reenable-drift-tracking",
                                "--deployment-ids", a, b)
    assert code == 0
    assert sorted(e2e.sql("SELECT deployment_id, drift_tracking_enabled FROM sel.drift_tracking_settings")) == \
        sorted([(a, True), (b, True)])
    assert any("drift tracking re-enabled for 2 deployments" in action for action in report["actions"])
    assert {d for (d,) in e2e.sql("SELECT DISTINCT deployment_id FROM sel.prediction_stats_hourly")} == {a, b}
    assert {r["partition"] for r in report["partitions"]} == {a, b}
    for d in (a, b):
        assert e2e.sql("SELECT count(*), sum(prediction_count) FROM sel.prediction_stats_hourly WHERE deployment_id = %s", (d,)) \
            == e2e.sql("SELECT count(*), sum(prediction_count) FROM base.prediction_stats_hourly WHERE deployment_id = %s", (d,))


def test_unknown_deployment_ids_fail_before_anything_is_written(e2e):
    result = e2e.shuttle("run", "modmon", "--target-schema", "unknown_sel", "--deployment-ids", "ffffffffffffffffffffffff")
    assert result.returncode == 2
    assert "unknown deployment ids: ffffffffffffffffffffffff" in result.stderr
    assert e2e.sql("SELECT to_regclass('unknown_sel.prediction_stats_hourly')")[0][0] is None


def test_worker_killed_mid_chunk_run_still_exact(e2e, baseline):
    result = e2e.shuttle("run", "modmon", "--target-schema", "killed", "--chunk-rows", "20000")
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip().splitlines()[-1]

    def running_chunk():
        rows = e2e.ledger_sql("SELECT chunk_id, worker FROM shuttle.chunks WHERE run_id = %s AND state = 'running'"
                              " AND est_rows >= 5000 AND started_at > now() - interval '150 milliseconds'", (run_id,))
        return rows[0] if rows else None

    chunk_id, worker = wait_for(running_chunk)
    os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)  # the pool process copying that chunk
    wait_for(lambda: e2e.ledger_sql("SELECT state = 'done' FROM shuttle.chunks WHERE chunk_id = %s", (chunk_id,))[0][0],
              timeout=120, interval=0.2)
    code, report = e2e.run_json("watch", run_id)
    assert code == 0 and report["verdict"] == "clean"
    attempts = e2e.ledger_sql("SELECT attempts FROM shuttle.chunks WHERE chunk_id = %s", (chunk_id,))[0][0]
    assert attempts >= 2, "the killed chunk was redelivered and run again"
    assert e2e.checksum("killed") == e2e.checksum("base")
    assert e2e.sql("SELECT count(*) = count(DISTINCT (deployment_id, model_id, hour)) FROM killed.prediction_stats_hourly")[0][0]


def test_cancel_then_resume_gives_the_uninterrupted_result(e2e, baseline):
    result = e2e.shuttle("run", "modmon", "--target-schema", "cancelled", "--chunk-rows", "1500")
    run_id = result.stdout.strip().splitlines()[-1]
    wait_for(lambda: e2e.ledger_sql("SELECT count(*) >= 3 FROM shuttle.chunks WHERE run_id = %s AND state = 'done'",
                                     (run_id,))[0][0])
    cancelled = e2e.shuttle("cancel", run_id)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    code, report = e2e.run_json("watch", run_id)
    assert code == 1 and report["verdict"] == "cancelled"
    assert report["chunks"].get("cancelled", 0) > 0
    code, report = e2e.run_json("resume", run_id)
    assert code == 0 and report["verdict"] == "clean"
    assert e2e.checksum("cancelled") == e2e.checksum("base")


def test_rejects_are_listed_and_max_rejects_fails_the_run(e2e, baseline):
    code, report = e2e.run_json("run", "modmon", "--target-schema", "strict", "--max-rejects", "0")
    assert code == 1 and report["verdict"] == "failed"
    assert "more than --max-rejects 0" in report["verdict_reason"]
    assert report["rejects"]["total"] == len(e2e.data.malformed_ids)
    keys = {int(r["key"]) for r in report["rejects"]["sample"]}
    assert keys == set(e2e.data.malformed_ids)
    reasons = " ".join(r["reason"] for r in report["rejects"]["sample"])
    for text in ("features is not valid JSON", "prediction is NULL", "outside the valid range"):
        assert text in reasons


def test_no_password_in_output_report_ledger_logs_or_task_messages(e2e, baseline):
    secret = "Sup3rS3cretPw"
    url = e2e.source_url.replace("postgres@", f"postgres:{secret}@")
    result = e2e.shuttle("run", "modmon", "--target-schema", "secret", "--source-url", url, "--target-url", url,
                         "--wait", "--json")
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    run_id = json.loads(result.stdout)["run_id"]
    assert json.loads(result.stdout)["source"].startswith("postgresql://postgres@127.0.0.1")
    report = e2e.shuttle("report", run_id)
    assert secret not in report.stdout + report.stderr
    ledger_dump = e2e.ledger_sql("SELECT r::text FROM shuttle.runs r UNION ALL SELECT c::text FROM shuttle.chunks c"
                                 " UNION ALL SELECT p::text FROM shuttle.reports p")
    assert not any(secret in row[0] for row in ledger_dump)
    client = redis.Redis.from_url(e2e.broker_url)
    for key in client.scan_iter():
        kind = client.type(key)
        values = [client.get(key)] if kind == b"string" else client.lrange(key, 0, -1) if kind == b"list" else \
            list(client.hgetall(key).values()) if kind == b"hash" else []
        assert not any(secret.encode() in (v or b"") for v in values), key
    for log in e2e.log_dir.iterdir():
        assert secret not in log.read_text(errors="replace")
    bad = e2e.shuttle("run", "modmon", "--target-schema", "secret2",
                      "--source-url", f"postgresql://postgres:{secret}@127.0.0.1:1/nowhere")
    assert bad.returncode == 2 and "source database" in bad.stderr and secret not in bad.stderr + bad.stdout


def test_plan_is_a_dry_run(e2e):
    result = e2e.shuttle("plan", "modmon", "--target-schema", "planned_only", "--chunk-rows", "10000")
    assert result.returncode == 0, result.stderr
    assert f"{e2e.data.total_rows:,} rows in" in result.stdout
    for deployment in e2e.data.deployments:
        assert deployment in result.stdout
    assert e2e.sql("SELECT to_regclass('planned_only.prediction_stats_hourly')")[0][0] is None


def test_unreachable_broker_or_ledger_is_named_before_anything_is_written(e2e):
    broker = e2e.shuttle("run", "modmon", "--target-schema", "nobroker", SHUTTLE_BROKER_URL="redis://:pw123@127.0.0.1:1/0")
    assert broker.returncode == 2 and "broker redis://:***@127.0.0.1:1/0 is unreachable" in broker.stderr
    assert "pw123" not in broker.stderr
    ledger = e2e.shuttle("run", "modmon", SHUTTLE_LEDGER_URL="postgresql://postgres:pw123@127.0.0.1:1/shuttle")
    assert ledger.returncode == 2 and "unreachable" in ledger.stderr and "pw123" not in ledger.stderr
    assert e2e.sql("SELECT to_regclass('nobroker.prediction_stats_hourly')")[0][0] is None


def test_unknown_migration_is_a_usage_error(e2e):
    result = e2e.shuttle("run", "nosuch")
    assert result.returncode == 2, result.stderr
    assert f"unknown migration 'nosuch'; available: {', '.join(sorted(CATALOGUE))}" in result.stderr


def test_status_lists_runs_and_shows_progress(e2e, baseline):
    listing = e2e.shuttle("status")
    assert listing.returncode == 0 and baseline["run_id"] in listing.stdout
    one = e2e.shuttle("status", baseline["run_id"])
    assert one.returncode == 0
    assert f"{e2e.data.total_rows:,} of {e2e.data.total_rows:,} rows (100.0%)" in one.stdout
    assert f"{baseline['chunks']['total']} done" in one.stdout
    missing = e2e.shuttle("status", "modmon-nope")
    assert missing.returncode == 2 and "run 'modmon-nope' is not in the ledger" in missing.stderr


def test_demo_runs_end_to_end_and_again_on_new_data(e2e):
    from tests.conftest import create_db, drop_db

    name = f"shuttle_e2e_demo_{os.getpid()}"
    url = create_db(name)
    try:
        for rows in (6000, 4000):  # the second demo rebuilds smaller data over the first one's target
            result = e2e.shuttle("demo", "--rows", str(rows), "--deployments", "3", "--workers", "0",
                                 "--chunk-rows", "1000", "--source-url", url, SHUTTLE_TARGET_URL=url)
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr
            assert f"verdict: clean — all {rows + 7:,} source rows accounted for" in result.stdout
    finally:
        drop_db(name)
