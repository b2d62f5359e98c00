"""Bad input: a clear message naming the problem, a non-zero exit, and nothing written anywhere."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from urllib.parse import quote

import psycopg
import pytest
import redis
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from common.ledger import Ledger
from producer.local_workers import LocalWorkers
from tests.harness import PROJECT_ROOT, Env
from tests.mongo_server import REAL_MONGO_URI, NxServer

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


# -- refuse, don't guess ------------------------------------------------------------------------------

PW_SECRET = "Zq7-Shh@pw %k3y"  # distinctive, and with an '@', a space and a '%' that URLs must encode
PW_MARK = "Zq7-Shh"  # what no output may contain, encoded or not


def ledger_text(env: Env) -> str:
    """Every row of every table of the ledger's schema, as text (the schema made first, as any command would)."""
    ledger = Ledger(env.ledger_url)
    ledger.ensure_schema()
    ledger.dispose()
    tables = [t for (t,) in env.ledger_sql(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'shuttle'")]
    assert "runs" in tables and "reports" in tables
    return "\n".join(row[0] for t in tables for row in env.ledger_sql(f"SELECT t::text FROM shuttle.{t} t"))


def one_failed_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize("args, flag", [
    (("run", "modmon", "--deployment-ids", ""), "--deployment-ids"),
    (("run", "modmon", "--partitions", ","), "--partitions"),
    (("run", "modmon", "--deployment-ids", "5c756bb09219fd13ad19fe18,,5c756bb09219fd13ad19fe19"), "--deployment-ids"),
    (("run", "modmon", "--deployment-ids", "--wait"), "--deployment-ids"),  # `--deployment-ids $UNSET --wait`
    (("run", "modmon", "--deployment-ids="), "--deployment-ids"),
    (("plan", "modmon", "--deployment-ids", " "), "--deployment-ids"),
    (("plan", "mlflow-to-mongo", "--experiment-ids", "1,,2"), "--experiment-ids"),
    (("run", "mlflow-to-mongo", "--model-names", ""), "--model-names"),
    (("purge", "modmon", "--all", "--dry-run", "--deployment-ids", ""), "--deployment-ids"),
    (("purge", "modmon", "--all", "--yes", "--partitions", ","), "--partitions"),
])
def test_an_empty_id_is_a_usage_error_naming_the_flag(faults, args, flag):
    """An empty shell variable must not widen a selection to every partition, nor a purge to every deployment."""
    before = ledger_text(faults)
    result = faults.shuttle(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert flag in result.stderr and ("an empty" in result.stderr or "needs at least one value" in result.stderr)
    assert "purge" not in result.stdout and "rows in" not in result.stdout
    assert ledger_text(faults) == before, "nothing is written to the ledger"
    assert faults.sql("SELECT count(*) FROM archived_predictions")[0][0] == faults.data.total_rows


@pytest.mark.parametrize("args, named", [
    (("plan", "modmon", "--deployment-ids", "5c756bb0\udcff9219fd13ad19fe18"), "argument 4 (after --deployment-ids)"),
    (("run", "modmon", "--source-url", f"postgresql://postgres:{PW_MARK}\udcff@127.0.0.1/x"), "(after --source-url)"),
    (("run", "modmon", f"--target-url=postgresql://postgres:{PW_MARK}\udcfe@127.0.0.1/x"), "the value of --target-url"),
    (("plan", "modmon", "--config", "/tmp/shuttle-\udcff.toml"), "argument 4 (after --config)"),
    (("plan", "mod\udcffmon"), "argument 2"),
])
def test_a_non_utf8_argument_is_a_one_line_usage_error(faults, args, named):
    """The bytes reach Python undecoded (surrogate escapes); they must not travel on to a driver or the terminal."""
    before = ledger_text(faults)
    result = faults.shuttle(*args)
    assert result.returncode == 2
    line = one_failed_line(result)
    assert named in line and "not valid UTF-8" in line and PW_MARK not in result.stdout + result.stderr
    assert ledger_text(faults) == before


@pytest.mark.parametrize("migration, table", [("modmon", "public.archived_predictions"),
                                              ("mlflow-latest-metrics", "public.runs")])
@pytest.mark.parametrize("command", ["plan", "run"])
def test_a_source_without_the_migrations_tables_names_the_missing_one(faults, fresh_db, migration, table, command):
    before = ledger_text(faults)
    result = faults.shuttle(command, migration, "--source-url", fresh_db, "--target-url", fresh_db)
    assert result.returncode == 2
    line = one_failed_line(result)
    assert line.startswith("FAILED: source ") and f'relation "{table}" does not exist' in line
    assert "--source-schema" in line and "source URL" in line
    assert ledger_text(faults) == before


def test_an_mlflow_source_without_a_needed_table_names_it(faults, fresh_db):
    """mlflow-to-mongo reflects what tables there are; a selection still needs `experiments`."""
    server = None if REAL_MONGO_URI else NxServer().start()
    try:
        target = f"{(REAL_MONGO_URI or server.uri).rstrip('/')}/shuttle_missing_{os.getpid()}"
        empty = faults.shuttle("plan", "mlflow-to-mongo", "--source-url", fresh_db, "--target-url", target)
        assert empty.returncode == 2 and "no tables in schema 'public'" in one_failed_line(empty)
        with psycopg.connect(fresh_db, autocommit=True) as conn:
            conn.execute("CREATE TABLE runs (run_uuid text PRIMARY KEY, experiment_id integer)")
        selected = faults.shuttle("plan", "mlflow-to-mongo", "--source-url", fresh_db, "--target-url", target,
                                  "--experiment-ids", "1")
        assert selected.returncode == 2
        line = one_failed_line(selected)
        assert 'relation "public.experiments" does not exist' in line and "--source-schema" in line
    finally:
        if server is not None:
            server.cleanup()


def test_a_source_schema_without_the_tables_names_it(faults):
    result = faults.shuttle("plan", "modmon", "--source-schema", "archive")
    assert result.returncode == 2
    assert 'relation "archive.archived_predictions" does not exist' in one_failed_line(result)


ENCODED = quote(PW_SECRET, safe="")
UNREACHABLE = "127.0.0.1:1"


@pytest.mark.parametrize("flag, url", [
    ("--source-url", f"postgresql://postgres:{ENCODED}@{UNREACHABLE}/x"),
    ("--source-url", f"postgresql://postgres@{UNREACHABLE}/x?password={ENCODED}"),
    ("--source-url", f"postgresql://{UNREACHABLE}/x?sslmode=disable&user=postgres&password={ENCODED}"),
    ("--source-url", f"host=127.0.0.1 port=1 user=postgres password='{PW_SECRET}' dbname=x"),
    ("--target-url", f"postgresql://postgres@{UNREACHABLE}/x?password={ENCODED}"),
    ("--ledger-url", f"host=127.0.0.1 port=1 user=postgres password='{PW_SECRET}' dbname=x"),
])
def test_an_accepted_form_of_a_password_is_masked_when_the_server_is_unreachable(faults, flag, url):
    result = faults.shuttle("run", "modmon", flag, url)
    assert result.returncode == 2
    line = one_failed_line(result)
    assert "unreachable" in line and "postgres:***@127.0.0.1:1/x" in line, line
    assert PW_MARK not in result.stdout + result.stderr


def test_a_mongodb_password_is_masked_when_the_server_is_unreachable(faults):
    result = faults.shuttle("plan", "mlflow-to-mongo", "--target-url",
                            f"mongodb://app:{ENCODED}@{UNREACHABLE}/mlflow?authSource=admin")
    assert result.returncode == 2
    assert "mongodb://app:***@127.0.0.1:1/mlflow" in one_failed_line(result)
    assert PW_MARK not in result.stdout + result.stderr


@pytest.mark.parametrize("flag, url, problem", [
    ("--source-url", f"postgresql://postgres:{PW_MARK}%zz@127.0.0.1/x", "'%' not followed by two hex digits"),
    ("--source-url", f"postgresql://postgres:{PW_MARK}@x@127.0.0.1/x", "'@' that does not end its user info"),
    ("--target-url", f"postgresql://postgres:{PW_MARK}/x@127.0.0.1/x", "'@' that does not end its user info"),
    ("--target-url", f"postgresql://postgres:{PW_MARK}@127.0.0.1/x?password={PW_MARK}", "given twice"),
    ("--mongodb-uri", f"mongodb://app:{PW_MARK}@x@127.0.0.1/mlflow?authSource=admin", "'@' that does not end"),
    ("--mongodb-uri", f"mongodb://app@127.0.0.1/mlflow?password={PW_MARK}", "not in the query"),
    ("--ledger-url", f"postgresql://postgres:{PW_MARK}%@127.0.0.1/x", "'%' not followed by two hex digits"),
    ("--broker-url", f"redis://:{PW_MARK}@x@127.0.0.1:6379/0", "'@' that does not end its user info"),
    ("--source-url", "", "is empty"),
])
def test_an_ambiguous_url_is_refused_in_one_line_without_showing_it(faults, flag, url, problem):
    before = ledger_text(faults)
    result = faults.shuttle("run", "mlflow-to-mongo" if "mongo" in flag else "modmon", flag, url)
    assert result.returncode == 2
    line = one_failed_line(result)
    assert line.startswith(f"FAILED: {flag}") or f"/ {flag}" in line, line
    assert problem in line and PW_MARK not in result.stdout + result.stderr
    assert ledger_text(faults) == before


@pytest.fixture
def password_role(faults) -> Iterator[str]:
    """A role with a password (the server trusts 127.0.0.1, so it only has to never show up)."""
    role = f"shuttle_pw_{os.getpid()}"
    with psycopg.connect(faults.source_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS pw_forms CASCADE"))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(PW_SECRET)))
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
            sql.Identifier(conn.info.dbname), sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(sql.Identifier(role)))
    yield role
    with psycopg.connect(faults.source_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS pw_forms CASCADE"))
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_run_with_passwords_in_the_query_and_keyword_forms_ends_clean_and_shows_them_nowhere(faults, password_role):
    """The CLI gets the keyword form for the source and the query form for the target; the workers get
    them the other way round in their own environment, and find the passwords of the ledger's bare URLs."""
    db = conninfo_to_dict(faults.source_url)["dbname"]
    keyword = f"host=127.0.0.1 port=5432 user={password_role} password='{PW_SECRET}' dbname={db}"
    query = f"postgresql://{password_role}@127.0.0.1:5432/{db}?application_name=pw&password={ENCODED}"
    workers = LocalWorkers(faults.settings(), 2, name="pw", log_dir=faults.log_dir,
                           extra_env={"SHUTTLE_SOURCE_URL": query, "SHUTTLE_TARGET_URL": keyword})
    with workers:
        result = faults.shuttle("run", "modmon", "--source-url", keyword, "--target-url", query,
                                "--target-schema", "pw_forms", "--chunk-rows", "20000", "--wait", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["verdict"] == "clean" and report["totals"]["rows_read"] == faults.data.total_rows
    assert report["source"] == f"postgresql://{password_role}@127.0.0.1:5432/{db}"
    assert report["target"] == f"postgresql://{password_role}@127.0.0.1:5432/{db}?application_name=pw"
    again = faults.shuttle("report", report["run_id"], "--json")
    text = faults.shuttle("report", report["run_id"])
    status = faults.shuttle("status", report["run_id"])
    outputs = [result.stdout, result.stderr, again.stdout, again.stderr, text.stdout, text.stderr,
               status.stdout, status.stderr, ledger_text(faults)]
    outputs += [log.read_text(errors="replace") for log in faults.log_dir.iterdir()]
    client = redis.Redis.from_url(faults.broker_url)
    for key in client.scan_iter():
        kind = client.type(key)
        values = [client.get(key)] if kind == b"string" else client.lrange(key, 0, -1) if kind == b"list" else \
            list(client.hgetall(key).values()) if kind == b"hash" else []
        outputs += [(v or b"").decode(errors="replace") for v in values]
    assert not [text for text in outputs if PW_MARK in text or ENCODED in text]
