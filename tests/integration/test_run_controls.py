"""Throttle and pause on a real ledger and a real Redis: the shared bucket, the worker's pacing, the
claim that skips a paused run, and the sweeper that leaves a paused run alone (tests/e2e/test_throttle_e2e.py
runs them with real workers)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from common import run_controls
from common.errors import ConfigError
from common.ledger import Claim, Ledger, Skipped
from common.model import ChunkOutcome
from tests.conftest import REDIS_BASE
from tests.integration.test_sweeper import ScriptedBroker, age, make_run, sweeper_for
from common.source_load import SourceLoad, check_probe, measure, parse_source_load
from worker.throttle import KEY_PREFIX, PROBE_EVERY_SECONDS, LedgerBucket, RedisBucket, RunThrottle

REDIS_URL = f"{REDIS_BASE}/11"


@pytest.fixture
def run_id():
    """A run id of this test's own, so its bucket key meets no other test's; the key is removed after."""
    run_id = f"throttle-test-{uuid.uuid4().hex[:8]}"
    yield run_id
    redis.Redis.from_url(REDIS_URL).delete(KEY_PREFIX + run_id)


@pytest.fixture
def bucket():
    bucket = RedisBucket(REDIS_URL)
    yield bucket
    bucket.close()


# -- the bucket ------------------------------------------------------------------------------------

def test_the_bucket_gives_each_reservation_the_next_free_slot(bucket, run_id):
    waits = [bucket.reserve(run_id, 100, 100.0) for _ in range(3)]
    assert waits[0] == 0.0, "an idle bucket lets the first rows go at once"
    assert waits[1] == pytest.approx(1.0, abs=0.1) and waits[2] == pytest.approx(2.0, abs=0.1)


def test_a_new_rate_re_times_the_rows_already_reserved(bucket, run_id):
    for _ in range(3):
        bucket.reserve(run_id, 100, 100.0)  # the schedule is now free 3 s from now
    assert bucket.reserve(run_id, 100, 200.0) == pytest.approx(1.5, abs=0.1), "3 s at 100/s is 1.5 s at 200/s"


def test_a_bucket_redis_lost_starts_afresh(bucket, run_id):
    bucket.reserve(run_id, 1000, 100.0)
    redis.Redis.from_url(REDIS_URL).delete(KEY_PREFIX + run_id)  # as after a Redis restart with no persistence
    assert bucket.reserve(run_id, 100, 100.0) == 0.0


# -- a worker's pacing ----------------------------------------------------------------------------

def stream_in_two_workers(ledger: Ledger, bucket, run_id: str) -> float:
    """Two workers each stream a chunk of 1,000 rows, reporting every 100; the seconds both took."""
    throttles = [RunThrottle(ledger, bucket, run_id) for _ in range(2)]

    def stream(throttle: RunThrottle) -> None:
        for rows in range(100, 1001, 100):
            throttle.advance(rows)

    started = time.monotonic()
    threads = [threading.Thread(target=stream, args=(t,)) for t in throttles]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - started


def test_two_workers_share_one_rate(ledger, bucket, run_id):
    make_run(ledger, 2, run_id)
    run_controls.set_max_rows_per_second(ledger, run_id, 1000.0)
    took = stream_in_two_workers(ledger, bucket, run_id)
    # 2,000 rows at 1,000 rows/s: the first 100 go free, so about 1.9 s; alone each would take 0.9 s.
    assert 1.6 <= took <= 2.8, f"{took:.2f}s"


@pytest.mark.parametrize("bucket", [None, RedisBucket("redis://127.0.0.1:1/0")], ids=["no Redis", "Redis away"])
def test_without_redis_the_ledger_keeps_the_rate_shared(ledger, bucket, run_id):
    make_run(ledger, 2, run_id)
    run_controls.set_max_rows_per_second(ledger, run_id, 1000.0)
    took = stream_in_two_workers(ledger, bucket, run_id)
    assert 1.6 <= took <= 2.8, f"{took:.2f}s"


def test_the_ledger_bucket_keeps_the_same_schedule(ledger, run_id):
    make_run(ledger, 1, run_id)
    bucket = LedgerBucket(ledger)
    waits = [bucket.reserve(run_id, 100, 100.0) for _ in range(3)]
    assert waits[0] == 0.0 and waits[1] == pytest.approx(1.0, abs=0.1) and waits[2] == pytest.approx(2.0, abs=0.1)
    assert bucket.reserve(run_id, 100, 200.0) == pytest.approx(1.5, abs=0.1), "3 s at 100/s is 1.5 s at 200/s"


def test_a_waiting_worker_follows_a_lifted_limit_within_seconds(ledger, bucket, run_id):
    make_run(ledger, 1, run_id)
    run_controls.set_max_rows_per_second(ledger, run_id, 100.0)
    throttle = RunThrottle(ledger, bucket, run_id)
    threading.Timer(1.0, run_controls.set_max_rows_per_second, (ledger, run_id, None)).start()
    started = time.monotonic()
    throttle.advance(2000)  # 20 s at 100 rows/s
    assert time.monotonic() - started < 4.0


def test_without_a_limit_nothing_waits(ledger, run_id):
    make_run(ledger, 1, run_id)
    slept: list[float] = []
    RunThrottle(ledger, None, run_id, sleep=slept.append).advance(1_000_000)
    assert slept == []


class Unreachable:
    def reserve(self, run_id: str, rows: int, rate: float) -> float:
        raise ConnectionError("connection refused")


def test_with_no_bucket_reachable_a_worker_paces_itself_alone(ledger, run_id):
    make_run(ledger, 1, run_id)
    run_controls.set_max_rows_per_second(ledger, run_id, 400.0)
    clock = [0.0]
    throttle = RunThrottle(ledger, Unreachable(), run_id, clock=lambda: clock[0],
                           sleep=lambda s: clock.__setitem__(0, clock[0] + s))
    throttle.buckets = [Unreachable(), Unreachable()]  # Redis and the ledger's schedule both away
    throttle.advance(800)
    assert throttle.waited == pytest.approx(2.0, abs=0.01), "800 rows at 400 rows/s, alone"


# -- pause ----------------------------------------------------------------------------------------

def test_a_paused_run_hands_out_no_chunk_and_its_running_chunk_finishes(ledger):
    ids = make_run(ledger, 3)
    running = ledger.claim_chunk(ids[0], "w", 30)
    assert run_controls.pause(ledger, "r1") == 1, "one chunk runs and will finish"
    assert ledger.claim_chunk(ids[1], "w", 30) == Skipped("run paused")
    assert ledger.get_chunk(ids[1]).state == "queued", "the skipped chunk stays queued in the ledger"
    again = ledger.claim_chunk(ids[0], "w", 30, reclaim=running.token)
    assert isinstance(again, Claim), "a retry of the attempt holding the chunk goes on"
    assert ledger.record_outcome(again.chunk, again.token, ChunkOutcome(rows_read=10), 0.1).stored
    assert run_controls.read_controls(ledger, "r1").paused
    assert run_controls.unpause(ledger, "r1") and not run_controls.unpause(ledger, "r1")
    assert isinstance(ledger.claim_chunk(ids[1], "w", 30), Claim)


def test_the_sweeper_does_not_take_a_paused_runs_chunks_for_lost(ledger):
    ids = make_run(ledger, 3)
    run_controls.pause(ledger, "r1")
    age(ledger, ids, "queued_at", 600)
    broker = ScriptedBroker()  # the broker holds none of them: the workers dropped them while paused
    assert sweeper_for(ledger, broker).sweep() == [] and broker.sent == []
    run_controls.unpause(ledger, "r1")  # a `continue` whose own sending failed: the sweeper sends them
    events = sweeper_for(ledger, broker).sweep()
    assert sorted(broker.sent) == sorted(ids) and {e.kind for e in events} == {"lost"}


def test_controls_survive_in_the_ledger_and_read_back(ledger, fresh_db):
    make_run(ledger, 1)
    assert run_controls.read_controls(ledger, "r1").describe() == ""
    run_controls.set_max_rows_per_second(ledger, "r1", 1500.0)
    run_controls.pause(ledger, "r1")
    fresh = Ledger(fresh_db)  # as another process: what it reads comes from the ledger alone
    try:
        assert fresh.get_run("r1") is not None
        assert run_controls.read_controls(fresh, "r1").describe() == "paused · throttled to 1,500 rows/s"
    finally:
        fresh.dispose()
    assert run_controls.read_controls(ledger, "no-such-run") is None


@pytest.mark.parametrize("text, expected", [("500", 500.0), ("2.5", 2.5), ("off", None), ("OFF", None), ("0", None)])
def test_rates_are_parsed_as_users_type_them(text, expected):
    assert run_controls.parse_rate(text) == expected


@pytest.mark.parametrize("text", ["-5", "fast", "nan", "inf"])
def test_a_bad_rate_is_refused_with_the_fix(text):
    with pytest.raises(ConfigError, match="positive number or 'off'"):
        run_controls.parse_rate(text)


# -- back-pressure from the source ------------------------------------------------------------------

def test_a_chunk_waits_while_the_source_is_over_its_load_bound(ledger, run_id):
    make_run(ledger, 1, run_id)
    run_controls.set_source_load(ledger, run_id, SourceLoad("SELECT 1", 10.0))
    clock, answers = [0.0], iter([50.0, 50.0, 3.0])
    throttle = RunThrottle(ledger, None, run_id, probe=lambda load: next(answers), clock=lambda: clock[0],
                           sleep=lambda s: clock.__setitem__(0, clock[0] + s))
    throttle.hold()
    assert throttle.waited == pytest.approx(2 * PROBE_EVERY_SECONDS), "two probes over the bound, then under"


def test_a_broken_probe_does_not_stop_the_run(ledger, run_id):
    make_run(ledger, 1, run_id)
    run_controls.set_source_load(ledger, run_id, SourceLoad("SELECT 1", 10.0))

    def broken(load):
        raise RuntimeError("relation does not exist")

    throttle = RunThrottle(ledger, None, run_id, probe=broken, sleep=lambda s: pytest.fail("must not wait"))
    throttle.hold()


def test_the_probe_runs_read_only_on_the_source(fresh_db):
    assert measure(fresh_db, SourceLoad("SELECT count(*) FROM pg_stat_activity", 0)) >= 1
    with pytest.raises(ConfigError, match="probe failed on the source: .*read-only"):
        check_probe(fresh_db, SourceLoad("CREATE TABLE sneaky (x int)", 1))
    with pytest.raises(ConfigError, match="SQL:BOUND"):
        parse_source_load("SELECT 1")
    assert parse_source_load("SELECT count(*) FROM pg_stat_activity WHERE state = 'active':20") == \
        SourceLoad("SELECT count(*) FROM pg_stat_activity WHERE state = 'active'", 20.0)
