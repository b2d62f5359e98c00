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
import subprocess
import time

import psycopg
import pytest
import redis

from common.ledger import Ledger
from common.broker import Broker
from tests.faults.cases import Case, MongoCase, database_of
from tests.harness import PROJECT_ROOT, SHUTTLE, wait_for
from tests.mongo_server import REAL_MONGO_URI

pytestmark = pytest.mark.faults
OUTAGE_S = 3  # how long the target refuses connections, on top of the first retries it causes
BROKER_DOWN_S = 2  # how long the broker is away when it restarts
LEDGER_CUT_S = 10  # how long every ledger connection is cut, every 0.3 s


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


def healed(case: Case, run_id: str, timeout: float = 120) -> dict:
    """Wait, with no `resume` and no `watch` (whose sweeping would help), until the run is closed by the
    workers alone; then its report. The bound is generous: on an idle machine it takes seconds."""
    wait_for(lambda: case.env.ledger_sql("SELECT status FROM shuttle.runs WHERE run_id = %s", (run_id,))[0][0]
             != "running", timeout=timeout, interval=0.5)
    code, report = case.env.run_json("report", run_id)
    assert code == (0 if report["verdict"] == "clean" else 1)
    return report


def assert_counted_once(report: dict) -> None:
    """A fresh target: every row was inserted by exactly one recorded attempt, none counted as unchanged."""
    for entity, t in report["totals"]["targets"].items():
        assert (t["updated"], t["unchanged"]) == (0, 0) and t["inserted"] == t["target_rows"], (entity, t)


def settled(case: Case, run_id: str) -> bool:
    """No chunk is queued or running any more (done, failed or cancelled)."""
    states = case.env.chunk_states(run_id)
    return states.get("running", 0) == 0 and states.get("queued", 0) == 0


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


def test_resume_leaves_the_chunk_a_live_worker_is_in_to_finish(modmon_case):
    """Engine behaviour, so one migration is enough: resuming while a worker is inside a chunk must not
    enqueue that chunk again (it would run twice); the stale chunk of a dead worker is in the test above."""
    case = modmon_case
    with case.workers(1, "live"):
        with case.started_held("live") as run_id:
            chunk_id, _ = blocked_chunk(case, run_id)
            resumed = case.env.shuttle("resume", run_id)
            assert resumed.returncode == 0, resumed.stderr
            assert "1 still running (their workers are alive), left to finish" in " ".join(resumed.stderr.split())
            state = case.env.ledger_sql("SELECT state FROM shuttle.chunks WHERE chunk_id = %s", (chunk_id,))[0][0]
            assert state == "running", "the live worker's chunk was not queued again"
        code, report = case.env.run_json("watch", run_id)
    attempts = case.env.ledger_sql("SELECT attempts FROM shuttle.chunks WHERE chunk_id = %s", (chunk_id,))[0][0]
    assert attempts == 1
    assert_exact(case, run_id, "live", case.baseline, report)


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


def test_ledger_connections_cut_repeatedly_heal_without_resume(case, baseline):
    """Every ledger connection of the workers terminated every 0.3 s for a while, first while chunks are
    held in their write (heartbeats, claims and the sweeper fail), then while they record their outcomes:
    each failure is a transient error, retried, and no chunk is lost or doubled."""
    admin_url = case.env.ledger_url.rsplit("/", 1)[0] + "/postgres"
    with case.workers(2, "ledgercut"), psycopg.connect(admin_url, autocommit=True) as admin:
        with case.started_held("ledger_cut") as run_id:
            blocked_chunk(case, run_id)
            cut = cut_ledger_connections(case, admin, LEDGER_CUT_S / 2)
        cut += cut_ledger_connections(case, admin, LEDGER_CUT_S / 2)
        report = healed(case, run_id)
    assert cut > 0, "ledger connections were cut"
    assert_exact(case, run_id, "ledger_cut", baseline, report)


def cut_ledger_connections(case: Case, admin: psycopg.Connection, seconds: float) -> int:
    """Terminate every `shuttle-ledger` connection to the case's ledger every 0.3 s for `seconds`."""
    cut, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        cut += admin.execute("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE application_name = 'shuttle-ledger' AND datname = %s) t",
                             (database_of(case.env.ledger_url),)).fetchone()[0]
        time.sleep(0.3)
    return cut


def test_two_resumes_at_once_count_every_row_once(case, baseline):
    """Two `resume` at the same moment send every open chunk twice more: each chunk still runs once at a
    time, and its first recorded counts stand (a later copy's "unchanged" never replaces them)."""
    with case.workers(2, "resume2"):
        with case.started_held("resume2") as run_id:
            blocked_chunk(case, run_id)
            resumes = [subprocess.Popen([*SHUTTLE, "resume", run_id], env=case.env.environ(), cwd=PROJECT_ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
            for resume in resumes:
                assert resume.wait(timeout=120) == 0, resume.stderr.read()
        report = healed(case, run_id)
    assert_exact(case, run_id, "resume2", baseline, report)
    assert_counted_once(report)


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
        mark = log_sizes(case)
        with case.hold_writes("twice"):
            # Each chunk's message twice in a row: with the writes held, the second idle worker takes the
            # copy of the chunk the first is inside, and must skip it.
            Broker(case.env.settings()).enqueue_chunks(run_id, [c for chunk in chunks for c in (chunk, chunk)])
            wait_for(lambda: "(heartbeat" in logged_since(case, mark), timeout=60, interval=0.1)
        code, report = case.env.run_json("watch", run_id)
    assert max(n for (n,) in case.env.ledger_sql("SELECT attempts FROM shuttle.chunks WHERE run_id = %s",
                                                 (run_id,))) == 1, "no chunk ran twice"
    assert_exact(case, run_id, "twice", baseline, report)
    assert_counted_once(report)


def test_cancel_then_resume_twice_in_one_run(case, baseline):
    with case.workers(2, "cancel"):
        with case.started_held("cancel2", chunk_rows=case.small_chunk_rows) as run_id:
            blocked_chunk(case, run_id)
            assert case.env.shuttle("cancel", run_id).returncode == 0  # lands while chunks run
        assert_cancelled(case, run_id)
        with case.hold_writes("cancel2"):
            assert case.env.shuttle("resume", run_id).returncode == 0
            blocked_chunk(case, run_id)
            assert case.env.shuttle("cancel", run_id).returncode == 0
        assert_cancelled(case, run_id)
        code, report = case.env.run_json("resume", run_id)
    assert code == 0, report["verdict_reason"]
    assert_exact(case, run_id, "cancel2", baseline, report)


def assert_cancelled(case: Case, run_id: str) -> None:
    wait_for(lambda: settled(case, run_id), timeout=60, interval=0.1)
    code, report = case.env.run_json("report", run_id, "--refresh")
    assert code == 1 and report["verdict"] == "cancelled" and report["chunks"]["cancelled"] > 0


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
