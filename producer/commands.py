"""One public function per CLI command, each taking the settings first (no global state).

They do the work and return data; `producer.cli` parses flags and prints.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterator

from common.errors import ConfigError, ServiceUnavailable
from common.ledger import Ledger, RunRecord
from common.declarative.catalogue import declared_urls, migration_for, migration_of_options
from common.migrations import Migration
from common.migrations.base import Check, Selection
from common.report import RUNNING, build_report, close_run
from common.service_errors import reword_database_failure
from common.settings import Settings
from common.urls import with_password
from common.broker import Broker
from common import run_controls
from common.run_controls import RunControls
from common.source_load import SourceLoad, check_probe
from producer.planner import Plan, make_plan, record_run


@contextmanager
def open_ledger(settings: Settings) -> Iterator[Ledger]:
    ledger = Ledger(settings.ledger_url)
    try:
        ledger.ensure_schema()
        yield ledger
    finally:
        ledger.dispose()


@contextmanager
def open_migration(settings: Settings, name: str, options: dict[str, Any] | None = None,
                   source_url: str | None = None, target_url: str | None = None) -> Iterator[Migration]:
    """The migration with the URLs from flags, its migration file, config file or environment, in that order."""
    cls = migration_for(name, settings.migrations_dir)
    name = cls.name  # a migration file's path names the migration its [migration] name says
    default_source, default_target = settings.urls_for(name)
    file_source, file_target = declared_urls(cls)
    source, target = source_url or file_source or default_source, target_url or file_target or default_target
    for role, url in (("source", source), ("target", target)):
        if not url:
            raise ConfigError(f"no {role} URL for migration '{name}': pass --{role}-url, set "
                              f"SHUTTLE_{role.upper()}_URL, or add {role}_url to [migrations.{name}] in the config file")
    migration = cls(source, target, options if options is not None else cls.plan_options())
    try:
        yield migration
    finally:
        migration.close()


@contextmanager
def migration_of_run(settings: Settings, run: RunRecord) -> Iterator[Migration]:
    """The run's migration, pointed where the run recorded, with passwords from this process's settings."""
    known = settings.known_urls()
    migration = migration_of_options(run.migration, run.options)(
        with_password(run.source_url or "", known), with_password(run.target_url or "", known), run.options)
    try:
        yield migration
    finally:
        migration.close()


def check_services(migration: Migration) -> None:
    """The migration's own check, its errors naming the setting that holds the failing URL."""
    try:
        migration.check_services()
    except ServiceUnavailable as exc:
        raise reword_database_failure(exc, migration.name) from None


def require_run(ledger: Ledger, run_id: str) -> RunRecord:
    run = ledger.get_run(run_id)
    if run is None:
        recent = ", ".join(r.run_id for r in ledger.latest_runs(5)) or "none yet"
        raise ConfigError(f"run '{run_id}' is not in the ledger; recent runs: {recent} (see `shuttle status`)")
    return run


def plan(settings: Settings, name: str, selection: Selection, chunk_rows: int, **flags: Any) -> Plan:
    """The dry run: counts and chunks; writes nothing to the target or the ledger."""
    options = migration_for(name, settings.migrations_dir).plan_options(**flags)
    with open_migration(settings, name, options, flags.get("source_url"), flags.get("target_url")) as migration:
        check_services(migration)
        return make_plan(migration, selection, chunk_rows)


def measured_rate(settings: Settings, name: str) -> tuple[float, int] | None:
    """Rows per second per worker process measured on the migration's past completed runs in the ledger,
    and over how many runs; None when there are none (or no ledger yet: a plan creates nothing)."""
    ledger = Ledger(settings.ledger_url)
    try:
        return ledger.measured_rate(name)
    except Exception:  # noqa: BLE001 - no ledger, no schema yet, or unreachable: the plan says it has no measure
        return None
    finally:
        ledger.dispose()


