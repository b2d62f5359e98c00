"""Fault-injection harness: its own sources, ledger and queue; each test starts the workers it kills.

The fault tests take a `case` (tests/faults/cases.py), so each runs against every migration.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis

from common.migrations.modmon_fixtures import build_source
from tests.conftest import REDIS_BASE, create_db, drop_db
from tests.faults.cases import (Case, DeclaredCase, LatestMetricsCase, ModelFilesCase, ModmonCase, MongoCase,
                               UserdataCase, UserdataRollbackCase)
from tests.harness import Env
from tests.mongo_server import REAL_MONGO_URI, NxServer

FAULTS_REDIS_DB = int(os.environ.get("SHUTTLE_TEST_FAULTS_REDIS_DB", "10"))
# Healing on a test's time scale: a silent chunk is sent again after 10 s, a lost message after 5 s, a
# lost coordinator after 20 s. Generous beside the 1 s heartbeat, so a loaded machine never fakes a loss.
HEALING = {"SHUTTLE_HEARTBEAT_INTERVAL": "1", "SHUTTLE_STALE_AFTER": "10", "SHUTTLE_SWEEP_INTERVAL": "1",
           "SHUTTLE_LOST_AFTER": "5", "SHUTTLE_FINALIZE_STALE_AFTER": "20"}


@pytest.fixture(scope="session")
def faults(tmp_path_factory) -> Iterator[Env]:
    healing = pytest.MonkeyPatch()
    for name, value in HEALING.items():  # read by the CLI subprocesses and the workers alike
        healing.setenv(name, value)
    pid = os.getpid()
    source_db, ledger_db = f"shuttle_faults_{pid}", f"shuttle_faults_ledger_{pid}"
    source_url, ledger_url = create_db(source_db), create_db(ledger_db)
    data = build_source(source_url, rows=60_000, deployments=8)
    env = Env(source_url, ledger_url, f"{REDIS_BASE}/{FAULTS_REDIS_DB}", data,
              tmp_path_factory.mktemp("fault-workers"), f"shuttle-faults-{pid}")
    yield env
    redis.Redis.from_url(env.broker_url).delete(env.queue)
    drop_db(source_db)
    drop_db(ledger_db)
    healing.undo()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server. Without persistence, killing it loses every message, as a crash would;
    with it (an append-only file written at every command), a restart finds every message again."""

    def __init__(self, port: int, workdir, persistent: bool = False) -> None:
        self.port = port
        self.workdir = workdir
        self.persistent = persistent
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--dir", str(self.workdir),
             *(("--appendonly", "yes", "--appendfsync", "always") if self.persistent else ("--appendonly", "no"))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(params=[False, True], ids=["data-lost", "data-kept"])
def own_redis(request, tmp_path) -> Iterator[RedisServer]:
    """A broker of the test's own: once restarted empty, once restarted with every message it held."""
    server = RedisServer(free_port(), tmp_path, persistent=request.param)
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def modmon_case(faults: Env) -> ModmonCase:
    return ModmonCase(faults)


@pytest.fixture(scope="session")
def mlflow_env(faults: Env, mlflow_source) -> Env:
    """The session's MLflow database (built by MLflow's own client) with the faults' ledger and queue."""
    url, data = mlflow_source
    return replace(faults, source_url=url, data=data)


@pytest.fixture(scope="session")
def latest_case(mlflow_env: Env) -> Iterator[LatestMetricsCase]:
    case = LatestMetricsCase(mlflow_env)
    yield case
    case.cleanup()


@pytest.fixture(scope="session")
def mongo_case(mlflow_env: Env) -> Iterator[MongoCase]:
    """nx-27017 in a process of our own (so faults can stop, kill and restart it), or SHUTTLE_TEST_MONGO_URI."""
    server = None if REAL_MONGO_URI else NxServer().start()
    case = MongoCase(mlflow_env, REAL_MONGO_URI.rstrip("/") if REAL_MONGO_URI else server.uri, server)
    yield case
    case.cleanup()
    if case.server is not None:
        case.server.cleanup()


@pytest.fixture(scope="session")
def model_files_case(faults: Env, tmp_path_factory) -> Iterator[ModelFilesCase]:
    case = ModelFilesCase(faults, tmp_path_factory.mktemp("fault-models") / "models")
    yield case
    case.cleanup()


@pytest.fixture(scope="session")
def userdata_case(mongo_case: MongoCase) -> Iterator[UserdataCase]:
    """On the MongoDB server of `mongo_case` (its faults stop, kill and restart that one process)."""
    case = UserdataCase(mongo_case.env, mongo_case.mongo_uri, mongo_case.server)
    yield case
    case.cleanup()


@pytest.fixture(scope="session")
def rollback_case(mongo_case: MongoCase) -> Iterator[UserdataRollbackCase]:
    case = UserdataRollbackCase(mongo_case.env, mongo_case.mongo_uri, mongo_case.server)
    yield case
    case.cleanup()


@pytest.fixture(scope="session")
def declared_case(faults: Env, tmp_path_factory) -> Iterator[DeclaredCase]:
    case = DeclaredCase(faults, tmp_path_factory.mktemp("fault-declared"))
    yield case
    case.cleanup()


CASES = {"modmon": "modmon_case", "mlflow-latest-metrics": "latest_case", "mlflow-to-mongo": "mongo_case",
         "model-files": "model_files_case", "userdata-split": "userdata_case",
         "userdata-rollback": "rollback_case", "declared-copy": "declared_case"}


@pytest.fixture(scope="session", params=list(CASES))
def case(request) -> Case:
    """Each fault test runs once per migration; pytest groups the tests by migration."""
    return request.getfixturevalue(CASES[request.param])


@pytest.fixture(scope="session")
def baseline(case: Case) -> object:
    return case.baseline


@pytest.fixture(autouse=True)
def _fault_applies(request) -> None:
    """Skips a fault test for a case it does not apply to (`Case.not_applicable`, with the reason)."""
    if "case" in request.fixturenames and hasattr(request.node, "callspec"):
        reason = request.getfixturevalue("case").not_applicable.get(request.node.originalname)
        if reason:
            pytest.skip(reason)
