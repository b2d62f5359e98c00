"""The sweeper's three rules on a real ledger; the broker's answers are scripted so each rule is exercised
exactly (the end-to-end faults in tests/faults run them against real brokers and workers)."""

from __future__ import annotations

import io
import os
import uuid

import pytest
import redis
import sqlalchemy as sa
from rich.console import Console

from common.broker import Broker
from common.ledger import Claim, Ledger, RunRecord
from common.ledger_schema import chunks, runs
from common.model import ChunkOutcome, ChunkSpec
from common.settings import load_settings
from common.sweeper import Sweeper
from producer.progress import HealingLog
from tests.conftest import REDIS_BASE


class ScriptedBroker:
    """What the sweeper asks of a broker, answered from fields the test sets; what it sends is kept."""

    def __init__(self) -> None:
        self.depth: int | None = 0
        self.live: set[str] | None = set()
        self.sent: list[str] = []
        self.finalized: list[str] = []

    def queue_depth(self) -> int | None:
        return self.depth

    def held_by_workers(self, task_ids) -> set[str] | None:
        return None if self.live is None else self.live & set(task_ids)

    def enqueue_chunks(self, run_id: str, records) -> int:
        self.sent += [c.chunk_id for c in records]
        return len(records)

    def enqueue_finalize(self, run_id: str) -> None:
        self.finalized.append(run_id)


@pytest.fixture
def broker() -> ScriptedBroker:
    return ScriptedBroker()


def sweeper_for(ledger: Ledger, broker: ScriptedBroker, **settings) -> Sweeper:
    values = dict(ledger_url="postgresql://unused", stale_after=30, lost_after=30, finalize_stale_after=300,
                  sweep_interval=0.001) | settings
    return Sweeper(ledger, broker, load_settings(**values))


def make_run(ledger: Ledger, n: int, run_id: str = "r1", queue: str = "shuttle") -> list[str]:
    specs = [ChunkSpec("t", "p", f"{i:03d}", f"{i + 1:03d}", 10) for i in range(n)]
    ledger.create_run(RunRecord(run_id, "modmon", "running", {}, {}, None, None, 10 * n, n, None, queue=queue), specs)
    return [s.chunk_id(run_id) for s in specs]


def age(ledger: Ledger, chunk_ids: list[str], column: str, seconds: int) -> None:
    """Move a chunk's heartbeat or queued time `seconds` into the past."""
    with ledger.transaction() as conn:
        conn.execute(chunks.update().where(chunks.c.chunk_id.in_(chunk_ids)).values(
            {column: sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, seconds)}))


def test_a_chunk_whose_heartbeat_went_silent_is_sent_again(ledger, broker):
    ids = make_run(ledger, 3)
    silent, alive = (ledger.claim_chunk(i, "w", 30) for i in ids[:2])
    age(ledger, [silent.chunk.chunk_id], "heartbeat_at", 45)
    events = sweeper_for(ledger, broker).sweep()
    assert broker.sent == [ids[0]] and [e.kind for e in events] == ["stale"]
    assert "worker w silent for 45s" in events[0].detail
    assert ledger.get_chunk(ids[0]).state == "queued" and ledger.get_chunk(ids[1]).state == "running"
    assert not ledger.heartbeat(ids[0], silent.token), "the silent attempt lost its hold"
    assert [e["kind"] for e in ledger.events_since("r1")] == ["stale"], "the ledger says what healed the run"
    assert isinstance(alive, Claim)


def test_queued_chunks_the_broker_lost_are_sent_again_oldest_first(ledger, broker):
    ids = make_run(ledger, 5)
    age(ledger, ids, "queued_at", 60)
    broker.depth = 5  # every message still waits: nothing to do
    assert sweeper_for(ledger, broker).sweep() == [] and broker.sent == []
    broker.depth, broker.live = 2, {ids[1]}  # two still wait (the newest); a live worker holds ids[1]
    events = sweeper_for(ledger, broker).sweep()
    assert sorted(broker.sent) == [ids[0], ids[2]] and {e.kind for e in events} == {"lost"}
    broker.depth += len(broker.sent)  # the two sent again now wait in the broker too
    broker.sent.clear()
    assert sweeper_for(ledger, broker).sweep() == [] and broker.sent == [], "nothing else is missing"


def test_recently_queued_chunks_are_left_to_the_broker(ledger, broker):
    make_run(ledger, 3)
    broker.depth = 0
    assert sweeper_for(ledger, broker).sweep() == [] and broker.sent == []


