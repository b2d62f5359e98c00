"""Faults injected mid-run, each against every migration; after each, the target equals an uninterrupted
run's and the counts are exact.

Every test here fails if the recovery it exercises is removed (see RELIABILITY.md for how each was
checked): the run would hang with a chunk stuck, end with a failed verdict, or leave a different target.
Each fault is injected while the target's writes are held (`Case.hold_writes`), so it always lands on
chunks that are still running, however fast the migration's chunks are.
"""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest
import redis

from common.ledger import Ledger
from producer.broker import Broker
from tests.faults.cases import Case, MongoCase
from tests.harness import wait_for
from tests.mongo_server import REAL_MONGO_URI

pytestmark = pytest.mark.faults
OUTAGE_S = 3  # how long the target refuses connections, on top of the first retries it causes


def assert_exact(case: Case, run_id: str, name: str, baseline: object, report: dict) -> None:
    """The promises every fault test checks: same target, exact counts, no duplicates, nothing left running."""
    env, expected = case.env, case.expected()
    assert report["verdict"] == "clean", report["verdict_reason"]
    assert case.checksum(name) == baseline
    assert env.chunk_states(run_id) == {"done": report["chunks"]["total"]}
    totals = report["totals"]
    assert totals["source_rows"] == totals["rows_read"] == expected.source_rows
    assert totals["rows_rejected"] == len(expected.rejected_keys)
    listed = env.ledger_sql("SELECT key FROM shuttle.rejects WHERE run_id = %s", (run_id,))
    assert sorted(key for (key,) in listed) == sorted(expected.rejected_keys), "each reject listed once"
    assert nonzero(case.target_rows(name)) == expected.target_rows, "no duplicates, nothing missing"
    counted = {entity: t["target_rows"] for entity, t in totals["targets"].items()}
    written = {entity: t["inserted"] + t["updated"] + t["unchanged"] for entity, t in totals["targets"].items()}
    assert nonzero(counted) == nonzero(written) == expected.target_rows, "every target row counted once"


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {key: n for key, n in counts.items() if n}


def running_chunk(case: Case, run_id: str, skip_workers: tuple[str, ...] = ()) -> tuple[str, str] | None:
    rows = case.env.ledger_sql("SELECT chunk_id, worker FROM shuttle.chunks WHERE run_id = %s AND state = 'running'"
                               " AND NOT worker = ANY(%s) ORDER BY started_at", (run_id, list(skip_workers)))
    return rows[0] if rows else None


def blocked_chunk(case: Case, run_id: str, skip_workers: tuple[str, ...] = ()) -> tuple[str, str]:
    """A chunk that is running and, the writes being held, cannot finish: (chunk id, worker host:pid)."""
    return wait_for(lambda: running_chunk(case, run_id, skip_workers), timeout=60, interval=0.05)


def pid_of(worker: str) -> int:
    return int(worker.rsplit(":", 1)[1])


def done_count(case: Case, run_id: str) -> int:
    return case.env.chunk_states(run_id).get("done", 0)


def retried(case: Case, run_id: str) -> int:
    return case.env.ledger_sql("SELECT count(*) FROM shuttle.chunks WHERE run_id = %s AND attempts > 1",
                               (run_id,))[0][0]


def settled(case: Case, run_id: str) -> bool:
    """No chunk is queued or running any more (done, failed or cancelled)."""
    states = case.env.chunk_states(run_id)
    return states.get("running", 0) == 0 and states.get("queued", 0) == 0


def test_pool_processes_sigkilled_mid_chunk_several_times(case, baseline):
    with case.workers(2, "kill"):
        run_id = case.start("killed3")
        killed: list[tuple[str, str]] = []
        # One hold for the three kills, so the run cannot end between them however fast its chunks are:
        # each kill takes a process that is inside a chunk; Celery starts a new pool process, which takes
        # the next message and is held in its turn.
        with case.hold_writes("killed3"):
            for _ in range(3):
                chunk_id, worker = blocked_chunk(case, run_id, tuple(w for _, w in killed))
                os.kill(pid_of(worker), signal.SIGKILL)
                killed.append((chunk_id, worker))
        code, report = case.env.run_json("watch", run_id)
    attempts = dict(case.env.ledger_sql("SELECT chunk_id, attempts FROM shuttle.chunks WHERE run_id = %s", (run_id,)))
    assert all(attempts[c] >= 2 for c, _ in killed), "every killed chunk was delivered again"
    assert_exact(case, run_id, "killed3", baseline, report)


def test_whole_worker_killed_leaves_a_stale_chunk_that_resume_requeues(case, baseline):
    victim = case.workers(1, "victim")
    victim.__enter__()
    run_id = case.start("stale")
    with case.hold_writes("stale"):
        chunk_id, _ = blocked_chunk(case, run_id)
        for process in victim.processes:
            os.killpg(process.pid, signal.SIGKILL)  # main process and its pool child: nobody requeues the message
        victim.processes.clear()
    with case.workers(1, "rescuer"):
        wait_for(lambda: case.env.chunk_states(run_id) == {"done": done_count(case, run_id), "running": 1},
                 timeout=120, interval=0.3)
        state = case.env.ledger_sql("SELECT state FROM shuttle.chunks WHERE chunk_id = %s", (chunk_id,))[0][0]
        assert state == "running", "the killed worker's chunk is stale: no message left to run it"
        code, report = case.env.run_json("resume", run_id)
    assert code == 0, report["verdict_reason"]
    assert_exact(case, run_id, "stale", baseline, report)


