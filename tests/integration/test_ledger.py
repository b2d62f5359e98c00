"""The ledger on a real PostgreSQL: idempotent schema, exact counts under redelivery, one coordinator."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from common.errors import TransientError
from common.ledger import Claim, Ledger, Recorded, RunRecord, Skipped
from common.ledger_schema import ADDED_COLUMNS, chunks
from common.model import ChunkOutcome, ChunkSpec, Reject, WriteCounts


@pytest.fixture
def ledger(fresh_db):
    ledger = Ledger(fresh_db)
    ledger.ensure_schema()
    ledger.ensure_schema()  # a second start must not fail or change anything
    yield ledger
    ledger.dispose()


def _run(ledger: Ledger, chunks: int) -> list[str]:
    specs = [ChunkSpec("predictions", "dep", f"{i:04d}", f"{i + 1:04d}", 10) for i in range(chunks)]
    ledger.create_run(RunRecord("r1", "modmon", "running", {}, {}, None, None, 10 * chunks, chunks, None), specs)
    return [s.chunk_id("r1") for s in specs]


def _outcome(rejected: int) -> ChunkOutcome:
    return ChunkOutcome(rows_read=10, rejects=[Reject("predictions", str(i), "bad") for i in range(rejected)],
                        writes={"t": WriteCounts(inserted=10 - rejected)})


HOLD = 30.0  # seconds a fresh heartbeat holds a chunk in these tests


def _claim(ledger: Ledger, chunk_id: str, worker: str = "w", stale_after: float = HOLD, **kwargs) -> Claim:
    claim = ledger.claim_chunk(chunk_id, worker, stale_after, **kwargs)
    assert isinstance(claim, Claim), claim
    return claim


def _record(ledger: Ledger, claim: Claim, rejected: int = 0):
    return ledger.record_outcome(claim.chunk, claim.token, _outcome(rejected), 0.1)


def test_a_copy_delivered_while_the_chunk_is_held_is_skipped_and_counts_stay_the_first(ledger):
    (chunk_id,) = _run(ledger, 1)
    first = _claim(ledger, chunk_id, "w1")
    copy = ledger.claim_chunk(chunk_id, "w2", HOLD)  # a duplicate delivery while w1 works on it
    assert isinstance(copy, Skipped) and "held by w1" in copy.reason
    assert _record(ledger, first, rejected=3) == Recorded(stored=True, run_finished=True)
    late = ledger.claim_chunk(chunk_id, "w3", HOLD)
    assert isinstance(late, Skipped) and late.reason == "done already"
    totals = ledger.partition_totals("r1")
    assert totals[0]["rows_read"] == 10 and totals[0]["rows_rejected"] == 3
    assert len(ledger.rejects_of("r1")) == 3
    assert ledger.chunks_of("r1")[0].attempts == 1


def test_a_silent_attempt_loses_its_chunk_and_records_nothing(ledger):
    (chunk_id,) = _run(ledger, 1)
    silent = _claim(ledger, chunk_id, "w1")
    rescue = _claim(ledger, chunk_id, "w2", stale_after=0)  # w1's heartbeat counts as stale at once
    assert not ledger.heartbeat(chunk_id, silent.token), "the silent attempt is told it lost its hold"
    assert _record(ledger, silent, rejected=1) == Recorded(stored=False, run_finished=False)
    assert _record(ledger, rescue) == Recorded(stored=True, run_finished=True)
    assert ledger.partition_totals("r1")[0]["rows_rejected"] == 0, "only the holder's outcome is recorded"
    assert ledger.chunks_of("r1")[0].attempts == 2


def test_a_chunk_whose_worker_is_gone_is_taken_over_at_once(ledger):
    (chunk_id,) = _run(ledger, 1)
    _claim(ledger, chunk_id, "host:1")
    taken = ledger.claim_chunk(chunk_id, "host:2", HOLD, holder_gone=lambda worker: worker == "host:1")
    assert isinstance(taken, Claim) and taken.chunk.attempts == 1


def test_a_retry_continues_its_own_claim(ledger):
    (chunk_id,) = _run(ledger, 1)
    first = _claim(ledger, chunk_id)
    assert ledger.heartbeat(chunk_id, first.token, extend_s=60)  # held through the retry's backoff
    assert isinstance(ledger.claim_chunk(chunk_id, "other", HOLD), Skipped)
    retry = _claim(ledger, chunk_id, reclaim=first.token)
    assert retry.token != first.token and not ledger.heartbeat(chunk_id, first.token)
    assert _record(ledger, retry).stored


def test_exactly_one_finisher_starts_the_coordinator(ledger):
    ids = _run(ledger, 16)
    claimed = [_claim(ledger, i) for i in ids]
    with ThreadPoolExecutor(8) as pool:
        last = list(pool.map(lambda c: _record(ledger, c).run_finished, claimed))
    assert last.count(True) == 1
    assert ledger.progress("r1").finished


def test_cancelled_run_skips_queued_chunks_and_resume_requeues_them(ledger):
    ids = _run(ledger, 3)
    running = _claim(ledger, ids[0])
    assert ledger.cancel("r1") == 2
    assert ledger.claim_chunk(ids[1], "w", HOLD) == Skipped("run cancelled")
    assert _record(ledger, running).run_finished  # the last running chunk ends the run
    requeued, left = ledger.reopen("r1", HOLD)
    assert sorted(c.chunk_id for c in requeued) == sorted(ids[1:]) and left == 0
    assert ledger.get_run("r1").status == "running"


def test_resume_leaves_a_chunk_with_a_fresh_heartbeat_and_requeues_a_stale_one(ledger):
    ids = _run(ledger, 4)
    live = _claim(ledger, ids[0], "alive")
    _claim(ledger, ids[1], "killed")  # its worker is gone: its heartbeat goes stale
    with ledger.transaction() as conn:
        conn.execute(chunks.update().where(chunks.c.chunk_id == ids[1])
                     .values(heartbeat_at=sa.func.now() - sa.text("interval '1 minute'")))
    ledger.cancel("r1")
    requeued, left = ledger.reopen("r1", HOLD)
    assert sorted(c.chunk_id for c in requeued) == sorted(ids[1:]) and left == 1
    assert ledger.get_chunk(ids[0]).state == "running"
    assert not ledger.claim_finalize("r1"), "a run with a chunk still running is not finalized"
    for chunk_id in ids[1:]:
        assert _record(ledger, _claim(ledger, chunk_id)).stored
    assert _record(ledger, live).run_finished  # the live chunk ends the run


def test_a_lost_connection_inside_a_ledger_transaction_is_transient(ledger):
    with pytest.raises(TransientError, match="ledger"):
        with ledger.transaction() as conn:
            conn.execute(sa.text("SELECT 1"))
            conn.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))
    assert ledger.latest_runs() == [], "the next call reconnects"


def test_an_older_ledger_gains_the_new_columns(ledger):
    _run(ledger, 2)
    with ledger.transaction() as conn:
        for table, columns in ADDED_COLUMNS.items():
            for column in columns:
                conn.execute(sa.text(f"ALTER TABLE shuttle.{table} DROP COLUMN {column.split()[0]}"))
    ledger.ensure_schema()
    assert ledger.get_run("r1").queue == "shuttle"
    assert isinstance(ledger.claim_chunk(ledger.chunks_of("r1")[0].chunk_id, "w", HOLD), Claim)


def test_a_report_of_the_cancelled_round_does_not_close_the_resumed_run(ledger):
    """The coordinator of a cancelled round may finish building its report after `shuttle resume`."""
    _run(ledger, 3)
    ledger.cancel("r1")
    built_on = {"cancelled": 3}  # what the late coordinator saw
    requeued, _ = ledger.reopen("r1", HOLD)
    assert not ledger.close_run("r1", "cancelled", "cancelled", {"verdict": "cancelled"}, built_on)
    assert ledger.get_run("r1").status == "running" and ledger.get_report("r1") is None
    assert isinstance(ledger.claim_chunk(requeued[0].chunk_id, "w", HOLD), Claim), "the resumed chunks still run"
    ledger.cancel("r1")
    assert ledger.close_run("r1", "cancelled", "cancelled", {"verdict": "cancelled"}, {"running": 1, "cancelled": 2})
    assert ledger.get_run("r1").status == "cancelled" and ledger.get_report("r1") == {"verdict": "cancelled"}