def test_nothing_is_sent_when_the_broker_cannot_say(ledger, broker):
    ids = make_run(ledger, 2)
    age(ledger, ids, "queued_at", 60)
    broker.depth, broker.live = 0, None
    assert sweeper_for(ledger, broker).sweep() == [] and broker.sent == []


def test_a_run_whose_chunks_all_ended_gets_its_coordinator_once(ledger, broker):
    ids = make_run(ledger, 2)
    for chunk_id in ids:
        claim = ledger.claim_chunk(chunk_id, "w", 30)
        ledger.record_outcome(claim.chunk, claim.token, ChunkOutcome(rows_read=10), 0.1)
    with ledger.transaction() as conn:  # as if the coordinator's message was lost with the broker
        conn.execute(runs.update().values(finalize_enqueued_at=sa.func.now() - sa.text("interval '10 minutes'")))
    assert [e.kind for e in sweeper_for(ledger, broker).sweep()] == ["finalize"]
    assert sweeper_for(ledger, broker).sweep() == [], "started again only after finalize_stale_after"
    assert broker.finalized == ["r1"]


def test_a_cancelled_run_whose_last_chunk_went_silent_is_closed(ledger, broker):
    ids = make_run(ledger, 2)
    ledger.claim_chunk(ids[0], "w", 30)
    ledger.cancel("r1")  # the queued chunk is cancelled; the running one's worker then dies
    age(ledger, ids[:1], "heartbeat_at", 600)
    assert [e.kind for e in sweeper_for(ledger, broker).sweep()] == ["stale", "finalize"]
    assert broker.sent == [] and broker.finalized == ["r1"], "nothing of a cancelled run is sent again"
    assert ledger.get_chunk(ids[0]).state == "cancelled"


def test_only_the_runs_of_the_sweepers_queue_are_touched(ledger, broker):
    ids = make_run(ledger, 1, "other-run", queue="elsewhere")
    claim = ledger.claim_chunk(ids[0], "w", 30)
    age(ledger, [claim.chunk.chunk_id], "heartbeat_at", 600)
    assert sweeper_for(ledger, broker).sweep() == [] and broker.sent == []


def test_one_sweeper_acts_at_a_time(ledger, broker):
    ids = make_run(ledger, 1)
    ledger.claim_chunk(ids[0], "w", 30)
    age(ledger, ids, "heartbeat_at", 600)
    with ledger.transaction() as conn:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext("shuttle.sweeper:shuttle"))))
        assert sweeper_for(ledger, broker).sweep() == []  # another sweeper holds the queue's lock
    assert [e.kind for e in sweeper_for(ledger, broker).sweep()] == ["stale"]


def test_a_queue_is_swept_once_per_interval_whatever_the_number_of_sweepers(ledger, broker):
    ids = make_run(ledger, 1)
    ledger.claim_chunk(ids[0], "w", 30)
    age(ledger, ids, "heartbeat_at", 600)
    first, second = (sweeper_for(ledger, broker, sweep_interval=60) for _ in range(2))
    assert [e.kind for e in first.sweep()] == ["stale"]
    ledger.claim_chunk(ids[0], "w", 30)
    age(ledger, ids, "heartbeat_at", 600)
    assert second.sweep() == [] and first.sweep() == [], "the queue was swept less than an interval ago"


def test_the_broker_counts_the_messages_waiting_in_a_redis_queue(ledger):
    queue = f"shuttle-sweeper-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    settings = load_settings(broker_url=f"{REDIS_BASE}/11", queue=queue)
    ids = make_run(ledger, 3, queue=queue)
    broker = Broker(settings)
    try:
        assert broker.queue_depth() == 0, "a queue never sent to holds nothing"
        broker.enqueue_chunks("r1", ledger.chunks_of("r1"))
        assert broker.queue_depth() == len(ids)
        assert broker.held_by_workers(ids) == set(), "no worker consumes this queue"
    finally:
        redis.Redis.from_url(settings.broker_url).delete(queue)
        broker.close()


def test_watch_says_which_chunk_went_stale_and_that_it_was_sent_again(ledger, broker):
    ids = make_run(ledger, 2)
    ledger.claim_chunk(ids[0], "host:4242", 30)
    age(ledger, ids[:1], "heartbeat_at", 45)
    out = io.StringIO()
    shown = HealingLog(Console(file=out, width=200), ledger, "r1")  # what `watch` has already shown
    sweeper_for(ledger, broker).sweep()
    shown.show_new()
    shown.show_new()
    assert out.getvalue().count("\n") == 1, "each event is printed once"
    assert f"stale: chunk {ids[0]}: worker host:4242 silent for 45s; sent again" in out.getvalue()