def test_resume_leaves_the_chunk_a_live_worker_is_in_to_finish(modmon_case):
    """Engine behaviour, so one migration is enough: resuming while a worker is inside a chunk must not
    enqueue that chunk again (it would run twice); the stale chunk of a dead worker is in the test above."""
    case = modmon_case
    with case.workers(1, "live"):
        run_id = case.start("live")
        with case.hold_writes("live"):
            chunk_id, _ = blocked_chunk(case, run_id)
            resumed = case.env.shuttle("resume", run_id)
            assert resumed.returncode == 0, resumed.stderr
            assert "1 still running on live workers, left to finish" in " ".join(resumed.stderr.split())
            state = case.env.ledger_sql("SELECT state FROM shuttle.chunks WHERE chunk_id = %s", (chunk_id,))[0][0]
            assert state == "running", "the live worker's chunk was not queued again"
        code, report = case.env.run_json("watch", run_id)
    attempts = case.env.ledger_sql("SELECT attempts FROM shuttle.chunks WHERE chunk_id = %s", (chunk_id,))[0][0]
    assert attempts == 1
    assert_exact(case, run_id, "live", case.baseline, report)


def test_broker_restarted_with_all_its_data_lost(case, baseline, own_redis):
    broker = {"SHUTTLE_BROKER_URL": own_redis.url}
    with case.workers(2, "brk", broker_url=own_redis.url):
        run_id = case.start("broker_lost", **broker)
        wait_for(lambda: done_count(case, run_id) >= 2)
        with case.hold_writes("broker_lost"):
            blocked_chunk(case, run_id)
            own_redis.kill()
            own_redis.start()  # same port, empty: every queued message is gone
            assert redis.Redis.from_url(own_redis.url).llen(case.env.queue) == 0
        # The chunks in flight finish against the ledger; nothing else is left to run.
        wait_for(lambda: case.env.chunk_states(run_id).get("running", 0) == 0, timeout=60, interval=0.1)
        assert case.env.chunk_states(run_id).get("queued", 0) > 0, "messages were lost with the broker"
        code, report = case.env.run_json("resume", run_id, **broker)
    assert code == 0, report["verdict_reason"]
    assert_exact(case, run_id, "broker_lost", baseline, report)


def test_worker_database_connections_terminated_mid_chunk(case, baseline):
    with case.workers(2, "term"):
        run_id = case.start("terminated")
        with case.hold_writes("terminated"):
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
        run_id = case.start("refused")
        wait_for(lambda: done_count(case, run_id) >= 2)
        mark = log_sizes(case)
        with case.hold_writes("refused"):
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


def log_sizes(case: Case) -> dict[str, int]:
    return {log.name: log.stat().st_size for log in case.env.log_dir.glob("*.log")}


def logged_since(case: Case, mark: dict[str, int]) -> str:
    """What the workers logged after `mark` (every worker of the session logs into the same files)."""
    text = []
    for log in case.env.log_dir.glob("*.log"):
        with open(log, "rb") as f:
            f.seek(mark.get(log.name, 0))
            text.append(f.read().decode(errors="replace"))
    return "".join(text)


def test_same_chunk_delivered_twice_concurrently(case, baseline):
    run_id = case.start("twice")  # no worker yet
    redis.Redis.from_url(case.env.broker_url).delete(case.env.queue)
    ledger = Ledger(case.env.ledger_url)
    chunks = ledger.chunks_of(run_id)
    ledger.dispose()
    with case.workers(2, "twice"):
        with case.hold_writes("twice"):
            # Each chunk's message twice in a row: with the writes held, the two idle workers take the two
            # copies of the first chunk and are inside it at the same time.
            Broker(case.env.settings()).enqueue_chunks(run_id, [c for chunk in chunks for c in (chunk, chunk)])
            wait_for(lambda: case.env.ledger_sql("SELECT count(*) FROM shuttle.chunks WHERE run_id = %s"
                                                 " AND state = 'running' AND attempts >= 2", (run_id,))[0][0],
                     timeout=60, interval=0.05)
        code, report = case.env.run_json("watch", run_id)
    assert retried(case, run_id) > 0, "copies overlapped"
    assert_exact(case, run_id, "twice", baseline, report)


def test_cancel_then_resume_twice_in_one_run(case, baseline):
    with case.workers(2, "cancel"):
        run_id = case.start("cancel2", chunk_rows=case.small_chunk_rows)
        for round_ in range(2):
            wait_for(lambda: done_count(case, run_id) >= 3 * (round_ + 1))
            with case.hold_writes("cancel2"):
                blocked_chunk(case, run_id)
                assert case.env.shuttle("cancel", run_id).returncode == 0  # lands while chunks run
            wait_for(lambda: settled(case, run_id), timeout=60, interval=0.1)
            code, report = case.env.run_json("report", run_id, "--refresh")
            assert code == 1 and report["verdict"] == "cancelled" and report["chunks"]["cancelled"] > 0
            if round_ == 0:
                assert case.env.shuttle("resume", run_id).returncode == 0
        code, report = case.env.run_json("resume", run_id)
    assert code == 0, report["verdict_reason"]
    assert_exact(case, run_id, "cancel2", baseline, report)


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
        wait_for(lambda: settled(case, run_id), timeout=120, interval=0.2)
        code, report = case.env.run_json("report", run_id, "--refresh")
        if report["verdict"] != "clean":  # a chunk that ran out of retries: resume redoes it
            code, report = case.env.run_json("resume", run_id)
    assert code == 0, report["verdict_reason"]
    assert_exact(case, run_id, "mongo_killed", baseline, report)