def start_run(settings: Settings, name: str, selection: Selection, chunk_rows: int, max_rejects: int | None,
              max_rows_per_second: float | None = None, max_source_load: SourceLoad | None = None,
              **flags: Any) -> RunRecord:
    """Plan, record the plan in the ledger, prepare the target, enqueue one task per chunk.

    Run controls are stored before the first chunk is sent, so no chunk ever runs without them; a
    source-load probe is tried once on the source first."""
    options = migration_for(name, settings.migrations_dir).plan_options(**flags)
    with open_ledger(settings) as ledger, \
            open_migration(settings, name, options, flags.get("source_url"), flags.get("target_url")) as migration:
        broker = Broker(settings)
        broker.check_reachable()
        check_services(migration)
        if max_source_load is not None:
            if migration.source_kind != "postgres":
                raise ConfigError(f"--max-source-load needs a PostgreSQL source; {name} reads {migration.source_kind}")
            check_probe(migration.source_url, max_source_load)
        the_plan = make_plan(migration, selection, chunk_rows)
        migration.prepare_target()
        run = record_run(ledger, the_plan, migration.source_url, migration.target_url, max_rejects, settings.queue)
        if max_rows_per_second is not None:
            run_controls.set_max_rows_per_second(ledger, run.run_id, max_rows_per_second)
        if max_source_load is not None:
            run_controls.set_source_load(ledger, run.run_id, max_source_load)
        queued = ledger.chunks_of(run.run_id)
        broker.enqueue_chunks(run.run_id, queued)
        if not queued:
            finalize_here(settings, ledger, run.run_id)
        return run


def finalize_here(settings: Settings, ledger: Ledger, run_id: str) -> dict[str, Any]:
    """Run the coordinator in this process (a run with nothing left for workers to do)."""
    run = require_run(ledger, run_id)
    with migration_of_run(settings, run) as migration:
        return close_run(ledger, run, migration, build_report(ledger, run, migration))


def report(settings: Settings, run_id: str, refresh: bool = False) -> dict[str, Any]:
    """The stored report of a finished run, or one built now from the ledger and the target."""
    with open_ledger(settings) as ledger:
        run = require_run(ledger, run_id)
        stored = ledger.get_report(run_id)
        if stored is not None and not refresh:
            return stored
        with migration_of_run(settings, run) as migration:
            built = build_report(ledger, run, migration)
            if built["verdict"] == RUNNING:
                return built
            return close_run(ledger, run, migration, built)


def cancel(settings: Settings, run_id: str) -> int:
    """Skip every queued chunk; running chunks finish their transaction. Returns chunks skipped.

    Needs the ledger alone: when nothing is left running, the coordinator is sent to the workers (and
    if the broker is away, a sweeper starts it later), so no source or target password is needed here."""
    with open_ledger(settings) as ledger:
        run = require_run(ledger, run_id)
        skipped = ledger.cancel(run_id)
        if ledger.claim_finalize(run_id):
            broker = Broker(settings.model_copy(update={"queue": run.queue}))
            try:
                broker.enqueue_finalize(run_id)
            except ServiceUnavailable:
                pass  # the ledger says the coordinator is due: the sweeper of a worker or a `watch` starts it
            finally:
                broker.close()
        return skipped


@dataclass(frozen=True)
class Resumed:
    requeued: int  # chunks enqueued again
    left_running: int  # chunks whose attempt's heartbeat is fresh: they finish and record themselves


def resume(settings: Settings, run_id: str) -> Resumed:
    """Enqueue again every chunk that is not done, stale `running` ones included; a chunk whose attempt
    is alive (fresh heartbeat) is left to finish rather than run a second time."""
    with open_ledger(settings) as ledger:
        run = require_run(ledger, run_id)
        broker = Broker(settings.model_copy(update={"queue": run.queue}))
        broker.check_reachable()
        queued, left_running = ledger.reopen(run_id, settings.stale_after)
        broker.enqueue_chunks(run_id, queued)
        if not queued and ledger.claim_finalize(run_id):
            finalize_here(settings, ledger, run_id)
        return Resumed(requeued=len(queued), left_running=left_running)


KEEP = object()  # `throttle`: leave this control as it is


def throttle(settings: Settings, run_id: str, limit: float | None | object = KEEP,
             source_load: SourceLoad | None | object = KEEP) -> RunControls:
    """Set or lift (None) the run's shared row rate and its source-load bound; live chunks follow within
    a second or two (a new bound's probe within a few more)."""
    with open_ledger(settings) as ledger:
        run = require_run(ledger, run_id)
        if isinstance(source_load, SourceLoad):
            with migration_of_run(settings, run) as migration:
                if migration.source_kind != "postgres":
                    raise ConfigError(f"--max-source-load needs a PostgreSQL source; {run.migration} reads "
                                      f"{migration.source_kind}")
                check_probe(migration.source_url, source_load)
        if limit is not KEEP:
            run_controls.set_max_rows_per_second(ledger, run_id, limit)
        if source_load is not KEEP:
            run_controls.set_source_load(ledger, run_id, source_load)
        return run_controls.read_controls(ledger, run_id)


def pause(settings: Settings, run_id: str) -> int:
    """Stop handing out the run's chunks (held by the ledger); returns the chunks still running, which finish."""
    with open_ledger(settings) as ledger:
        run = require_run(ledger, run_id)
        if run.finished_at is not None or run.status != "running":
            raise ConfigError(f"run {run_id} is {run.status}, not running; only a running run can be paused")
        return run_controls.pause(ledger, run_id)


