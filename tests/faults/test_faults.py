"""Faults injected mid-run; after each, the target equals an uninterrupted run's and the counts are exact.

Every test here fails if the recovery it exercises is removed (see RELIABILITY.md for how each was
checked): the run would hang with a chunk stuck, end with a failed verdict, or leave a different target.
"""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest
import redis

from producer.broker import Broker
from common.ledger import Ledger
from tests.faults.conftest import CHUNK_ROWS, target_refusing_connections
from tests.harness import Env, wait_for

pytestmark = pytest.mark.faults


def assert_exact(env: Env, run_id: str, schema: str, baseline: tuple[str, str], report: dict) -> None:
    """The promises every fault test checks: same target, exact counts, nothing left running."""
    assert report["verdict"] == "clean", report["verdict_reason"]
    assert env.checksum(schema) == baseline
    assert env.chunk_states(run_id) == {"done": report["chunks"]["total"]}
    assert report["totals"]["source_rows"] == env.data.total_rows
    assert report["totals"]["rows_read"] == env.data.total_rows
    assert report["totals"]["rows_rejected"] == len(env.data.malformed_ids)
    listed = env.ledger_sql("SELECT key FROM shuttle.rejects WHERE run_id = %s", (run_id,))
    assert sorted(int(key) for (key,) in listed) == sorted(env.data.malformed_ids), "each reject listed once"
    assert env.sql(f"SELECT count(*) FROM {schema}.prediction_stats_hourly")[0][0] == \
        env.sql("SELECT count(*) FROM base.prediction_stats_hourly")[0][0]


def running_chunk(env: Env, run_id: str, min_rows: int = 1000):
    rows = env.ledger_sql("SELECT chunk_id, worker FROM shuttle.chunks WHERE run_id = %s AND state = 'running'"
                          " AND est_rows >= %s AND started_at > now() - interval '100 milliseconds'", (run_id, min_rows))
    return rows[0] if rows else None


def done_count(env: Env, run_id: str) -> int:
    return env.chunk_states(run_id).get("done", 0)


def test_pool_processes_sigkilled_mid_chunk_several_times(faults, baseline):
    with faults.workers(2, "kill"):
        run_id = faults.start("modmon", "--target-schema", "killed3", "--chunk-rows", CHUNK_ROWS)
        killed = []
        for _ in range(3):
            chunk_id, worker = wait_for(lambda: running_chunk(faults, run_id))
            os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
            killed.append(chunk_id)
            time.sleep(0.3)
        code, report = faults.run_json("watch", run_id)
    attempts = dict(faults.ledger_sql("SELECT chunk_id, attempts FROM shuttle.chunks WHERE run_id = %s", (run_id,)))
    assert all(attempts[c] >= 2 for c in killed), "every killed chunk was delivered again"
    assert_exact(faults, run_id, "killed3", baseline, report)


def test_whole_worker_killed_leaves_a_stale_chunk_that_resume_requeues(faults, baseline):
    victim = faults.workers(1, "victim")
    victim.__enter__()
    run_id = faults.start("modmon", "--target-schema", "stale", "--chunk-rows", CHUNK_ROWS)
    chunk_id, _ = wait_for(lambda: running_chunk(faults, run_id))
    for process in victim.processes:
        os.killpg(process.pid, signal.SIGKILL)  # main process and its pool child: nobody requeues the message
    victim.processes.clear()
    with faults.workers(1, "rescuer"):
        wait_for(lambda: faults.chunk_states(run_id) == {"done": faults.chunk_states(run_id).get("done", 0),
                                                         "running": 1}, timeout=120, interval=0.3)
        assert faults.ledger_sql("SELECT state FROM shuttle.chunks WHERE chunk_id = %s", (chunk_id,))[0][0] == "running"
        code, report = faults.run_json("resume", run_id)
    assert code == 0
    assert_exact(faults, run_id, "stale", baseline, report)


def test_broker_restarted_with_all_its_data_lost(faults, baseline, own_redis):
    broker = {"SHUTTLE_BROKER_URL": own_redis.url}
    with faults.workers(2, "brk", broker_url=own_redis.url):
        run_id = faults.start("modmon", "--target-schema", "broker_lost", "--chunk-rows", "2000", **broker)
        wait_for(lambda: done_count(faults, run_id) >= 2)
        own_redis.kill()
        own_redis.start()  # same port, empty: every queued message is gone
        assert redis.Redis.from_url(own_redis.url).llen(faults.queue) == 0
        time.sleep(3)  # in-flight chunks finish against the ledger; nothing else is left to run
        assert faults.chunk_states(run_id).get("queued", 0) > 0, "messages were lost with the broker"
        code, report = faults.run_json("resume", run_id, **broker)
    assert code == 0
    assert_exact(faults, run_id, "broker_lost", baseline, report)


