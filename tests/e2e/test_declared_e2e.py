"""A migration file through the real CLI and a real worker: `shuttle plan|run file.toml`, the report, status,
verify, a re-run that writes nothing, and `shuttle migrations` listing the files of SHUTTLE_MIGRATIONS_DIR
(a bad one with its error). The worker has no file: it rebuilds the migration from the run's options."""

from __future__ import annotations

import json
import os

import psycopg
import pytest
import redis

from tests.conftest import REDIS_BASE, create_db, drop_db
from tests.e2e.conftest import E2E_REDIS_DB
from tests.harness import Env
from tests.integration.declared_fixtures import BAD_SCORE_IDS, MISSING_SCORE_IDS, ROWS, build_pg_source, migration_file

pytestmark = pytest.mark.e2e
ACCEPTED = ROWS - len(BAD_SCORE_IDS) - len(MISSING_SCORE_IDS)


@pytest.fixture(scope="module")
def declared(tmp_path_factory):
    pid = os.getpid()
    source_db, ledger_db = f"shuttle_decl_e2e_{pid}", f"shuttle_decl_e2e_ledger_{pid}"
    source_url, ledger_url = create_db(source_db), create_db(ledger_db)
    build_pg_source(source_url)
    queue = f"shuttle-decl-e2e-{pid}"
    broker_url = f"{REDIS_BASE}/{E2E_REDIS_DB}"
    env = Env(source_url, ledger_url, broker_url, None, tmp_path_factory.mktemp("decl-workers"), queue)  # type: ignore[arg-type]
    folder = tmp_path_factory.mktemp("migrations")
    # The database name comes from the environment, as a password would (${VAR} in the file's URL).
    base = source_url.rsplit("/", 1)[0]
    text = migration_file('table = "archived_predictions"', 'table = "compact.predictions"',
                          source_url=f"{base}/${{DECL_E2E_DB}}", target_url=f"{base}/${{DECL_E2E_DB}}")
    (folder / "predictions.toml").write_text(text)
    (folder / "broken.toml").write_text(text.replace('cast = "float"', 'cast = "double"').replace(
        "predictions-compact", "broken-one"))
    with env.workers(1, "decl"):
        yield env, folder, source_db
    redis.Redis.from_url(broker_url).delete(queue)
    drop_db(source_db)
    drop_db(ledger_db)


def test_a_migration_file_runs_like_a_built_in(declared):
    env, folder, source_db = declared
    path = str(folder / "predictions.toml")
    extra = {"DECL_E2E_DB": source_db, "SHUTTLE_SOURCE_URL": "", "SHUTTLE_TARGET_URL": ""}

    planned = env.shuttle("plan", path, "--chunk-rows", "70", **extra)
    assert planned.returncode == 0, planned.stderr
    assert "Plan for predictions-compact" in planned.stdout and "dry run" in planned.stdout
    assert f"{ROWS:,} rows in" in planned.stdout

    code, report = env.run_json("run", path, "--chunk-rows", "70", **extra)
    assert code == 0, report["verdict_reason"]
    assert report["migration"] == "predictions-compact" and report["run_id"].startswith("predictions-compact-")
    assert report["verdict"] == "clean"
    assert report["totals"]["rows_rejected"] == len(BAD_SCORE_IDS) + len(MISSING_SCORE_IDS)
    assert report["totals"]["targets"]["predictions"]["inserted"] == ACCEPTED
    assert {r["key"] for r in report["rejects"]["sample"]} >= {f'["{i}"]' for i in BAD_SCORE_IDS}
    assert env.sql("SELECT count(*) FROM compact.predictions") == [(ACCEPTED,)]
    # A created table keeps the source's types and NOT NULL, with the key as primary key; declared indexes built.
    columns = dict(env.sql("SELECT column_name, data_type || ':' || is_nullable FROM information_schema.columns"
                           " WHERE table_schema = 'compact' AND table_name = 'predictions'"))
    assert columns["deployment_id"] == "character varying:NO" and columns["prediction_id"] == "bigint:NO"
    assert columns["score"] == "double precision:YES" and columns["created_at"] == "timestamp with time zone:YES"
    assert env.sql("SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
                   " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'compact.predictions'::regclass"
                   " AND i.indisprimary") == [("prediction_id",)]
    assert env.sql("SELECT count(*) FROM pg_indexes WHERE schemaname = 'compact' AND tablename = 'predictions'"
                   " AND indexdef LIKE %s", ('%(deployment_id, created_at)%',)) == [(1,)]

    run_id = report["run_id"]
    status = env.shuttle("status", run_id)
    assert status.returncode == 0 and run_id in status.stdout
    verified = env.shuttle("verify", run_id, "--json", **extra)
    assert verified.returncode == 0, verified.stderr
    assert all(c["ok"] for c in json.loads(verified.stdout))

    with psycopg.connect(env.source_url) as conn:
        conn.execute("DELETE FROM archived_predictions WHERE id = 12")
    code, again = env.run_json("run", "predictions-compact", "--chunk-rows", "70",
                               SHUTTLE_MIGRATIONS_DIR=str(folder), **extra)
    assert code == 0, again["verdict_reason"]
    assert again["totals"]["rows_written"] == again["totals"]["rows_deleted"] == 1
    assert env.sql("SELECT count(*) FROM compact.predictions WHERE prediction_id = 12") == [(0,)]


