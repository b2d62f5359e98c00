"""Flower tells the truth: a real Flower process (the shipped config, basic auth on) watching real workers.

One run of three deployments, every URL carrying a password: one deployment's writes fail for good
(a trigger raising a non-transient error), one's fail twice with a serialization failure and are
retried, and at the start every write waits on a lock so chunks are seen running.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
import redis

from celery.result import AsyncResult

from common.broker import Broker, chunk_label
from common.ledger import Ledger
from producer import commands
from producer.local_workers import LocalWorkers, start_flower
from tests.harness import wait_for

pytestmark = pytest.mark.e2e

SECRET = "Fl0werS3cretPw"
FLOWER_USER = "shuttle"


def with_password(url: str) -> str:
    if url.startswith("redis://"):
        return url.replace("redis://", f"redis://:{SECRET}@", 1)
    return url.replace("postgres@", f"postgres:{SECRET}@", 1)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FlowerApi:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        token = base64.b64encode(f"{FLOWER_USER}:{SECRET}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}"}

    def get(self, path: str, auth: bool = True) -> tuple[int, str]:
        request = urllib.request.Request(self.base + path, headers=self.headers if auth else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except OSError:
            return 0, ""

    def task(self, task_id: str) -> dict:
        code, body = self.get(f"/api/task/info/{task_id}")
        return json.loads(body) if code == 200 else {}



@pytest.fixture(scope="module")
def observed(e2e, tmp_path_factory):
    """Its own queue, two workers and Flower, every service URL with a password."""
    log_dir = tmp_path_factory.mktemp("observe")
    env = replace(e2e, queue=f"shuttle-observe-{os.getpid()}", log_dir=log_dir,
                  source_url=with_password(e2e.source_url), ledger_url=with_password(e2e.ledger_url),
                  broker_url=with_password(e2e.broker_url))
    port = free_port()
    api = FlowerApi(port)
    flower = Flower(env, port, log_dir)
    try:
        flower.start()
        with LocalWorkers(env.settings(), 2, name="obs", log_dir=log_dir):
            wait_for(lambda: len(json.loads(api.get("/api/workers?refresh=1")[1] or "{}")) >= 2, timeout=60,
                     interval=0.5)
            yield env, api, flower
    finally:
        flower.stop()
        redis.Redis.from_url(e2e.broker_url).delete(env.queue)


class Flower:
    """The shipped Flower (ops/flower), with basic auth and its history in the test's directory."""

    def __init__(self, env, port: int, log_dir: Path) -> None:
        self.env, self.port, self.log_dir = env, port, log_dir
        self.process = None

    def start(self) -> None:
        self.process = start_flower(self.env.settings(), port=self.port, log=self.log_dir / "flower.log",
                                    extra_env={"FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{SECRET}",
                                               "FLOWER_DB": str(self.log_dir / "flower.db")})
        assert self.process is not None, f"port {self.port} taken"
        wait_for(lambda: FlowerApi(self.port).get("/healthcheck", auth=False)[0] == 200, timeout=60, interval=0.3)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            self.process.wait(timeout=30)


def poison(env, schema: str, failing: str, retrying: str) -> None:
    """Create the target tables, then make `failing`'s writes fail for good and `retrying`'s fail twice."""
    settings = env.settings()
    options = {"target_schema": schema}
    from common.migrations import migration_class

    with commands.open_migration(settings, "modmon", migration_class("modmon").plan_options(**options)) as m:
        m.prepare_target()
    with psycopg.connect(e2e_plain(env.source_url), autocommit=True) as conn:
        conn.execute(f"CREATE SEQUENCE {schema}.retry_once")
        conn.execute(f"""
            CREATE FUNCTION {schema}.poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF NEW.deployment_id = '{failing}' THEN
                RAISE EXCEPTION 'poisoned deployment %', NEW.deployment_id USING ERRCODE = 'P0001';
              END IF;
              IF NEW.deployment_id = '{retrying}' AND nextval('{schema}.retry_once') <= 2 THEN
                RAISE EXCEPTION 'try again' USING ERRCODE = '40001';
              END IF;
              RETURN NEW;
            END $$""")
        conn.execute(f"CREATE TRIGGER poison BEFORE INSERT ON {schema}.prediction_stats_hourly "
                     f"FOR EACH ROW EXECUTE FUNCTION {schema}.poison()")


def e2e_plain(url: str) -> str:
    return url.replace(f":{SECRET}@", "@")