def test_worker_database_connections_terminated_mid_chunk(faults, baseline):
    with faults.workers(2, "term"):
        run_id = faults.start("modmon", "--target-schema", "terminated", "--chunk-rows", CHUNK_ROWS)
        terminated = 0
        with psycopg.connect(faults.source_url, autocommit=True) as admin:
            for _ in range(4):
                wait_for(lambda: running_chunk(faults, run_id))
                terminated += admin.execute(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name IN ('shuttle-source', 'shuttle-target')"
                    " AND datname = current_database()) t").fetchone()[0]
                time.sleep(0.2)
        code, report = faults.run_json("watch", run_id, timeout=240)
    assert terminated > 0
    retried = faults.ledger_sql("SELECT count(*) FROM shuttle.chunks WHERE run_id = %s AND attempts > 1", (run_id,))
    assert retried[0][0] > 0, "the chunks cut off were retried"
    assert_exact(faults, run_id, "terminated", baseline, report)


def test_target_refusing_connections_for_a_while(faults, baseline):
    database = faults.source_url.rsplit("/", 1)[1]
    admin_url = faults.source_url.rsplit("/", 1)[0] + "/postgres"
    with faults.workers(2, "refuse"):
        run_id = faults.start("modmon", "--target-schema", "refused", "--chunk-rows", "2000")
        wait_for(lambda: done_count(faults, run_id) >= 2)
        with target_refusing_connections(admin_url, database):
            time.sleep(4)
            assert faults.chunk_states(run_id).get("failed", 0) == 0, "refusals are retried, not failures"
        code, report = faults.run_json("watch", run_id, timeout=240)
    retried = faults.ledger_sql("SELECT count(*) FROM shuttle.chunks WHERE run_id = %s AND attempts > 1", (run_id,))
    assert retried[0][0] > 0
    assert_exact(faults, run_id, "refused", baseline, report)


def test_same_chunk_delivered_twice_concurrently(faults, baseline):
    run_id = faults.start("modmon", "--target-schema", "twice", "--chunk-rows", "12000")  # no worker yet
    redis.Redis.from_url(faults.broker_url).delete(faults.queue)
    ledger = Ledger(faults.ledger_url)
    chunks = ledger.chunks_of(run_id)
    ledger.dispose()
    with faults.workers(2, "twice"):
        # Both workers are idle when each chunk arrives twice in a row, so both copies start together.
        Broker(faults.settings()).enqueue_chunks(run_id, [c for chunk in chunks for c in (chunk, chunk)])
        code, report = faults.run_json("watch", run_id)
    attempts = [n for (n,) in faults.ledger_sql("SELECT attempts FROM shuttle.chunks WHERE run_id = %s", (run_id,))]
    assert sum(n >= 2 for n in attempts) >= len(attempts) // 2, f"copies did not overlap: {attempts}"
    assert_exact(faults, run_id, "twice", baseline, report)


def test_cancel_then_resume_twice_in_one_run(faults, baseline):
    with faults.workers(2, "cancel"):
        # Small chunks keep the run going long enough to be cancelled twice while it runs.
        run_id = faults.start("modmon", "--target-schema", "cancel2", "--chunk-rows", "300")
        for round_ in range(2):
            wait_for(lambda: done_count(faults, run_id) >= 3 * (round_ + 1))
            assert faults.shuttle("cancel", run_id).returncode == 0
            wait_for(lambda: faults.chunk_states(run_id).get("running", 0) == 0 and
                     faults.chunk_states(run_id).get("queued", 0) == 0, timeout=60, interval=0.1)
            code, report = faults.run_json("report", run_id, "--refresh")
            assert code == 1 and report["verdict"] == "cancelled" and report["chunks"]["cancelled"] > 0
            if round_ == 0:
                assert faults.shuttle("resume", run_id).returncode == 0
        code, report = faults.run_json("resume", run_id)
    assert code == 0
    assert_exact(faults, run_id, "cancel2", baseline, report)
