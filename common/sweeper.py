"""The sweeper: what makes a run end by itself after a fault, with no `resume` typed by anyone.

Three rules, each decided from the ledger (the source of truth) and acted on through the broker:

- **stale**: a `running` chunk whose attempt has not renewed its heartbeat for `stale_after` seconds
  (its worker was killed, stopped, or cut off) is queued again and re-sent. Should that attempt come
  back, it records nothing: it no longer holds the chunk.
- **lost**: `queued` chunks the broker no longer holds (it restarted empty, or a dead worker took its
  prefetched message with it) are re-sent. The broker says how many messages wait in the queue; when
  that is fewer than the ledger's queued chunks, the chunks beyond that many newest ones (queues
  deliver oldest first, so the newest are the ones still waiting), not held by a live worker and
  queued more than `lost_after` seconds ago, are sent again. A chunk re-sent needlessly costs one
  skipped delivery: its second message finds it done or held. A paused run's queued chunks are left
  alone: its workers drop their messages on purpose, and `shuttle continue` sends them again.
- **finalize**: a run whose chunks have all ended but which no coordinator closed (its message was
  lost, or its worker died) gets its coordinator started again.

Any number of sweepers may run (one per worker, one per `watch`): a queue is swept once per
`sweep_interval` by whichever sweeper claims the turn in the ledger, a transaction-level advisory lock
per queue keeps two from acting at once, and every rule is safe to apply twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from common.broker import Broker
from common.errors import ShuttleError
from common.ledger import ChunkRecord, Ledger, chunk_record, seconds
from common.ledger_schema import chunks, events, runs, sweeps
from common.settings import Settings

log = logging.getLogger("shuttle.sweeper")
OPEN_STATES = ("queued", "running")
# A paused run's queued chunks are out of the broker on purpose (common.run_controls): never "lost".
NOT_PAUSED = runs.c.paused_at.is_(None)


@dataclass(frozen=True)
class SweepEvent:
    """One thing a sweep did, as the ledger's `events` table and `watch` show it."""

    run_id: str
    chunk_id: str | None
    kind: str  # stale | lost | finalize
    detail: str


