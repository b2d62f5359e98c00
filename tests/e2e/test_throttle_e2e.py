"""Throttle and pause with real workers: the CLI as users type it, two Celery worker processes sharing one
row rate, measured from the ledger's timeline of chunks.

The workers of this module run with a short heartbeat, stale and lost bound (1 s, 4 s, 2 s), so a throttle
that stopped a chunk's heartbeat, or a sweeper that took a paused run's dropped messages for lost, would
show in the ledger's events within the test.
"""

from __future__ import annotations

import dataclasses
import json
import time

import psycopg
import pytest
import redis

from common.broker import Broker
from producer.local_workers import LocalWorkers
from tests.harness import Env, wait_for

pytestmark = pytest.mark.e2e

FAST_HEALING = {"SHUTTLE_HEARTBEAT_INTERVAL": "1", "SHUTTLE_STALE_AFTER": "4", "SHUTTLE_LOST_AFTER": "2",
                "SHUTTLE_SWEEP_INTERVAL": "1"}


@pytest.fixture(scope="module")
def env(e2e: Env) -> Env:
    """The session's source and ledger, a queue of this module's own, and two workers that heal fast."""
    own = dataclasses.replace(e2e, queue=f"{e2e.queue}-throttle")
    own.environ = lambda **extra: Env.environ(own, **{**FAST_HEALING, **extra})  # the CLI sweeps alike
    with LocalWorkers(own.settings(), 2, name="thr", log_dir=own.log_dir, extra_env=FAST_HEALING):
        yield own
    redis.Redis.from_url(own.broker_url).delete(own.queue)


def deployment(env: Env, index: int) -> tuple[str, int]:
    """A deployment of the session's source by size rank, and its row count."""
    ranked = sorted(env.data.rows_per_deployment.items(), key=lambda item: -item[1])
    return ranked[index]


def timeline(env: Env, run_id: str) -> tuple[int, float]:
    """Rows of the run's done chunks and the seconds from its first chunk's start to its last one's end."""
    rows, seconds = env.ledger_sql(
        "SELECT coalesce(sum(rows_read), 0), coalesce(extract(epoch FROM max(finished_at) - min(started_at)), 0)"
        " FROM shuttle.chunks WHERE run_id = %s AND state = 'done'", (run_id,))[0]
    return int(rows), float(seconds)


def events(env: Env, run_id: str, kind: str) -> int:
    return env.ledger_sql("SELECT count(*) FROM shuttle.events WHERE run_id = %s AND kind = %s", (run_id, kind))[0][0]


def finished(env: Env, run_id: str) -> bool:
    states = env.chunk_states(run_id)
    return bool(states) and set(states) == {"done"}


def test_two_workers_hold_the_runs_row_rate_within_20_percent(env):
    dep, rows = deployment(env, 2)  # ~12,700 rows: about 25 s at 500 rows/s
    limit = 500
    code, report = env.run_json("run", "modmon", "--deployment-ids", dep, "--target-schema", "thr_rate",
                                "--chunk-rows", "1000", "--max-rows-per-second", str(limit))
    assert code == 0 and report["verdict"] == "clean"
    done, seconds = timeline(env, report["run_id"])
    assert done == rows
    workers = env.ledger_sql("SELECT count(DISTINCT worker) FROM shuttle.chunks WHERE run_id = %s",
                             (report["run_id"],))[0][0]
    assert workers == 2, "both workers took chunks: the limit is shared, not per process"
    assert seconds >= 20, f"the run took {seconds:.1f}s; at most {limit} rows/s it cannot take less than 20 s"
    rate = done / seconds
    print(f"throttle: {done} rows in {seconds:.1f}s = {rate:.0f} rows/s against a limit of {limit}")
    assert 0.8 * limit <= rate <= 1.2 * limit, f"{rate:.0f} rows/s against a limit of {limit}"


def test_shuttle_throttle_changes_a_live_runs_rate(env):
    dep, rows = deployment(env, 3)  # ~9,300 rows: about 46 s at 200 rows/s
    run_id = env.start("modmon", "--deployment-ids", dep, "--target-schema", "thr_live", "--chunk-rows", "1000",
                       "--max-rows-per-second", "200")
    assert "throttled to 200 rows/s" in env.shuttle("status", run_id).stdout
    wait_for(lambda: timeline(env, run_id)[0] >= 1500, timeout=60, interval=0.2)
    done, seconds = timeline(env, run_id)
    # An upper bound only: the rows running chunks have taken tokens for are not in `done` yet.
    assert done / seconds <= 1.2 * 200, f"{done / seconds:.0f} rows/s before the change"

    at, left = time.monotonic(), rows - timeline(env, run_id)[0]
    changed = env.shuttle("throttle", run_id, "2000")
    assert changed.returncode == 0 and "throttled to 2,000 rows/s" in changed.stdout, changed.stderr
    wait_for(lambda: finished(env, run_id), timeout=30, interval=0.2)
    took = time.monotonic() - at
    print(f"throttle change: {done / seconds:.0f} rows/s at 200; then {left} rows in {took:.1f}s at 2,000")
    assert took < left / 200 / 2, f"{left} rows took {took:.1f}s after the change; at 200 rows/s they need " \
                                  f"{left / 200:.0f}s"
    assert events(env, run_id, "stale") == 0, "a throttled chunk keeps its heartbeat: never taken for stale"


