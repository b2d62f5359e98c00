"""Faults in processes and services, each against every migration: workers killed, a broker restarted,
database connections cut, a target refusing connections, a MongoDB server killed. After each, the target
equals an uninterrupted run's and the counts are exact, with no `resume` typed by anyone.

Every test here fails if the recovery it exercises is removed (see RELIABILITY.md for how each was
checked): the run would hang with a chunk stuck, end with a failed verdict, or leave a different target.
Each run starts with the target's writes held (`Case.started_held`), so the fault always lands on chunks
that are still running, however fast the migration's chunks are.
"""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest
import redis

from tests.faults.cases import MongoCase
from tests.faults.checks import (assert_exact, blocked_chunk, done_count, healed, log_sizes, logged_since, pid_of,
                                 retried)
from tests.harness import wait_for
from tests.mongo_server import REAL_MONGO_URI

pytestmark = pytest.mark.faults
OUTAGE_S = 3  # how long the target refuses connections, on top of the first retries it causes
BROKER_DOWN_S = 2  # how long the broker is away when it restarts


def test_pool_processes_sigkilled_mid_chunk_several_times(case, baseline):
    with case.workers(2, "kill"):
        killed: list[tuple[str, str]] = []
        # One hold for the three kills, so the run cannot end between them however fast its chunks are:
        # each kill takes a process that is inside a chunk; Celery starts a new pool process, which takes
        # the next message and is held in its turn.
        with case.started_held("killed3") as run_id:
            for _ in range(3):
                chunk_id, worker = blocked_chunk(case, run_id, tuple(w for _, w in killed))
                os.kill(pid_of(worker), signal.SIGKILL)
                killed.append((chunk_id, worker))
        code, report = case.env.run_json("watch", run_id)
    attempts = dict(case.env.ledger_sql("SELECT chunk_id, attempts FROM shuttle.chunks WHERE run_id = %s", (run_id,)))
    assert all(attempts[c] >= 2 for c, _ in killed), "every killed chunk was delivered again"
    assert_exact(case, run_id, "killed3", baseline, report)


def test_whole_worker_killed_heals_without_resume(case, baseline):
    """Main process and pool killed: nobody requeues its messages (the running chunk's, and any it had
    prefetched). The other worker's sweeper finds the chunk's heartbeat stale and the lost message missing."""
    victim = case.workers(1, "victim")
    victim.__enter__()
    with case.started_held("stale") as run_id:
        chunk_id, _ = blocked_chunk(case, run_id)
        for process in victim.processes:
            os.killpg(process.pid, signal.SIGKILL)  # main process and its pool child: nobody requeues the message
        victim.processes.clear()
    with case.workers(1, "rescuer"):
        report = healed(case, run_id)
    stale = case.env.ledger_sql("SELECT count(*) FROM shuttle.events WHERE chunk_id = %s AND kind = 'stale'",
                                (chunk_id,))[0][0]
    assert stale == 1, "the killed worker's chunk was found stale and sent again, once"
    assert_exact(case, run_id, "stale", baseline, report)


def test_broker_restarted_heals_without_resume(case, baseline, own_redis):
    """Redis killed mid-run and started again on the same port, empty or with its data: the chunks in
    flight finish against the ledger, and the sweeper sends again whatever the broker no longer holds."""
    broker = {"SHUTTLE_BROKER_URL": own_redis.url}
    target = "broker_kept" if own_redis.persistent else "broker_lost"
    with case.workers(2, "brk", broker_url=own_redis.url):
        with case.started_held(target, **broker) as run_id:
            blocked_chunk(case, run_id)
            own_redis.kill()
            time.sleep(BROKER_DOWN_S)  # the outage itself
            own_redis.start()
            if not own_redis.persistent:
                assert redis.Redis.from_url(own_redis.url).llen(case.env.queue) == 0, "every message was lost"
        report = healed(case, run_id)
    assert_exact(case, run_id, target, baseline, report)


def test_worker_database_connections_terminated_mid_chunk(case, baseline):
    with case.workers(2, "term"):
        with case.started_held("terminated") as run_id:
            blocked_chunk(case, run_id)  # every worker is inside a chunk, its connections open
            with psycopg.connect(case.env.source_url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as admin:
                terminated = admin.execute(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name IN ('shuttle-source', 'shuttle-target')"
                    " AND datname = ANY(%s)) t", (list(case.pg_databases),)).fetchone()[0]
        code, report = case.env.run_json("watch", run_id, timeout=240)
    assert terminated > 0
    assert retried(case, run_id) > 0, "the chunks cut off were retried"
    assert_exact(case, run_id, "terminated", baseline, report)


def test_target_refusing_connections_for_a_while(case, baseline):
    if isinstance(case, MongoCase) and case.server is None:
        pytest.skip("stops the nx-27017 process this session started; a real server is not ours to stop")
    with case.workers(2, "refuse"):
        mark = log_sizes(case)
        with case.started_held("refused") as run_id:
            blocked_chunk(case, run_id)
            with case.refusing_connections():
                # A MongoDB client waits for the server up to its 10 s server-selection timeout before it
                # fails, so this waits for the workers' first transient error (not a fixed time) ...
                wait_for(lambda: "transient error, retrying" in logged_since(case, mark), timeout=60, interval=0.2)
                time.sleep(OUTAGE_S)  # ... then keeps refusing while the retries back off
                assert case.env.chunk_states(run_id).get("failed", 0) == 0, "refusals are retried, not failures"
        code, report = case.env.run_json("watch", run_id, timeout=240)
    assert retried(case, run_id) > 0
    assert_exact(case, run_id, "refused", baseline, report)


@pytest.mark.skipif(bool(REAL_MONGO_URI),
                    reason="kills the nx-27017 process this session started; a real server is not ours to kill")


def test_mongodb_server_killed_and_restarted_mid_run(mongo_case):
    case, baseline = mongo_case, mongo_case.baseline
    with case.workers(2, "mkill"):
        run_id = case.start("mongo_killed")
        wait_for(lambda: done_count(case, run_id) >= 3)
        with case.hold_writes("mongo_killed"):
            blocked_chunk(case, run_id)
            case.server.stop()  # SIGKILL, with requests in flight
            case.server.start()  # same port, same data directory
        report = healed(case, run_id)
    assert_exact(case, run_id, "mongo_killed", baseline, report)