class Sweeper:
    """Applies the three rules to the runs of one broker queue."""

    def __init__(self, ledger: Ledger, broker: Broker, settings: Settings) -> None:
        self.ledger = ledger
        self.broker = broker
        self.settings = settings
        self.queue = settings.queue

    def sweep(self) -> list[SweepEvent]:
        """One pass of every rule if the queue is due; returns what it did. Ledger or broker trouble is
        left for the next pass."""
        try:
            if not self._my_turn():
                return []
        except ShuttleError as exc:
            log.warning("sweeper of queue %s: %s; trying again at the next sweep", self.queue, exc)
            return []
        done: list[SweepEvent] = []
        for rule in (self._stale, self._lost, self._unfinalized):
            try:
                done += rule()
            except ShuttleError as exc:
                log.warning("sweeper of queue %s: %s; trying again at the next sweep", self.queue, exc)
        return done

    # -- the rules -------------------------------------------------------------------------------

    def _stale(self) -> list[SweepEvent]:
        silent = sa.extract("epoch", sa.func.now() - sa.func.coalesce(chunks.c.heartbeat_at, chunks.c.started_at))
        with self.ledger.transaction() as conn:
            if not self._locked(conn):
                return []
            rows = conn.execute(
                sa.select(chunks, runs.c.status.label("run_status"), silent.label("silent_s")).join(runs)
                .where(runs.c.status.in_(("running", "cancelled")), runs.c.finished_at.is_(None),
                       runs.c.queue == self.queue, chunks.c.state == "running", silent > self.settings.stale_after)
                .with_for_update(of=chunks, skip_locked=True)).mappings().all()
            found = [(chunk_record(r), f"worker {r['worker']} silent for {float(r['silent_s']):.0f}s; sent again")
                     for r in rows if r["run_status"] == "running"]
            dropped = [(chunk_record(r), f"worker {r['worker']} silent for {float(r['silent_s']):.0f}s; "
                        "cancelled with its run") for r in rows if r["run_status"] == "cancelled"]
            self._requeue(conn, found, "stale")
            self._requeue(conn, dropped, "stale", state="cancelled")
        return self._send(found, "stale") + [SweepEvent(c.run_id, c.chunk_id, "stale", d) for c, d in dropped]

    def _lost(self) -> list[SweepEvent]:
        waiting = self._queued_counts()
        if waiting is None:
            return []
        total, overdue = waiting
        if not overdue:
            return []
        depth = self.broker.queue_depth()
        if depth is None or depth >= total:
            return []
        # Queues deliver oldest first: the `depth` newest queued chunks are taken to be the ones waiting.
        overdue = chunks.c.queued_at < sa.func.now() - seconds(self.settings.lost_after)
        beyond = (sa.select(chunks.c.chunk_id).join(runs)
                  .where(runs.c.status == "running", runs.c.queue == self.queue, chunks.c.state == "queued",
                         NOT_PAUSED)
                  .order_by(chunks.c.queued_at.desc(), chunks.c.seq.desc()).offset(depth).subquery())
        with self.ledger.reading() as conn:
            candidates = conn.execute(sa.select(chunks.c.chunk_id).where(
                chunks.c.chunk_id.in_(sa.select(beyond.c.chunk_id)), overdue)).scalars().all()
        held = self.broker.held_by_workers(candidates)
        if held is None:
            return []
        with self.ledger.transaction() as conn:
            if not self._locked(conn):
                return []
            rows = conn.execute(sa.select(chunks).where(
                chunks.c.chunk_id.in_([c for c in candidates if c not in held]), chunks.c.state == "queued",
                overdue).with_for_update(skip_locked=True)).mappings().all()
            found = [(chunk_record(r), f"not in the broker ({depth} messages wait for {total} queued chunks); "
                      "sent again") for r in rows]
            self._requeue(conn, found, "lost")
        return self._send(found, "lost")

    def _unfinalized(self) -> list[SweepEvent]:
        open_chunks = sa.select(chunks.c.chunk_id).where(chunks.c.run_id == runs.c.run_id,
                                                         chunks.c.state.in_(OPEN_STATES))
        overdue = sa.func.now() - seconds(self.settings.finalize_stale_after)
        with self.ledger.transaction() as conn:
            if not self._locked(conn):
                return []
            claimed = conn.execute(
                runs.update().where(
                    runs.c.status.in_(("running", "cancelled")), runs.c.finished_at.is_(None),
                    runs.c.queue == self.queue, ~sa.exists(open_chunks),
                    sa.or_(runs.c.finalize_enqueued.is_(False), runs.c.finalize_enqueued_at.is_(None),
                           runs.c.finalize_enqueued_at < overdue))
                .values(finalize_enqueued=True, finalize_enqueued_at=sa.func.now())
                .returning(runs.c.run_id)).scalars().all()
            found = [SweepEvent(run_id, None, "finalize", "every chunk ended but the run was not closed; "
                                "coordinator started") for run_id in claimed]
            if found:
                conn.execute(events.insert(), [vars(e) for e in found])
        for event in found:
            log.warning("Sweeper %s: run %s: %s", self.queue, event.run_id, event.detail)
            self.broker.enqueue_finalize(event.run_id)
        return found

    # -- helpers -----------------------------------------------------------------------------------

    def _my_turn(self) -> bool:
        """Claim this queue's sweep for the current interval; False when another sweeper swept it lately."""
        stmt = pg_insert(sweeps).values(queue=self.queue, swept_at=sa.func.now())
        with self.ledger.transaction() as conn:
            return conn.execute(stmt.on_conflict_do_update(
                index_elements=[sweeps.c.queue], set_={"swept_at": sa.func.now()},
                where=sweeps.c.swept_at <= sa.func.now() - seconds(self.settings.sweep_interval * 0.9))
                .returning(sweeps.c.queue)).first() is not None

    def _locked(self, conn: sa.Connection) -> bool:
        """One sweeper acts on a queue at a time; the others skip this pass."""
        return bool(conn.execute(sa.select(sa.func.pg_try_advisory_xact_lock(
            sa.func.hashtext(f"shuttle.sweeper:{self.queue}")))).scalar())

    def _queued_counts(self) -> tuple[int, int] | None:
        """(queued chunks of the queue's running runs, of which queued more than `lost_after` ago)."""
        overdue = chunks.c.queued_at < sa.func.now() - seconds(self.settings.lost_after)
        with self.ledger.reading() as conn:
            total, late = conn.execute(
                sa.select(sa.func.count(), sa.func.count().filter(overdue)).select_from(chunks.join(runs))
                .where(runs.c.status == "running", runs.c.queue == self.queue, chunks.c.state == "queued",
                       NOT_PAUSED)).one()
        return int(total), int(late)

    @staticmethod
    def _requeue(conn: sa.Connection, found: list[tuple[ChunkRecord, str]], kind: str, state: str = "queued") -> None:
        """Give the chunks up from their attempts (queued again, or cancelled with their run), with an event each."""
        if not found:
            return
        conn.execute(chunks.update().where(chunks.c.chunk_id.in_([c.chunk_id for c, _ in found])).values(
            state=state, attempt=None, heartbeat_at=None, queued_at=sa.func.now()))
        conn.execute(events.insert(), [dict(run_id=c.run_id, chunk_id=c.chunk_id, kind=kind, detail=detail)
                                       for c, detail in found])

    def _send(self, found: list[tuple[ChunkRecord, str]], kind: str) -> list[SweepEvent]:
        """Send the re-queued chunks; if the broker fails, they stay queued and the `lost` rule sends them."""
        by_run: dict[str, list[ChunkRecord]] = {}
        for chunk, detail in found:
            log.warning("Sweeper %s: chunk %s %s", self.queue, chunk.chunk_id, detail)
            by_run.setdefault(chunk.run_id, []).append(chunk)
        for run_id, run_chunks in by_run.items():
            self.broker.enqueue_chunks(run_id, run_chunks)
        return [SweepEvent(c.run_id, c.chunk_id, kind, detail) for c, detail in found]

