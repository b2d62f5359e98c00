"""End-to-end harness: a demo-like source, a ledger, a Redis database and two real worker processes.

The CLI runs as the installed `shuttle` command in subprocesses, exactly as a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis

from common.migrations.modmon_fixtures import Dataset, build_source
from common.settings import load_settings
from producer.local_workers import LocalWorkers
from tests.conftest import REDIS_BASE, create_db, drop_db

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The CLI of this checkout, as `shuttle` runs it (python -m producer), whatever is installed.
SHUTTLE = [sys.executable, "-m", "producer"]
E2E_REDIS_DB = int(os.environ.get("SHUTTLE_TEST_REDIS_DB", "12"))


@dataclass
class Env:
    source_url: str
    ledger_url: str
    broker_url: str
    data: Dataset
    log_dir: Path
    queue: str

    def environ(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"SHUTTLE_SOURCE_URL": self.source_url, "SHUTTLE_TARGET_URL": self.source_url,
                    "SHUTTLE_LEDGER_URL": self.ledger_url, "SHUTTLE_BROKER_URL": self.broker_url,
                    "SHUTTLE_QUEUE": self.queue, "COLUMNS": "200",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))})
        env.update(extra)
        return env

    def shuttle(self, *args: str, timeout: float = 180, **extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run([*SHUTTLE, *args], env=self.environ(**extra_env), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, cwd=PROJECT_ROOT)

    def run_json(self, *args: str, **extra_env: str) -> tuple[int, dict]:
        wait = ("--wait",) if args[0] in ("run", "resume") else ()
        result = self.shuttle(*args, *wait, "--json", **extra_env)
        assert result.stdout.strip(), result.stderr
        return result.returncode, json.loads(result.stdout)

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.source_url) as conn:
            return conn.execute(query, params).fetchall()

    def ledger_sql(self, query: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.ledger_url) as conn:
            return conn.execute(query, params).fetchall()

    def checksum(self, schema: str) -> tuple[str, str]:
        """Order-independent fingerprint of both target tables of a schema."""
        return tuple(self.sql(
            f"SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {schema}.{table} t")[0][0]
            for table in ("prediction_stats_hourly", "feature_drift_hourly"))


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
    settings = load_settings(ledger_url=ledger_url, broker_url=broker_url, source_url=source_url,
                             target_url=source_url, queue=queue)
    workers = LocalWorkers(settings, 2, name="e2e", log_dir=log_dir)
    with workers:
        env.workers = workers
        yield env
    redis.Redis.from_url(broker_url).delete(queue)
    drop_db(source_db)
    drop_db(ledger_db)
