"""Fault-injection harness: its own source, ledger and queue; each test starts the workers it kills."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

from common.migrations.modmon_fixtures import build_source
from tests.conftest import REDIS_BASE, create_db, drop_db
from tests.harness import Env

FAULTS_REDIS_DB = int(os.environ.get("SHUTTLE_TEST_FAULTS_REDIS_DB", "10"))
CHUNK_ROWS = "4000"


@pytest.fixture(scope="session")
def faults(tmp_path_factory) -> Iterator[Env]:
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


@pytest.fixture(scope="session")
def baseline(faults: Env) -> tuple[str, str]:
    """Checksums of an uninterrupted run: what every faulted run must end with."""
    with faults.workers(2, "base"):
        code, report = faults.run_json("run", "modmon", "--target-schema", "base", "--chunk-rows", CHUNK_ROWS)
    assert code == 0, report["verdict_reason"]
    return faults.checksum("base")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server with no persistence: killing it loses every message, as a crash would."""

    def __init__(self, port: int, workdir) -> None:
        self.port = port
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
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


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.kill()


@contextmanager
def target_refusing_connections(admin_url: str, database: str) -> Iterator[None]:
    """New connections to `database` are refused and existing ones cut, until the block ends."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false')
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))
        try:
            yield
        finally:
            conn.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')
