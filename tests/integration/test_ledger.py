"""The ledger on a real PostgreSQL: idempotent schema, exact counts under redelivery, one coordinator."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from common.ledger import Ledger, RunRecord
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


def test_redelivered_chunk_is_counted_once(ledger):
    (chunk_id,) = _run(ledger, 1)
    copies = [ledger.claim_chunk(chunk_id, worker)[1] for worker in ("w1", "w2")]  # delivered twice at once
    for chunk in copies:
        ledger.record_outcome(chunk, _outcome(rejected=3), 0.1)
    assert ledger.claim_chunk(chunk_id, "w3") is None  # a late copy of a finished chunk is skipped
    totals = ledger.partition_totals("r1")
    assert totals[0]["rows_read"] == 10 and totals[0]["rows_rejected"] == 3
    assert len(ledger.rejects_of("r1")) == 3
    assert ledger.chunks_of("r1")[0].attempts == 2


def test_exactly_one_finisher_starts_the_coordinator(ledger):
    ids = _run(ledger, 16)
    claimed = [ledger.claim_chunk(i, "w")[1] for i in ids]
    with ThreadPoolExecutor(8) as pool:
        last = list(pool.map(lambda c: ledger.record_outcome(c, _outcome(0), 0.01), claimed))
    assert last.count(True) == 1
    assert ledger.progress("r1").finished


def test_cancelled_run_skips_queued_chunks_and_resume_requeues_them(ledger):
    ids = _run(ledger, 3)
    _, running = ledger.claim_chunk(ids[0], "w")
    assert ledger.cancel("r1") == 2
    assert ledger.claim_chunk(ids[1], "w") is None
    assert ledger.record_outcome(running, _outcome(0), 0.1) is True  # the last running chunk ends the run
    requeued = ledger.reopen("r1")
    assert sorted(c.chunk_id for c in requeued) == sorted(ids[1:])
    assert ledger.get_run("r1").status == "running"


def test_resume_leaves_a_chunk_a_live_worker_runs_and_requeues_a_stale_one(ledger):
    ids = _run(ledger, 4)
    _, live = ledger.claim_chunk(ids[0], "alive")
    ledger.claim_chunk(ids[1], "killed")  # its worker is gone: the chunk stays `running` for ever
    ledger.cancel("r1")
    requeued = ledger.reopen("r1", still_running={ids[0], ids[2]})  # ids[2] is queued, not running: requeued
    assert sorted(c.chunk_id for c in requeued) == sorted(ids[1:])
    assert ledger.get_chunk(ids[0]).state == "running"
    assert not ledger.claim_finalize("r1"), "a run with a chunk still running is not finalized"
    for chunk_id in ids[1:]:
        _, chunk = ledger.claim_chunk(chunk_id, "w")
        ledger.record_outcome(chunk, _outcome(0), 0.1)
    assert ledger.record_outcome(live, _outcome(0), 0.1) is True  # the live chunk ends the run


def test_a_report_of_the_cancelled_round_does_not_close_the_resumed_run(ledger):
    """The coordinator of a cancelled round may finish building its report after `shuttle resume`."""
    _run(ledger, 3)
    ledger.cancel("r1")
    built_on = {"cancelled": 3}  # what the late coordinator saw
    requeued = ledger.reopen("r1")
    assert not ledger.close_run("r1", "cancelled", "cancelled", {"verdict": "cancelled"}, built_on)
    assert ledger.get_run("r1").status == "running" and ledger.get_report("r1") is None
    assert ledger.claim_chunk(requeued[0].chunk_id, "w") is not None, "the resumed chunks still run"
    ledger.cancel("r1")
    assert ledger.close_run("r1", "cancelled", "cancelled", {"verdict": "cancelled"}, {"running": 1, "cancelled": 2})
    assert ledger.get_run("r1").status == "cancelled" and ledger.get_report("r1") == {"verdict": "cancelled"}
