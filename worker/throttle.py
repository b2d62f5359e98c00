"""The row throttle of a run: one token bucket in Redis that every worker of the run draws from.

A run's limit (`max_rows_per_second`, common.run_controls) lives in the ledger; the bucket only holds
when the next rows may go, so Redis losing it costs nothing but a fresh start. The bucket is a
virtual schedule (GCRA): each reservation of n rows is given the next free slot of n / rate seconds,
atomically in a Lua script on Redis' own clock, so any number of worker processes on any number of
hosts share one rate. A worker reserves as it streams a chunk (the migration's progress callback) and
sleeps until its slot; the chunk's heartbeat thread keeps beating meanwhile, so a throttled chunk is
never taken for stale.

Waits are bounded: a reservation is at most about `STEP_SECONDS` worth of rows, and a wait is slept
in slices of at most `SLICE_SECONDS`, re-reading the limit between slices, so `shuttle throttle RUN N`
or `off` reaches a waiting worker within a second or two.

Where there is no Redis (neither result backend nor broker), or while it cannot be reached, the same
schedule is kept in the ledger (`LedgerBucket`, one locked row per run), so the limit still holds for
the run as a whole. Only if the ledger cannot be reached either does a worker pace itself alone at the
full limit (logged) until one is back.

The same throttle holds a chunk, before it starts and as it streams, while the run's source-load probe
(common.source_load) answers over its bound.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from common.ledger import Ledger
from common.ledger_schema import throttle_buckets
from common.run_controls import RunControls, read_controls
from common.source_load import SourceLoad
from common.settings import Settings
from common.urls import mask

log = logging.getLogger("shuttle.worker")

STEP_SECONDS = 0.25  # a reservation covers at most this much time at the limit
SLICE_SECONDS = 1.0  # longest sleep between two looks at the limit
CONTROLS_EVERY_SECONDS = 1.0  # how often a worker re-reads the run's limit from the ledger
PROBE_EVERY_SECONDS = 5.0  # how often a worker asks the source for its load, when the run sets a bound
RETRY_BUCKET_SECONDS = 10.0  # a bucket that failed is tried again after this long
KEY_PREFIX = "shuttle:throttle:"

# KEYS[1]: the run's bucket. ARGV[1]: rows, ARGV[2]: rows per second. Returns the seconds to wait.
# `tat` is when the schedule is next free; on a new rate the backlog already reserved is re-timed at it.
RESERVE_LUA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rows, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tat', 'rate')
local tat, old = tonumber(state[1]) or now, tonumber(state[2]) or rate
if tat > now and old ~= rate then tat = now + (tat - now) * old / rate end
if tat < now then tat = now end
local wait = tat - now
tat = tat + rows / rate
redis.call('HSET', KEYS[1], 'tat', tostring(tat), 'rate', tostring(rate))
redis.call('EXPIRE', KEYS[1], math.ceil(tat - now) + 300)
return tostring(wait)
"""


def next_slot(now: float, tat: float | None, old_rate: float | None, rows: int, rate: float) -> tuple[float, float]:
    """The schedule's rule (what `RESERVE_LUA` does in Redis): the seconds to wait for `rows` at `rate`, and
    when the schedule is next free after them. `tat` is when it was free, reckoned at `old_rate`."""
    if tat is None or old_rate is None:
        tat, old_rate = now, rate
    if tat > now and old_rate != rate:
        tat = now + (tat - now) * old_rate / rate
    tat = max(tat, now)
    return tat - now, tat + rows / rate


class Bucket(Protocol):
    def reserve(self, run_id: str, rows: int, rate: float) -> float:
        """Reserve `rows` at `rate` rows/s; the seconds to wait before they may go."""


class RedisBucket:
    """The shared bucket: one Redis hash per run, updated only by `RESERVE_LUA`."""

    def __init__(self, url: str) -> None:
        import redis

        self.public_url = mask(url)
        self._client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._reserve = self._client.register_script(RESERVE_LUA)

    def reserve(self, run_id: str, rows: int, rate: float) -> float:
        return max(0.0, float(self._reserve(keys=[KEY_PREFIX + run_id], args=[rows, repr(float(rate))])))

    def close(self) -> None:
        self._client.close()


