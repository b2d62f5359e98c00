"""The end-to-end harness: a source, a ledger, a broker queue, and the CLI run as users run it.

The CLI runs as `python -m producer` (what the `shuttle` script runs) in subprocesses of this
checkout; workers are real Celery processes (producer.local_workers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from common.migrations.modmon_fixtures import Dataset
from common.settings import Settings, load_settings
from producer.local_workers import LocalWorkers

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The CLI of this checkout, as `shuttle` runs it (python -m producer), whatever is installed.
SHUTTLE = [sys.executable, "-m", "producer"]


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

    def settings(self, **overrides: Any) -> Settings:
        values = dict(ledger_url=self.ledger_url, broker_url=self.broker_url, source_url=self.source_url,
                      target_url=self.source_url, queue=self.queue)
        values.update(overrides)
        return load_settings(**values)

    def workers(self, count: int, name: str, **settings_overrides: Any) -> LocalWorkers:
        return LocalWorkers(self.settings(**settings_overrides), count, name=name, log_dir=self.log_dir)

    def start(self, *args: str, **extra_env: str) -> str:
        """`shuttle run …` without waiting; returns the run id."""
        result = self.shuttle("run", *args, **extra_env)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    def chunk_states(self, run_id: str) -> dict[str, int]:
        return dict(self.ledger_sql("SELECT state, count(*) FROM shuttle.chunks WHERE run_id = %s GROUP BY 1",
                                    (run_id,)))


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not reached within {timeout:.0f}s")