@dataclass(frozen=True)
class Continued:
    was_paused: bool
    requeued: int  # queued chunks sent again (their messages were dropped while the run was paused)
    broker_error: str | None = None  # the broker was away: the sweeper sends them once it is back


def continue_run(settings: Settings, run_id: str) -> Continued:
    """Hand a paused run's chunks out again: clear the pause in the ledger, then send every queued chunk.

    A chunk whose message is still in the broker is then delivered twice; the second delivery finds it
    held or done and is skipped. If the broker is away, the chunks stay queued in the ledger and the
    sweeper sends them once it is back (the run is no longer paused, so they count as lost)."""
    with open_ledger(settings) as ledger:
        run = require_run(ledger, run_id)
        was_paused = run_controls.unpause(ledger, run_id)
        if run.status != "running":
            return Continued(was_paused, 0)
        queued = ledger.chunks_of(run_id, states=["queued"])
        broker = Broker(settings.model_copy(update={"queue": run.queue}))
        try:
            return Continued(was_paused, broker.enqueue_chunks(run_id, queued))
        except ServiceUnavailable as exc:
            return Continued(was_paused, 0, str(exc))
        finally:
            broker.close()


def controls(settings: Settings, run_id: str) -> RunControls | None:
    with open_ledger(settings) as ledger:
        return run_controls.read_controls(ledger, run_id)


def verify(settings: Settings, run_id: str) -> list[Check]:
    """Recount source and target per partition and record the result (purge relies on it)."""
    with open_ledger(settings) as ledger:
        run = require_run(ledger, run_id)
        progress = ledger.progress(run_id)
        if not progress.finished:
            raise ConfigError(f"run {run_id} is still running; verify it once `shuttle status {run_id}` shows it ended")
        groups = ledger.partition_totals(run_id)
        rejected: dict[str, int] = defaultdict(int)
        for group in groups:
            rejected[group["partition"]] += group["rows_rejected"]
        partitions = sorted({p for rows in run.options.get("planned", {}).values() for p in rows})
        with migration_of_run(settings, run) as migration:
            checks = migration.verify(Selection.from_dict(run.selection), partitions, dict(rejected))
        incomplete = {g["partition"] for g in groups if set(g["chunks"]) - {"done"}}
        checks = [c if c.partition not in incomplete else
                  Check(c.entity, c.partition, False, c.source_rows, c.target_rows, c.rejected_rows,
                        "some chunks of this partition did not finish") for c in checks]
        ledger.save_verification(run_id, [
            {"entity": c.entity, "partition": c.partition, "source_rows": c.source_rows,
             "target_rows": c.target_rows, "rejected_rows": c.rejected_rows, "ok": c.ok, "detail": c.detail}
            for c in checks])
        return checks


def purge(settings: Settings, name: str, partitions: Sequence[str] | None, before: datetime | None,
          dry_run: bool, confirm: Callable[[str], bool]) -> dict[str, int | str]:
    """Delete migrated source rows of verified partitions only; rejected rows are kept."""
    with open_ledger(settings) as ledger:
        verified = ledger.verified_partitions(name)
        wanted = list(partitions) if partitions is not None else sorted(verified)
        unverified = sorted(set(wanted) - set(verified))
        if unverified:
            raise ConfigError(f"refusing to purge {len(unverified)} partitions that no completed run has verified: "
                              f"{', '.join(unverified)}; run `shuttle run {name}` and `shuttle verify RUN` first")
        if not wanted:
            raise ConfigError(f"nothing to purge: no partition of '{name}' has been verified yet")
        by_run: dict[str, list[str]] = defaultdict(list)
        for partition in wanted:
            by_run[verified[partition]].append(partition)
        what = f"archived rows {'before ' + before.isoformat() if before else 'of every date'} " \
               f"for {len(wanted)} verified partitions"
        if not dry_run and not confirm(f"Delete {what}? This cannot be undone"):
            raise ConfigError("purge not confirmed; nothing was deleted (pass --yes to skip the question)")
        result: dict[str, int | str] = {}
        for run_id, run_partitions in sorted(by_run.items()):
            run = require_run(ledger, run_id)
            keep = ledger.rejected_keys([run_id], run_partitions)
            with migration_of_run(settings, run) as migration:
                if not hasattr(migration, "purge"):
                    raise ConfigError(f"migration '{name}' has no purge; its source is left as it is")
                result.update(migration.purge(run_partitions, before, keep, dry_run))
        return result


