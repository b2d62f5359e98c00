"""The example plugin package, pip-installed and run end to end with two real workers.

The package is installed with `pip install --target` into a folder of this test's own, put on
PYTHONPATH of the CLI and the workers: a real install (wheel built, dist-info with its entry points),
yet the shared virtualenv is never changed, so parallel test processes cannot see each other's plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis

from common.migrations.modmon_fixtures import build_source
from producer.local_workers import LocalWorkers
from tests.conftest import REDIS_BASE, create_db, drop_db
from tests.harness import PROJECT_ROOT, Env

pytestmark = pytest.mark.e2e

EXAMPLE = PROJECT_ROOT / "examples" / "shuttle-example-plugin"
REDIS_DB = int(os.environ.get("SHUTTLE_TEST_REDIS_DB", "12"))
# build_source(malformed=True) adds rows this migration must reject: 2 with features that are not JSON,
# 1 with a JSON array, 2 with a NULL prediction (its out-of-range timestamps are fine here).
REJECTED = 5


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> Env:
    site = tmp_path_factory.mktemp("plugin-site")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                                str(EXAMPLE)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    pid = os.getpid()
    source_db, ledger_db = f"shuttle_plugin_{pid}", f"shuttle_plugin_ledger_{pid}"
    source_url, ledger_url = create_db(source_db), create_db(ledger_db)
    broker_url = f"{REDIS_BASE}/{REDIS_DB}"
    queue = f"shuttle-plugin-{pid}"
    data = build_source(source_url, rows=6_000, deployments=4)
    env = Env(source_url, ledger_url, broker_url, data, tmp_path_factory.mktemp("plugin-workers"), queue)
    env.plugin_path = os.pathsep.join([str(site), str(PROJECT_ROOT)])
    with LocalWorkers(env.settings(), 2, name="plugin", log_dir=env.log_dir, extra_env={"PYTHONPATH": env.plugin_path}):
        yield env
    redis.Redis.from_url(broker_url).delete(queue)
    drop_db(source_db)
    drop_db(ledger_db)


def run(env: Env, *args: str) -> tuple[int, dict]:
    return env.run_json("run", "example-scores", *args, PYTHONPATH=env.plugin_path)


def test_the_installed_plugin_is_in_the_catalogue_with_its_package(plugin_env):
    import json

    listed = json.loads(plugin_env.shuttle("migrations", "--json", PYTHONPATH=plugin_env.plugin_path).stdout)
    entry = {m["name"]: m for m in listed}["example-scores"]
    assert entry["package"] == "shuttle-example-plugin 0.1.0" and entry["problem"] is None
    assert (entry["source"], entry["target"], entry["status"]) == ("postgres", "postgres", "available")
    assert {m["package"] for m in listed if m["name"] == "modmon"} == {"built-in"}
    table = plugin_env.shuttle("migrations", PYTHONPATH=plugin_env.plugin_path, COLUMNS="160").stdout
    assert "example-scores" in table and "shuttle-example-plugin 0.1.0" in table


def test_plugin_runs_end_to_end_then_rerun_writes_nothing_then_deletes_propagate(plugin_env):
    env = plugin_env
    code, report = run(env, "--target-schema", "plug", "--chunk-rows", "700")
    assert code == 0, report.get("verdict_reason")
    assert report["verdict"] == "clean" and report["migration"] == "example-scores"
    total = env.data.total_rows
    assert report["totals"]["rows_read"] == total
    assert report["totals"]["rows_rejected"] == REJECTED
    assert report["totals"]["rows_written"] == total - REJECTED
    assert env.sql("SELECT count(*) FROM plug.prediction_scores")[0][0] == total - REJECTED
    assert all(check["ok"] for check in report["checks"])
    # The transform, checked against the source row by row in SQL.
    wrong = env.sql("SELECT count(*) FROM plug.prediction_scores t JOIN archived_predictions s USING (id)"
                    " WHERE t.score IS DISTINCT FROM round(s.prediction::numeric, 4)::float8"
                    " OR t.label <> CASE WHEN s.prediction >= 0.5 THEN 'positive' ELSE 'negative' END"
                    " OR t.region IS DISTINCT FROM s.features::jsonb ->> 'region'"
                    " OR t.deployment_id <> s.deployment_id OR t.ts <> s.ts")[0][0]
    assert wrong == 0
    rejected = {r[0] for r in env.ledger_sql("SELECT reason FROM shuttle.rejects WHERE run_id = %s",
                                             (report["run_id"],))}
    assert rejected == {"prediction is NULL", "features is not valid JSON", "features must be a JSON object, got list"}

    code, again = run(env, "--target-schema", "plug", "--chunk-rows", "700")
    assert code == 0 and again["verdict"] == "clean"
    assert again["totals"]["rows_written"] == 0
    assert again["totals"]["rows_unchanged"] == total - REJECTED

    gone = env.sql("SELECT id FROM archived_predictions WHERE prediction IS NOT NULL ORDER BY id DESC LIMIT 1")[0][0]
    env.sql("DELETE FROM archived_predictions WHERE id = %s RETURNING id", (gone,))
    code, after = run(env, "--target-schema", "plug", "--chunk-rows", "700")
    assert code == 0 and after["verdict"] == "clean"
    assert env.sql("SELECT count(*) FROM plug.prediction_scores WHERE id = %s", (gone,))[0][0] == 0
    assert after["totals"]["rows_written"] == 1


def test_a_run_of_the_plugin_is_reported_and_resumable_like_a_builtin(plugin_env):
    env = plugin_env
    code, report = run(env, "--target-schema", "plug_sel", "--deployment-ids", env.data.deployments[1])
    assert code == 0
    assert {r["partition"] for r in report["partitions"]} == {env.data.deployments[1]}
    assert {d for (d,) in env.sql("SELECT DISTINCT deployment_id FROM plug_sel.prediction_scores")} == \
        {env.data.deployments[1]}
    shown = env.shuttle("report", report["run_id"], PYTHONPATH=env.plugin_path)
    assert shown.returncode == 0 and "example-scores" in shown.stdout
    verified = env.shuttle("verify", report["run_id"], PYTHONPATH=env.plugin_path)
    assert verified.returncode == 0, verified.stderr
