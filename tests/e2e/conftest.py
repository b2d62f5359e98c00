"""End-to-end fixture: a demo-like source, a ledger, a Redis queue and two real worker processes."""

from __future__ import annotations

import os

import pytest
import redis

from common.migrations.modmon_fixtures import build_source
from tests.conftest import REDIS_BASE, create_db, drop_db
from tests.harness import Env

E2E_REDIS_DB = int(os.environ.get("SHUTTLE_TEST_REDIS_DB", "12"))


@pytest.fixture(scope="session")
def e2e(tmp_path_factory) -> Env:
    pid = os.getpid()
    source_db, ledger_db = f"shuttle_e2e_{pid}", f"shuttle_e2e_ledger_{pid}"
    source_url, ledger_url = create_db(source_db), create_db(ledger_db)
    broker_url = f"{REDIS_BASE}/{E2E_REDIS_DB}"
    queue = f"shuttle-e2e-{pid}"  # a queue of its own: sessions sharing a Redis never take each other's tasks
    data = build_source(source_url, rows=120_000, deployments=12)
    log_dir = tmp_path_factory.mktemp("workers")
    env = Env(source_url, ledger_url, broker_url, data, log_dir, queue)
    with env.workers(2, "e2e"):
        yield env
    redis.Redis.from_url(broker_url).delete(queue)
    drop_db(source_db)
    drop_db(ledger_db)