class LedgerBucket:
    """The same schedule in the ledger: one row per run, locked for each reservation, on the ledger's clock."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def reserve(self, run_id: str, rows: int, rate: float) -> float:
        with self.ledger.transaction() as conn:
            now = float(conn.execute(sa.select(sa.extract("epoch", sa.func.clock_timestamp()))).scalar_one())
            conn.execute(pg_insert(throttle_buckets).values(run_id=run_id, tat=now, rate=rate)
                         .on_conflict_do_nothing(index_elements=[throttle_buckets.c.run_id]))
            tat, old_rate = conn.execute(sa.select(throttle_buckets.c.tat, throttle_buckets.c.rate)
                                         .where(throttle_buckets.c.run_id == run_id).with_for_update()).one()
            wait, tat = next_slot(now, tat, old_rate, rows, rate)
            conn.execute(throttle_buckets.update().where(throttle_buckets.c.run_id == run_id)
                         .values(tat=tat, rate=rate))
        return wait


def bucket_url(settings: Settings) -> str | None:
    """The Redis the buckets live in: the result backend's, else the broker's; None when neither is Redis."""
    for url in (settings.effective_result_backend, settings.broker_url.split(";")[0]):
        if url.startswith(("redis://", "rediss://")):
            return url
    return None


class RunThrottle:
    """Paces one chunk's rows to its run's shared limit; `advance(rows_so_far)` from the progress callback."""

    def __init__(self, ledger: Ledger, bucket: Bucket | None, run_id: str,
                 probe: Callable[[SourceLoad], float] | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.ledger = ledger
        self.probe = probe  # measures the source's load (common.source_load), for runs that set a bound
        # Redis first; the ledger's schedule while Redis is away (or when there is none).
        self.buckets: list[Bucket] = [b for b in (bucket, LedgerBucket(ledger)) if b is not None]
        self.run_id = run_id
        self.clock = clock
        self.sleep = sleep
        self.waited = 0.0  # seconds this chunk spent throttled
        self._rows = 0
        self._controls = RunControls(None, None)
        self._controls_read_at: float | None = None
        self._probed_at: float | None = None
        self._over = False
        self._failing: dict[int, float] = {}  # position of a bucket that failed -> when to try it again

    def controls(self) -> RunControls:
        """The run's controls, re-read from the ledger at most once a `CONTROLS_EVERY_SECONDS`; the last known
        ones while the ledger cannot be reached (a throttle must never fail the chunk)."""
        now = self.clock()
        if self._controls_read_at is None or now - self._controls_read_at >= CONTROLS_EVERY_SECONDS:
            self._controls_read_at = now
            try:
                self._controls = read_controls(self.ledger, self.run_id) or RunControls(None, None)
            except Exception as exc:  # noqa: BLE001 - keep the last known controls; the ledger will be back
                log.warning("run %s: throttle controls not read (%s); keeping the last known", self.run_id,
                            mask(str(exc)))
        return self._controls

    def limit(self) -> float | None:
        return self.controls().max_rows_per_second

    def hold(self) -> None:
        """Wait, in slices, while the run's source-load probe answers over its bound."""
        while self._over_bound():
            self.sleep(SLICE_SECONDS)
            self.waited += SLICE_SECONDS

    def _over_bound(self) -> bool:
        load = self.controls().source_load
        if load is None or self.probe is None:
            return False
        now = self.clock()
        if self._probed_at is None or now - self._probed_at >= PROBE_EVERY_SECONDS:
            self._probed_at = now
            try:
                value = self.probe(load)
            except Exception as exc:  # noqa: BLE001 - a broken probe must not stop the run for good
                log.warning("run %s: source load probe failed (%s); going on", self.run_id, mask(str(exc)))
                value = -math.inf
            over = value > load.bound
            if over != self._over:
                log.warning("run %s: source load %s %s its bound %g; %s", self.run_id, f"{value:g}",
                            "over" if over else "back under", load.bound, "holding" if over else "going on")
            self._over = over
        return self._over

    def advance(self, rows_so_far: int) -> None:
        """The chunk has read `rows_so_far` rows: take tokens for the new ones, waiting for them if needed."""
        new, self._rows = rows_so_far - self._rows, max(self._rows, rows_so_far)
        self.hold()
        while new > 0:
            limit = self.limit()
            if limit is None:
                return
            step = min(new, max(1, math.ceil(limit * STEP_SECONDS)))
            new -= step
            self._wait(self._reserve(step, limit), limit)

    def _reserve(self, rows: int, limit: float) -> float:
        """From the first bucket that answers; alone at the full limit if none does."""
        for index, bucket in enumerate(self.buckets):
            if self._failing.get(index, 0.0) > self.clock():
                continue  # failed a moment ago: do not wait for its timeout at every step
            try:
                wait = bucket.reserve(self.run_id, rows, limit)
            except Exception as exc:  # noqa: BLE001 - redis and the ledger raise several kinds; try the next
                if index not in self._failing:
                    log.warning("run %s: throttle bucket %s unreachable (%s); %s", self.run_id,
                                type(bucket).__name__, mask(str(exc)),
                                "using the next" if index + 1 < len(self.buckets) else
                                f"this worker paces itself alone at {limit:,.0f} rows/s until one is back")
                self._failing[index] = self.clock() + RETRY_BUCKET_SECONDS
                continue
            if self._failing.pop(index, None) is not None:
                log.warning("run %s: throttle bucket %s reachable again", self.run_id, type(bucket).__name__)
            return wait
        return rows / limit

    def _wait(self, seconds: float, limit: float) -> None:
        """Sleep `seconds` in slices; stop early once the limit changed (the bucket re-timed the backlog)."""
        deadline = self.clock() + seconds
        while True:
            left = deadline - self.clock()
            if left <= 0:
                return
            pause = min(left, SLICE_SECONDS)
            self.sleep(pause)
            self.waited += pause
            if self.limit() != limit:
                return
