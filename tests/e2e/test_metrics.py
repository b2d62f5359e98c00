"""`shuttle metrics`: scraped during a real run (real workers), its counts move, and equal the report at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import PROJECT_ROOT, SHUTTLE, wait_for

pytestmark = pytest.mark.e2e
SECRET = "MetricsS3cretPw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return None
    assert SECRET not in text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def exporter(e2e, tmp_path):
    port = free_port()
    ledger_url = e2e.ledger_url.replace("postgres@", f"postgres:{SECRET}@")
    log = open(tmp_path / "metrics.log", "w")
    process = subprocess.Popen([*SHUTTLE, "metrics", "--port", str(port)], cwd=PROJECT_ROOT, stdout=log,
                               stderr=subprocess.STDOUT, env=e2e.environ(SHUTTLE_LEDGER_URL=ledger_url),
                               start_new_session=True)
    try:
        wait_for(lambda: scrape(port) is not None, timeout=60, interval=0.2)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=30)
        log.close()
        assert SECRET not in (tmp_path / "metrics.log").read_text()


def test_metrics_move_during_a_run_and_equal_the_report(e2e, exporter):
    run_id = e2e.start("modmon", "--target-schema", "metered", "--chunk-rows", "3000")
    labels = {"run": run_id, "migration": "modmon"}
    seen_done: list[float] = []

    def ended():
        samples = scrape(exporter) or {}
        done = value(samples, "shuttle_run_rows_done", **labels)
        if done is not None and (not seen_done or seen_done[-1] != done):
            seen_done.append(done)
        return value(samples, "shuttle_run_status", status="completed", **labels) and samples

    samples = wait_for(ended, timeout=240, interval=0.1)
    assert len(seen_done) >= 3, f"rows done moved through {seen_done}"
    assert seen_done == sorted(seen_done)

    code, report = e2e.run_json("report", run_id)
    assert code == 0, report["verdict_reason"]
    totals = report["totals"]
    assert value(samples, "shuttle_rows_read_total", **labels) == totals["rows_read"]
    assert value(samples, "shuttle_rows_written_total", **labels) == totals["rows_written"]
    assert value(samples, "shuttle_rows_unchanged_total", **labels) == totals["rows_unchanged"]
    assert value(samples, "shuttle_rows_deleted_total", **labels) == totals["rows_deleted"]
    assert value(samples, "shuttle_rows_rejected_total", **labels) == totals["rows_rejected"] > 0
    assert value(samples, "shuttle_run_rows_done", **labels) == totals["rows_read"]
    assert value(samples, "shuttle_run_rows_estimated", **labels) == report["totals"]["source_rows"]
    assert value(samples, "shuttle_chunks", state="done", **labels) == report["chunks"]["done"]
    assert value(samples, "shuttle_chunks", state="failed", **labels) == 0
    per_worker = {dict(k[1])["worker"]: v for k, v in samples.items()
                  if k[0] == "shuttle_worker_rows_read_total" and dict(k[1]).get("run") == run_id}
    assert sum(per_worker.values()) == totals["rows_read"]
    assert all("@" in worker and ":" not in worker for worker in per_worker)
    assert value(samples, "shuttle_chunk_duration_seconds_count", migration="modmon") >= report["chunks"]["done"]