def test_pause_holds_through_a_broker_loss_and_continue_finishes_exact(env):
    dep, rows = deployment(env, 4)  # ~7,300 rows: about 7 s at 1,000 rows/s
    code, reference = env.run_json("run", "modmon", "--deployment-ids", dep, "--target-schema", "thr_ref")
    assert code == 0 and reference["verdict"] == "clean"
    run_id = env.start("modmon", "--deployment-ids", dep, "--target-schema", "thr_pause", "--chunk-rows", "500",
                       "--max-rows-per-second", "1000")
    wait_for(lambda: timeline(env, run_id)[0] >= 1500, timeout=60, interval=0.1)

    paused = env.shuttle("pause", run_id)
    assert paused.returncode == 0 and "paused" in paused.stdout, paused.stderr
    wait_for(lambda: env.chunk_states(run_id).get("running", 0) == 0, timeout=30, interval=0.1)
    redis.Redis.from_url(env.broker_url).delete(env.queue)  # the broker loses every waiting message
    target = "SELECT count(*), coalesce(sum(prediction_count), 0) FROM thr_pause.prediction_stats_hourly"
    before_target, before_ledger, lost_before = env.sql(target), timeline(env, run_id)[0], events(env, run_id, "lost")
    time.sleep(5)  # the hold itself: 5 s in which nothing may move
    assert env.sql(target) == before_target, "no new target rows while paused"
    assert timeline(env, run_id)[0] == before_ledger and env.chunk_states(run_id).get("running", 0) == 0
    assert env.chunk_states(run_id).get("queued", 0) > 0, "the rest waits in the ledger"
    assert events(env, run_id, "lost") == lost_before, "the sweeper does not take a paused run for stuck"
    online = Broker(env.settings()).workers_online(timeout=2.0)
    assert len([w for w in online if w.startswith("thr")]) == 2, "the workers were up all along"
    status = env.shuttle("status", run_id)
    assert "paused" in status.stdout and f"shuttle continue {run_id}" in status.stdout
    listed = [line for line in env.shuttle("status").stdout.splitlines() if run_id in line]
    assert listed and "paused" in listed[0], "the list of runs says so too"

    assert env.shuttle("throttle", run_id, "off").returncode == 0
    at = time.monotonic()
    result = env.shuttle("continue", run_id, "--wait", "--json")
    print(f"pause: continue --wait took {time.monotonic() - at:.1f}s")
    assert result.returncode == 0, result.stderr
    assert "continued" in result.stderr
    report = json.loads(result.stdout)
    assert report["verdict"] == "clean" and report["totals"]["rows_read"] == rows
    assert env.checksum("thr_pause") == env.checksum("thr_ref"), "the exact result of an uninterrupted run"


def test_chunks_wait_while_the_source_is_over_its_load_bound(env):
    dep, rows = deployment(env, 5)  # ~5,900 rows

    def gauge(*statements: str) -> None:
        with psycopg.connect(env.source_url, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)

    gauge("DROP TABLE IF EXISTS thr_load", "CREATE TABLE thr_load AS SELECT 100 AS value")  # the test's own
    try:
        run_id = env.start("modmon", "--deployment-ids", dep, "--target-schema", "thr_load", "--chunk-rows", "2000",
                           "--max-source-load", "SELECT value FROM thr_load:10")
        wait_for(lambda: env.chunk_states(run_id).get("running", 0) == 2, timeout=30, interval=0.1)
        time.sleep(3)  # over the bound: the claimed chunks hold, and no other starts
        assert timeline(env, run_id)[0] == 0 and env.chunk_states(run_id).get("running") == 2
        assert "held while the source load is over 10" in env.shuttle("status", run_id).stdout
        gauge("UPDATE thr_load SET value = 0")
        wait_for(lambda: finished(env, run_id), timeout=60, interval=0.2)
        assert timeline(env, run_id)[0] == rows
        assert events(env, run_id, "stale") == 0, "a held chunk keeps its heartbeat"
    finally:
        gauge("DROP TABLE IF EXISTS thr_load")