def test_flower_shows_failure_progress_and_labels_and_no_password(observed):
    env, api, flower = observed
    failing, retrying, fine = env.data.deployments[0], env.data.deployments[1], env.data.deployments[2]
    schema = "flowered"
    poison(env, schema, failing, retrying)
    held = psycopg.connect(e2e_plain(env.source_url))
    held.execute(f"LOCK TABLE {schema}.prediction_stats_hourly IN SHARE MODE")
    try:
        run_id = env.start("modmon", "--target-schema", schema, "--chunk-rows", "4000",
                           "--deployment-ids", failing, retrying, fine)
        ledger = Ledger(e2e_plain(env.ledger_url))
        chunks = {c.chunk_id: c for c in ledger.chunks_of(run_id)}
        backend = Broker(env.settings())

        def running_with_rows():
            # Flower's task API (from the workers' events) and the result backend's task meta agree.
            for chunk_id in chunks:
                info = api.task(chunk_id)
                meta = AsyncResult(chunk_id, app=backend.app)
                if info.get("state") == "PROGRESS" and "'rows': " in (info.get("result") or "") \
                        and meta.state == "PROGRESS" and (meta.info or {}).get("rows", 0) > 0:
                    return chunk_id, info, meta.info
            return None

        try:
            chunk_id, info, meta = wait_for(running_with_rows, timeout=90, interval=0.5)
        except AssertionError:
            seen = {c: (api.task(c), AsyncResult(c, app=backend.app).state) for c in chunks}
            raise AssertionError(f"no chunk seen running with its rows: {seen}") from None
        assert meta["est_rows"] == chunks[chunk_id].spec.est_rows
        assert info["result"] == repr(meta)
        assert info["args"] == chunk_label(chunks[chunk_id])
    finally:
        held.rollback()
        held.close()

    # The chunk retrying a serialization failure is seen as retrying, with its attempt and its error.
    retrying_now = wait_for(lambda: [r for r in ledger.progress(run_id).retrying if r.error], timeout=60,
                            interval=0.05)
    assert retrying_now[0].attempt >= 2 and "try again" in retrying_now[0].error
    assert chunks[retrying_now[0].chunk_id].spec.partition == retrying

    done = env.shuttle("watch", run_id, "--json", timeout=300)
    report = json.loads(done.stdout)
    assert done.returncode == 1 and report["verdict"] == "failed", report["verdict_reason"]
    assert list(report)[:3] == ["run_id", "status", "verdict"]
    assert report["failed_chunks"] and all("poisoned deployment" in c["error"] for c in report["failed_chunks"])
    assert {c["partition"] for c in report["failed_chunks"]} == {failing}

    failed = [c for c in ledger.chunks_of(run_id) if c.spec.partition == failing]
    assert failed and all(c.state == "failed" for c in failed)
    for chunk in failed:
        info = wait_for(lambda: (t := api.task(chunk.chunk_id)).get("state") == "FAILURE" and t, timeout=30,
                        interval=0.5)
        assert "poisoned deployment" in (info.get("exception") or "")
        assert (info.get("result") or "").startswith("failed: ") and "poisoned deployment" in info["result"]
        assert info["args"] == chunk_label(chunk)
    failures = json.loads(api.get("/api/tasks?state=FAILURE&limit=1000")[1])
    assert {c.chunk_id for c in failed} <= set(failures)

    retried = [c for c in ledger.chunks_of(run_id) if c.spec.partition == retrying and c.attempts > 1]
    assert retried, "a chunk of the retrying deployment was tried more than once"
    assert all(c.state == "done" for c in ledger.chunks_of(run_id) if c.spec.partition == retrying)
    for chunk in retried:
        info = wait_for(lambda: (t := api.task(chunk.chunk_id)).get("state") == "SUCCESS" and t, timeout=30,
                        interval=0.5)
        assert info["args"] == chunk_label(chunk), "a retried chunk keeps its readable label"
        assert (info.get("retries") or 0) >= 1

    finalize = wait_for(lambda: (t := api.task(f"{run_id}:finalize")).get("state") == "SUCCESS" and t,
                        timeout=60, interval=0.5)
    assert "'verdict': 'failed'" in finalize["result"]

    # The ledger names workers as Flower does: name@host, and the pool process after it.
    workers = {c.worker for c in ledger.chunks_of(run_id) if c.worker}
    flower_workers = set(json.loads(api.get("/api/workers")[1]))
    assert workers and all(w.rpartition(":")[0] in flower_workers for w in workers), (workers, flower_workers)
    ledger.dispose()
    backend.close()

    # No password in Flower's pages, API or metrics, the CLI's output, nor any log.
    assert api.get("/metrics", auth=False)[0] == 401, "/metrics is behind the same basic auth"
    code, metrics = api.get("/metrics")
    assert code == 200 and 'type="task-failed"' in metrics, "Flower's metrics count the failed chunks"
    pages = [api.get(p)[1] for p in ("/tasks/datatable?draw=1&start=0&length=1000&search%5Bvalue%5D=",
                                     "/api/tasks?limit=1000", "/api/workers", f"/task/{chunk_id}", "/workers")]
    for text in [*pages, metrics, done.stdout, done.stderr]:
        assert SECRET not in text
    for log in Path(env.log_dir).glob("*.log"):
        assert SECRET not in log.read_text(errors="replace"), log.name

    # Flower's history survives a restart (persistent state in FLOWER_DB).
    flower.stop()
    flower.start()
    for chunk in failed:
        assert api.task(chunk.chunk_id).get("state") == "FAILURE"

