"""Local worker (and Flower) processes for `shuttle demo` and the tests: started, awaited, stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.errors import ServiceUnavailable
from common.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def worker_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a worker needs: the same SHUTTLE_* settings as this process (secrets stay in env)."""
    env = dict(os.environ)
    env.update({
        "SHUTTLE_BROKER_URL": settings.broker_url,
        "SHUTTLE_RESULT_BACKEND": settings.effective_result_backend,
        "SHUTTLE_LEDGER_URL": settings.ledger_url,
        "SHUTTLE_QUEUE": settings.queue,
        "SHUTTLE_VISIBILITY_TIMEOUT": str(settings.visibility_timeout),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")])),
    })
    for key, value in (("SHUTTLE_SOURCE_URL", settings.source_url), ("SHUTTLE_TARGET_URL", settings.target_url)):
        if value:
            env[key] = value
    env.update(extra or {})
    return env


class LocalWorkers:
    """`count` Celery worker processes, each with one pool process, on this machine."""

    def __init__(self, settings: Settings, count: int, name: str = "local", concurrency: int = 1,
                 log_dir: Path | None = None, extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.count = count
        self.name = name
        self.concurrency = concurrency
        self.log_dir = log_dir
        self.extra_env = extra_env
        self.processes: list[subprocess.Popen] = []
        self.hostnames: list[str] = []

    def start_one(self, index: int) -> subprocess.Popen:
        hostname = f"{self.name}{index}-{os.getpid()}@{socket.gethostname()}"
        log = open(self.log_dir / f"worker{index}.log", "ab") if self.log_dir else subprocess.DEVNULL
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel=INFO", "--events",
             "--queues", self.settings.queue, "--concurrency", str(self.concurrency), "--hostname", hostname,
             "--without-gossip", "--without-mingle"],
            cwd=PROJECT_ROOT, env=worker_env(self.settings, self.extra_env), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.processes.append(process)
        self.hostnames.append(hostname)
        return process

    def __enter__(self) -> LocalWorkers:
        for index in range(self.count):
            self.start_one(index)
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every started worker answers a ping."""
        from common.broker import Broker

        broker = Broker(self.settings)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = [p for p in self.processes if p.poll() is None]
            if len(alive) < len(self.processes):
                raise ServiceUnavailable("a local worker exited at start; run with --debug or see its log")
            online = set(broker.workers_online(timeout=1.0))
            if online.issuperset(self.hostnames):
                return
            time.sleep(0.3)
        raise ServiceUnavailable(f"local workers did not come online within {timeout:.0f}s")

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM lets running chunks finish), then kill what is left."""
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()
        self.hostnames.clear()

    def __exit__(self, *exc: object) -> None:
        self.stop()


FLOWER_CONFIG = PROJECT_ROOT / "ops" / "flower" / "flowerconfig.py"


def start_flower(settings: Settings, port: int = 5555, log: Path | None = None,
                 extra_env: dict[str, str] | None = None) -> subprocess.Popen | None:
    """Flower on localhost with the shipped config (ops/flower), if the port is free; basic auth from
    FLOWER_BASIC_AUTH. It gets the broker only, never the ledger or database URLs."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return None
    args = [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--conf={FLOWER_CONFIG}", f"--port={port}",
            "--address=127.0.0.1"]
    env = {key: value for key, value in worker_env(settings, extra_env).items()
           if key not in ("SHUTTLE_LEDGER_URL", "SHUTTLE_SOURCE_URL", "SHUTTLE_TARGET_URL")}
    env.setdefault("FLOWER_DB", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"shuttle-flower-{port}.db"))
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(args, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
