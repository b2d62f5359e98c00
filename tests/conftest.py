"""Shared fixtures: real PostgreSQL databases and a Redis database, made for this session and removed after.

Every database name carries the process id, so two test sessions on one machine never meet.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

PG_BASE = os.environ.get("SHUTTLE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432")
REDIS_BASE = os.environ.get("SHUTTLE_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def pg_url(database: str) -> str:
    return f"{PG_BASE}/{database}"


def _admin() -> psycopg.Connection:
    return psycopg.connect(pg_url("postgres"), autocommit=True)


def create_db(name: str) -> str:
    with _admin() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return pg_url(name)


def drop_db(name: str) -> None:
    with _admin() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def fresh_db() -> Iterator[str]:
    """An empty database for one test."""
    name = f"shuttle_t_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    yield create_db(name)
    drop_db(name)


@pytest.fixture(scope="session")
def mlflow_source():
    """An MLflow database built once per session by MLflow's own client; tests only read it."""
    from common.migrations.mlflow_fixtures import build_mlflow_source

    name = f"shuttle_m2m_{os.getpid()}_mlflow"
    url = create_db(name)
    data = build_mlflow_source(url, experiments=4, runs_per_experiment=60, steps=45)
    yield url, data
    drop_db(name)


# Fault tests that take a single case's fixture rather than the `case` parameter, by that fixture.
_CASE_FIXTURES = {"userdata_case": "userdata-split", "rollback_case": "userdata-rollback",
                  "model_files_case": "model-files", "latest_case": "mlflow-latest-metrics",
                  "mongo_case": "mlflow-to-mongo", "modmon_case": "modmon"}


def xdist_group_of(item: pytest.Item) -> str:
    """Which tests share a test process (`--dist loadgroup`): a fault test goes with the other tests of its
    migration case, wherever their file, so each case's baseline is built once and the cases spread over
    the processes; every other test goes with its file, whose module fixtures it shares."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "case" in callspec.params:
        return f"case-{callspec.params['case']}"
    for fixture, case in _CASE_FIXTURES.items():
        if fixture in item.fixturenames:
            return f"case-{case}"
    return item.nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.xdist_group(xdist_group_of(item)))
