"""The chunk runner called directly (no Celery) on a real modmon source and ledger: what a task relies on."""

from __future__ import annotations

import pytest
from kombu.exceptions import OperationalError as KombuOperationalError

from common.ledger import Claim
from common.migrations.base import Selection
from common.migrations.modmon import Modmon
from common.migrations.modmon_fixtures import build_source
from common.settings import load_settings
from producer.planner import make_plan, record_run
from worker.context import WorkerContext
from worker.runner import RetryChunk, run_chunk


@pytest.fixture
def planned(fresh_db):
    """A small modmon source, its target and ledger in one database, and a recorded run of it."""
    build_source(fresh_db, rows=3_000, deployments=2)
    migration = Modmon(fresh_db, fresh_db, Modmon.plan_options())
    try:
        migration.prepare_target()
        plan = make_plan(migration, Selection(), 100_000)
    finally:
        migration.close()
    context = WorkerContext(load_settings(ledger_url=fresh_db, source_url=fresh_db, target_url=fresh_db))
    context.ledger.ensure_schema()
    run = record_run(context.ledger, plan, fresh_db, fresh_db, None, "q")
    yield context, context.ledger.chunks_of(run.run_id)
    context.close()


def test_a_broker_error_while_reporting_progress_never_fails_the_chunk(planned):
    context, chunks = planned
    calls = []

    def broker_away(rows: int, est_rows: int) -> None:
        calls.append(rows)
        raise KombuOperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    result = run_chunk(context, chunks[0].chunk_id, broker_away)
    assert calls, "the migration reported progress"
    assert "failed" not in result.summary and result.summary["read"] > 0
    assert context.ledger.get_chunk(chunks[0].chunk_id).state == "done"


def test_a_chunk_this_process_claimed_before_is_taken_over_at_once(planned):
    """A claim whose answer a lost connection hid: the retry has no token, but the holder is this process."""
    context, chunks = planned
    earlier = context.ledger.claim_chunk(chunks[0].chunk_id, context.name, stale_after=600)
    assert isinstance(earlier, Claim)
    result = run_chunk(context, chunks[0].chunk_id, lambda rows, est: None)
    assert "skipped" not in result.summary, result.summary
    assert context.ledger.get_chunk(chunks[0].chunk_id).state == "done"



def test_a_worker_that_cannot_reach_the_target_says_what_to_fix_on_that_worker(fresh_db):
    """The producer reached the target when it planned, this worker cannot: the retry's message names the
    setting to fix on the worker, and never the password."""
    build_source(fresh_db, rows=500, deployments=1)
    migration = Modmon(fresh_db, fresh_db, Modmon.plan_options())
    try:
        plan = make_plan(migration, Selection(), 100_000)
    finally:
        migration.close()
    context = WorkerContext(load_settings(ledger_url=fresh_db, source_url=fresh_db))
    context.ledger.ensure_schema()
    run = record_run(context.ledger, plan, fresh_db, "postgresql://postgres:secret@127.0.0.1:1/nowhere", None, "q")
    try:
        with pytest.raises(RetryChunk) as retry:
            run_chunk(context, context.ledger.chunks_of(run.run_id)[0].chunk_id, lambda rows, est: None)
    finally:
        context.close()
    message = retry.value.message
    assert message.startswith("target database postgresql://postgres@127.0.0.1:1/nowhere is unreachable from "
                              "this worker (connection failed"), message
    assert message.endswith("check that the server is running and that this worker's host can reach it")
    assert "secret" not in message
