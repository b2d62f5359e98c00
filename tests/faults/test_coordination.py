"""Faults of coordination, each against every migration: the same chunk delivered twice, two resumes at
once, the ledger's connections cut again and again, cancel and resume. After each, every chunk ran once at
a time and was counted once, by the attempt that held it.

Every test here fails if the recovery it exercises is removed (see RELIABILITY.md for how each was
checked). Each run starts with the target's writes held (`Case.started_held`), so the fault always lands
on chunks that are still running, however fast the migration's chunks are.
"""

from __future__ import annotations

import subprocess

import psycopg
import pytest
import redis

from common.broker import Broker
from common.ledger import Ledger
from tests.faults.checks import (assert_cancelled, assert_counted_once, assert_exact, blocked_chunk,
                                 cut_ledger_connections, healed, log_sizes, logged_since)
from tests.harness import PROJECT_ROOT, SHUTTLE, wait_for

pytestmark = pytest.mark.faults
LEDGER_CUT_S = 10  # how long every ledger connection is cut, every 0.3 s


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