def test_shuttle_migrations_lists_the_folder_beside_the_built_ins(declared):
    env, folder, _ = declared
    listed = env.shuttle("migrations", "--json", SHUTTLE_MIGRATIONS_DIR=str(folder))
    assert listed.returncode == 0, listed.stderr
    by_name = {m["name"]: m for m in json.loads(listed.stdout)}
    assert by_name["modmon"]["status"] == "available"
    assert by_name["predictions-compact"]["status"] == "declared"
    assert by_name["predictions-compact"]["source"] == "postgres"
    assert by_name["broken.toml"]["status"] == "invalid"
    line = next(n for n, text in enumerate((folder / "broken.toml").read_text().splitlines(), start=1)
                if text.startswith("score ="))
    assert by_name["broken.toml"]["summary"] == (f"{folder}/broken.toml:{line}: columns.score.cast: unknown cast "
                                                 "'double'; use one of: text, int, float, bool, timestamp, json")
    shown = env.shuttle("migrations", SHUTTLE_MIGRATIONS_DIR=str(folder), COLUMNS="80")
    text = " ".join(part.strip() for line in shown.stdout.splitlines() for part in line.split("│")[1:])
    assert "predictions-compact" in text and "invalid:" in text
    bad = env.shuttle("run", str(folder / "broken.toml"))
    assert bad.returncode == 2
    assert f"broken.toml:{line}: columns.score.cast: unknown cast 'double'" in bad.stderr


@pytest.fixture(scope="module")
def mongo_url():
    """A MongoDB database: on nx-27017 started here, or on the real server of SHUTTLE_TEST_MONGO_URI."""
    import pymongo

    from tests.mongo_server import REAL_MONGO_URI, NxServer

    server = None if REAL_MONGO_URI else NxServer().start()
    uri = REAL_MONGO_URI.rstrip("/") if REAL_MONGO_URI else server.uri
    name = f"shuttle_decl_e2e_{os.getpid()}"
    yield f"{uri}/{name}"
    with pymongo.MongoClient(uri) as client:
        client.drop_database(name)
    if server is not None:
        server.cleanup()


def test_a_file_into_mongodb_through_the_cli(declared, mongo_url, tmp_path):
    import pymongo

    env, _, _ = declared
    path = tmp_path / "to-mongo.toml"
    path.write_text(migration_file('table = "archived_predictions"', 'collection = "predictions"',
                                   name="predictions-to-mongo"))
    code, report = env.run_json("run", str(path), "--source-url", env.source_url, "--target-url", mongo_url,
                                "--chunk-rows", "100")
    assert code == 0, report["verdict_reason"]
    totals = report["totals"]  # (a test before may have deleted a source row)
    assert totals["rows_rejected"] == len(BAD_SCORE_IDS) + len(MISSING_SCORE_IDS)
    assert totals["targets"]["predictions"]["inserted"] == totals["source_rows"] - totals["rows_rejected"] > 0
    assert report["target"] == mongo_url
    with pymongo.MongoClient(mongo_url) as client:
        stored = client.get_default_database()["predictions"].find_one({"_id": 5})
    assert stored["email"] == "user5@example.com" and stored["prediction_id"] == 5
    verified = env.shuttle("verify", report["run_id"], "--json", "--target-url", mongo_url)
    assert verified.returncode == 0, verified.stderr
    again = env.shuttle("report", report["run_id"], "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["verdict"] == "clean"
