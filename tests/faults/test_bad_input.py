"""Bad input: a clear message naming the problem, a non-zero exit, and nothing written anywhere."""

from __future__ import annotations

import json
import re


import psycopg
import pytest

from tests.harness import PROJECT_ROOT, Env

pytestmark = pytest.mark.faults
SECRET = "n0tInLogs"


def runs_in_ledger(env: Env) -> int:
    return env.ledger_sql("SELECT count(*) FROM shuttle.runs")[0][0]


def test_unreachable_target_is_named_and_masked(faults):
    result = faults.shuttle("run", "modmon", "--target-url", f"postgresql://postgres:{SECRET}@127.0.0.1:1/db")
    assert result.returncode == 2
    assert "target database postgresql://postgres:***@127.0.0.1:1/db is unreachable" in result.stderr
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("content, message", [
    ({"chunk_rowz": 10}, "unknown key 'chunk_rowz'"),
    ({"chunk_rows": "lots"}, "'chunk_rows'"),
    ({"migrations": {"modmon": {"source": "x"}}}, "unknown key 'migrations.modmon.source'"),
])
def test_config_file_with_unknown_keys_or_wrong_types(faults, tmp_path, content, message):
    before = runs_in_ledger(faults)
    config = tmp_path / "shuttle.json"
    config.write_text(json.dumps(content))
    result = faults.shuttle("run", "modmon", "--config", str(config))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert runs_in_ledger(faults) == before


def test_target_table_with_conflicting_columns_is_refused(faults):
    with psycopg.connect(faults.source_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS conflict")
        conn.execute("CREATE TABLE IF NOT EXISTS conflict.prediction_stats_hourly (deployment_id text, n int)")
    before = runs_in_ledger(faults)
    result = faults.shuttle("run", "modmon", "--target-schema", "conflict")
    assert result.returncode == 2
    assert "target table conflict.prediction_stats_hourly" in result.stderr
    assert "exists with different columns" in result.stderr
    assert runs_in_ledger(faults) == before
    assert faults.sql("SELECT count(*) FROM conflict.prediction_stats_hourly")[0][0] == 0


@pytest.mark.parametrize("name", ['x"; DROP TABLE deployments; --', "a.b.c", "Robert'); DROP"])
def test_hostile_schema_names_are_refused_not_interpolated(faults, name):
    for flag in ("--target-schema", "--source-schema"):
        result = faults.shuttle("run", "modmon", flag, name)
        assert result.returncode == 2 and "invalid table or schema name" in result.stderr
    assert faults.sql("SELECT count(*) FROM deployments")[0][0] == len(faults.data.deployments)


def test_compose_takes_every_credential_from_the_environment():
    import yaml

    compose = (PROJECT_ROOT / "docker-compose.yml").read_text()
    spec = yaml.safe_load(compose)
    redis_command = " ".join(spec["services"]["redis"]["command"])
    assert "--requirepass ${REDIS_PASSWORD" in redis_command
    assert spec["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_USER")
    for url in re.findall(r"[a-z]+://[^\s\"']+", json.dumps(spec)):  # the parsed file: comments aside
        userinfo = url.split("://", 1)[1].split("@", 1)[0] if "@" in url else ""
        if ":" in userinfo:
            assert userinfo.split(":", 1)[1].startswith("${"), f"literal password in {url}"
    assert not (PROJECT_ROOT / ".env").exists() or ".env" in (PROJECT_ROOT / ".gitignore").read_text()


def test_purge_never_runs_unconfirmed_without_a_terminal(faults):
    result = faults.shuttle("purge", "modmon", "--all")
    assert result.returncode == 2
    assert "nothing to purge" in result.stderr or "not confirmed" in result.stderr
    assert faults.sql("SELECT count(*) FROM archived_predictions")[0][0] == faults.data.total_rows


def test_purge_needs_all_or_before(faults):
    result = faults.shuttle("purge", "modmon")
    assert result.returncode == 2 and "exactly one of --all or --before" in result.stderr
