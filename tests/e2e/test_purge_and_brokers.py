"""Purge deletes only verified, migrated rows; a RabbitMQ broker works like Redis."""

from __future__ import annotations

import os

import psycopg
import pytest

from common.migrations.modmon_fixtures import build_source
from common.settings import load_settings
from producer.local_workers import LocalWorkers
from tests.conftest import REDIS_BASE, create_db, drop_db

pytestmark = pytest.mark.e2e
BEFORE = "2026-06-04"


@pytest.fixture
def purge_source(e2e):
    name = f"shuttle_e2e_purge_{os.getpid()}"
    url = create_db(name)
    data = build_source(url, rows=12_000, deployments=6)
    yield url, data
    drop_db(name)


def _counts(url: str) -> dict[tuple[str, bool], int]:
    with psycopg.connect(url) as conn:
        return {(d, old): n for d, old, n in conn.execute(
            "SELECT deployment_id, ts < %s, count(*) FROM archived_predictions GROUP BY 1, 2", (BEFORE,)).fetchall()}


def test_purge_before_deletes_only_older_rows_of_verified_deployments(e2e, purge_source):
    url, data = purge_source
    a, b, c = data.deployments[0], data.deployments[1], data.deployments[2]
    code, report = e2e.run_json("run", "modmon", "--source-url", url, "--target-url", url, "--deployment-ids", a, b)
    assert code == 0, report["verdict_reason"]
    run_id = report["run_id"]

    not_verified = e2e.shuttle("purge", "modmon", "--before", BEFORE, "--yes")
    assert not_verified.returncode == 2 and "nothing to purge" in not_verified.stderr

    verified = e2e.shuttle("verify", run_id)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    before = _counts(url)

    unverified = e2e.shuttle("purge", "modmon", "--before", BEFORE, "--yes", "--deployment-ids", a, c)
    assert unverified.returncode == 2 and c in unverified.stderr and "refusing" in unverified.stderr
    unconfirmed = e2e.shuttle("purge", "modmon", "--before", BEFORE)
    assert unconfirmed.returncode == 2 and "not confirmed" in unconfirmed.stderr
    dry = e2e.shuttle("purge", "modmon", "--before", BEFORE, "--dry-run")
    assert dry.returncode == 0 and "would purge" in dry.stdout
    assert _counts(url) == before

    purged = e2e.shuttle("purge", "modmon", "--before", BEFORE, "--yes")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    after = _counts(url)
    rejected_old = {d: len([i for i in data.malformed_ids if _deployment_and_old(url, i) == (d, True)]) for d in (a, b)}
    for d in data.deployments:
        if d in (a, b):
            assert after.get((d, True), 0) == rejected_old[d], "only rejected rows stay in the purged range"
        else:
            assert after.get((d, True)) == before.get((d, True))
        assert after.get((d, False)) == before.get((d, False))
    deleted = sum(before.get((d, True), 0) - after.get((d, True), 0) for d in (a, b))
    assert f"purged {deleted:,} rows in total" in purged.stdout


def _deployment_and_old(url: str, row_id: int) -> tuple[str, bool] | None:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT deployment_id, ts < %s FROM archived_predictions WHERE id = %s",
                           (BEFORE, row_id)).fetchone()
    return tuple(row) if row else None


def test_rabbitmq_broker_runs_a_migration(e2e):
    broker = "amqp://guest:guest@127.0.0.1:5672//"
    queue = f"shuttle_test_{os.getpid()}"
    settings = load_settings(broker_url=broker, result_backend=f"{REDIS_BASE}/{13}", ledger_url=e2e.ledger_url,
                             queue=queue)
    with LocalWorkers(settings, 1, name="rabbit", log_dir=e2e.log_dir):
        code, report = e2e.run_json("run", "modmon", "--target-schema", "rabbit",
                                    SHUTTLE_BROKER_URL=broker, SHUTTLE_RESULT_BACKEND=f"{REDIS_BASE}/13",
                                    SHUTTLE_QUEUE=queue)
    assert code == 0 and report["verdict"] == "clean"
    assert report["totals"]["rows_read"] == e2e.data.total_rows
