"""`shuttle`: plan, run, watch, report, cancel, resume, verify and purge migrations.

Exit codes: 0 success (a clean verdict), 1 the work failed (verdict not clean, a service failed
mid-way), 2 usage or configuration errors (nothing was written).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from functools import wraps
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from common.broker import Broker
from common.errors import ConfigError, ShuttleError
from common.migrations.base import Selection
from common.report import in_reading_order
from common.run_controls import controls_of, parse_rate, read_controls
from common.settings import Settings, load_settings
from common.source_load import parse_source_load
from common.sweeper import Sweeper
from common.urls import mask, normalize
from producer import commands, display
from producer.progress import follow
from producer.worker_watch import WorkerWatch

MULTI_VALUE_OPTIONS = ("--deployment-ids", "--partitions", "--experiment-ids", "--user-ids", "--model-names")
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def settings_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--config and the service URLs; builds the settings once and passes them as the first argument."""
    @click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
                  help="TOML or JSON config file (overrides the environment; flags override it).")
    @click.option("--ledger-url", callback=_url_flag, help="Ledger database URL [SHUTTLE_LEDGER_URL].")
    @click.option("--broker-url", callback=_url_flag, help="Celery broker URL [SHUTTLE_BROKER_URL].")
    @wraps(func)
    def wrapper(config_file: Path | None, ledger_url: str | None, broker_url: str | None, **kwargs: Any) -> Any:
        settings = load_settings(config_file, ledger_url=ledger_url, broker_url=broker_url)
        return func(settings, **kwargs)
    return wrapper


def database_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--source-url / --target-url for commands that reach a run's databases: the run's ledger records
    where they are, without passwords; these (or the config file, the environment, PGPASSFILE) supply them."""
    @click.option("--source-url", callback=_url_flag, help="Source URL with its password, if the run's needs one "
                  "[SHUTTLE_SOURCE_URL].")
    @click.option("--target-url", callback=_url_flag, help="Target URL with its password [SHUTTLE_TARGET_URL].")
    @wraps(func)
    def wrapper(settings: Settings, *args: Any, source_url: str | None, target_url: str | None, **kwargs: Any) -> Any:
        update = {k: v for k, v in (("source_url", source_url), ("target_url", target_url)) if v}
        return func(settings.model_copy(update=update) if update else settings, *args, **kwargs)
    return wrapper


def selection_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """What to migrate and where; migration-specific flags reach the migration's `plan_options`."""
    @click.option("--deployment-ids", "--partitions", "--experiment-ids", "--user-ids", "partitions", multiple=True,
                  metavar="ID ...", callback=_ids, help="Only these partitions (deployment, experiment or user ids); "
                  "several may follow the flag, or comma-separated.")
    @click.option("--model-names", "model_names", multiple=True, metavar="NAME ...", callback=_ids,
                  help="Only these registered models (MLflow registry tables) or model names (model-files).")
    @click.option("--since", type=click.DateTime(), help="Only rows at or after this UTC time (whole hours).")
    @click.option("--until", type=click.DateTime(), help="Only rows before this UTC time (whole hours).")
    @click.option("--chunk-rows", type=click.IntRange(min=1), help="Rows per chunk at most [default 50,000].")
    @click.option("--source-url", "--postgres-uri", "source_url", callback=_url_flag,
                  help="Source URL [SHUTTLE_SOURCE_URL].")
    @click.option("--target-url", "--mongodb-uri", "target_url", callback=_url_flag,
                  help="Target URL [SHUTTLE_TARGET_URL].")
    @click.option("--source-schema", help="Schema of the source tables [public].")
    @click.option("--target-schema", help="Schema (or MongoDB database) of the target [public].")
    @click.option("--batch-size", type=click.IntRange(min=1), help="Rows per write batch inside a chunk.")
    @click.option("--only-missing", is_flag=True, help="Fill only what the target lacks (where the migration supports it).")
    @click.option("--sample", type=click.IntRange(min=0), help="Rows to compare field by field in the report.")
    @click.option("--keep-deleted", is_flag=True,
                  help="Keep target rows whose source rows are gone (append-only targets); default: delete them.")
    @click.option("--recompute", is_flag=True, help="Recompute every chunk, even one whose fingerprints match.")
    @click.option("--option", "extra_options", multiple=True, metavar="KEY=VALUE",
                  help="A migration-specific option (see the README's catalogue).")
    @wraps(func)
    def wrapper(*args: Any, partitions: tuple[str, ...], model_names: tuple[str, ...], since: datetime | None,
                until: datetime | None, extra_options: tuple[str, ...], **kwargs: Any) -> Any:
        selection = Selection(partitions=partitions or None, since=_utc(since), until=_utc(until),
                              model_names=model_names or None)
        for item in extra_options:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise click.BadParameter(f"{item!r}: use KEY=VALUE", param_hint="--option")
            kwargs.setdefault("options", {})[key.replace("-", "_")] = value
        return func(*args, selection=selection, **kwargs)
    return wrapper


def files_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Flags of the files source (`model-files`); they reach the migration's `plan_options`."""
    @click.option("--max-file-mb", type=click.FloatRange(min=0, min_open=True),
                  help="model-files: files larger than this are rejects, not read [1000, the most PostgreSQL stores].")
    @click.option("--name-pattern", metavar="PATTERN",
                  help="model-files: how file names give name, event and type [{name}__{event}__{model_type}.{ext}].")
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)
    return wrapper


def _defaults_from(settings: Settings, flags: dict[str, Any]) -> None:
    """--batch-size and --sample from the config file or environment when the flags are absent."""
    for key in ("batch_size", "sample"):
        if flags.get(key) is None and getattr(settings, key) is not None:
            flags[key] = getattr(settings, key)


def _ids(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """The ids of a selection flag, split on commas; an empty one is refused, never read as "all".

    `--deployment-ids "$IDS"` with an empty variable, `--partitions ,` or `a,,b` would otherwise
    select fewer ids than meant, or every partition when none is left.
    """
    ids = tuple(part for value in values for part in value.split(","))
    if any(not part.strip() for part in ids):
        shown = ", ".join(repr(value) for value in values)
        noun = "name" if param.name == "model_names" else "id"
        raise click.BadParameter(f"an empty {noun} in {shown}; give each {noun} (several after the flag, or "
                                 "comma-separated), or leave the flag out to select every partition",
                                 ctx=ctx, param=param)
    return ids


def _url_flag(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A URL flag in the one form Shuttle handles; refused (one `FAILED:` line naming the flag) otherwise.

    An empty value (an unset shell variable) is refused too: falling back to the environment's URL
    would point the command somewhere the user did not say.
    """
    if value is None:
        return None
    what = " / ".join(param.opts)
    if not value.strip():
        raise ConfigError(f"{what} is empty; give a URL, or leave the flag out to use the configured one")
    if param.name == "broker_url":  # kombu's failover list: URLs separated by `;`
        return ";".join(normalize(part, what) for part in value.split(";"))
    return normalize(value, what)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, envvar="SHUTTLE_DEBUG", help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Shuttle: distributed, idempotent migrations of ML-platform data."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@settings_options
def migrations(settings: Settings, as_json: bool) -> None:
    """List the migrations in the catalogue, and the migration files of SHUTTLE_MIGRATIONS_DIR."""
    if as_json:
        click.echo(json.dumps(display.migrations_data(settings.migrations_dir), indent=2))
    else:
        display.show_migrations(console, settings.migrations_dir)


@cli.command()
@click.argument("migration")
@selection_options
@files_options
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Worker processes to estimate the time for.")
@settings_options
def plan(settings: Settings, migration: str, selection: Selection, chunk_rows: int | None, workers: int,
         **flags: Any) -> None:
    """Dry run: counts per partition, chunks and estimated time; writes nothing."""
    _defaults_from(settings, flags)
    the_plan = commands.plan(settings, migration, selection, chunk_rows or settings.chunk_rows, **flags)
    display.show_plan(console, the_plan, workers, commands.measured_rate(settings, migration))


@cli.command()
@click.argument("migration")
@selection_options
@files_options
@click.option("--max-rejects", type=click.IntRange(min=0), help="Fail the run when more rows than this are rejected.")
@click.option("--reenable-drift-tracking", is_flag=True, help="modmon: re-enable drift tracking after a clean run.")
@click.option("--wait", is_flag=True, help="Show live progress, then the report; exit 0 only on a clean verdict.")
@click.option("--json", "as_json", is_flag=True, help="With --wait, print the report as JSON.")
@click.option("--dry-run", is_flag=True, help="Only show the plan (as `shuttle plan`); write nothing.")
@click.option("--max-rows-per-second", type=click.FloatRange(min=0, min_open=True), metavar="N",
              help="Rows per second all workers of the run read together at most; `shuttle throttle` changes it.")
@click.option("--max-source-load", metavar="SQL:BOUND",
              help="Hold chunks while this read-only query on a PostgreSQL source answers more than BOUND.")
@settings_options
def run(settings: Settings, migration: str, selection: Selection, chunk_rows: int | None, max_rejects: int | None,
        wait: bool, as_json: bool, dry_run: bool, max_rows_per_second: float | None, max_source_load: str | None,
        **flags: Any) -> None:
    """Plan, record and enqueue a run; with --wait follow it to its report."""
    _defaults_from(settings, flags)
    if dry_run or settings.dry_run:
        display.show_plan(console, commands.plan(settings, migration, selection, chunk_rows or settings.chunk_rows,
                                                 **flags), 2, commands.measured_rate(settings, migration))
        return
    _warn_of_long_throttled_chunks(settings, chunk_rows or settings.chunk_rows, max_rows_per_second)
    record = commands.start_run(settings, migration, selection, chunk_rows or settings.chunk_rows,
                                max_rejects if max_rejects is not None else settings.max_rejects,
                                max_rows_per_second=max_rows_per_second,
                                max_source_load=parse_source_load(max_source_load) if max_source_load else None,
                                **flags)
    err_console.print(f"run [bold]{record.run_id}[/]: {record.total_rows:,} rows in {record.chunk_count} chunks "
                      f"enqueued; watch in Flower at {mask(settings.flower_url)} or with `shuttle watch {record.run_id}`",
                      soft_wrap=True)
    if wait:
        _follow_and_exit(settings, record.run_id, as_json)
    console.print(record.run_id)


def _warn_of_long_throttled_chunks(settings: Settings, chunk_rows: int, limit: float | None) -> None:
    """A chunk that takes longer than the visibility timeout would be handed to a second worker meanwhile."""
    if limit is not None and chunk_rows / limit > settings.visibility_timeout / 2:
        err_console.print(f"[yellow]warning:[/] at {limit:,.0f} rows/s a chunk of {chunk_rows:,} rows takes "
                          f"{chunk_rows / limit / 60:,.0f} min, near the visibility timeout "
                          f"({settings.visibility_timeout / 60:,.0f} min); pass a smaller --chunk-rows", soft_wrap=True)


@cli.command()
@click.argument("run_id", required=False)
@settings_options
def status(settings: Settings, run_id: str | None) -> None:
    """Recent runs, or where one run stands."""
    with commands.open_ledger(settings) as ledger:
        if run_id is None:
            recent = ledger.latest_runs()
            ids = [r.run_id for r in recent]
            display.show_runs(console, recent, ledger.verdicts(ids), controls_of(ledger, ids))
            return
        run = commands.require_run(ledger, run_id)
        display.show_progress(console, run, ledger.progress(run_id), ledger.verdicts([run_id]).get(run_id),
                              read_controls(ledger, run_id))
        for chunk in ledger.failed_chunks(run_id)[:10]:
            console.print(f"  failed {chunk['chunk_id']}: {escape(chunk['error'] or '')}", soft_wrap=True)


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
@settings_options
@database_options
def watch(settings: Settings, run_id: str, as_json: bool) -> None:
    """Follow a run's progress live until it ends, then print its report."""
    _follow_and_exit(settings, run_id, as_json)


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--refresh", is_flag=True, help="Rebuild the report from the ledger and the target now.")
@settings_options
@database_options
def report(settings: Settings, run_id: str, as_json: bool, refresh: bool) -> None:
    """The report of a run: counts per entity and partition, rejects, timings, verdict."""
    body = commands.report(settings, run_id, refresh=refresh)
    _print_report(body, as_json)
    sys.exit(0 if body["verdict"] == "clean" else 1)


@cli.command()
@click.argument("run_id")
@click.option("--into", metavar="COLLECTION", help="Rebuild into this collection [the split's source collection].")
@click.option("--verify", is_flag=True, help="Compare every rebuilt document with its original, field by field and "
              "type by type, before writing it; one that differs is not written and fails the run.")
@click.option("--chunk-rows", type=click.IntRange(min=1), help="Documents per chunk at most [default 50,000].")
@click.option("--batch-size", type=click.IntRange(min=1), help="Documents per write batch inside a chunk.")
@click.option("--max-rejects", type=click.IntRange(min=0), help="Fail the run when more documents are rejected.")
@click.option("--wait", is_flag=True, help="Show live progress, then the report; exit 0 only on a clean verdict.")
@click.option("--json", "as_json", is_flag=True, help="With --wait, print the report as JSON.")
@settings_options
def rollback(settings: Settings, run_id: str, into: str | None, verify: bool, chunk_rows: int | None,
             batch_size: int | None, max_rejects: int | None, wait: bool, as_json: bool) -> None:
    """Undo a userdata-split run: rebuild user_data documents from the two new collections, as a run."""
    from producer.rollback import start_rollback

    record = start_rollback(settings, run_id, into, verify, chunk_rows or settings.chunk_rows,
                            max_rejects if max_rejects is not None else settings.max_rejects,
                            batch_size or settings.batch_size)
    err_console.print(f"run [bold]{record.run_id}[/] (rollback of {run_id}): {record.total_rows:,} documents in "
                      f"{record.chunk_count} chunks enqueued; `shuttle watch {record.run_id}` follows it")
    if wait:
        _follow_and_exit(settings, record.run_id, as_json)
    console.print(record.run_id)


@cli.command()
@click.argument("run_id")
@settings_options
def cancel(settings: Settings, run_id: str) -> None:
    """Cancel a run: queued chunks are skipped, running ones finish their transaction."""
    skipped = commands.cancel(settings, run_id)
    console.print(f"run {run_id} cancelled: {skipped} queued chunks will be skipped; "
                  f"`shuttle resume {run_id}` continues it")


@cli.command()
@click.argument("run_id")
@click.argument("rows_per_second", metavar="[N|off]", required=False)
@click.option("--max-source-load", metavar="SQL:BOUND|off", help="Set or lift the run's source-load bound.")
@settings_options
@database_options
def throttle(settings: Settings, run_id: str, rows_per_second: str | None, max_source_load: str | None) -> None:
    """Change a run's shared row rate while it runs: N rows per second for all its workers, or `off`."""
    if rows_per_second is None and max_source_load is None:
        raise click.UsageError("give a rate (N or off), --max-source-load SQL:BOUND|off, or both")
    changes: dict[str, Any] = {}
    if rows_per_second is not None:
        changes["limit"] = parse_rate(rows_per_second)
    if max_source_load is not None:
        changes["source_load"] = None if max_source_load.strip().lower() == "off" else \
            parse_source_load(max_source_load)
    controls = commands.throttle(settings, run_id, **changes)
    limit = controls.max_rows_per_second if controls else None
    console.print(f"run {run_id}: " + (f"throttled to {limit:,.0f} rows/s across all its workers" if limit
                                       else "no row limit") + "; running chunks follow within a second or two")
    if controls is not None and controls.source_load is not None:
        console.print(f"held while the source load is over {controls.source_load.bound:g}: "
                      f"{escape(controls.source_load.probe)}", soft_wrap=True)


@cli.command()
@click.argument("run_id")
@settings_options
def pause(settings: Settings, run_id: str) -> None:
    """Pause a run: no chunk is handed out until `shuttle continue`; running chunks finish."""
    running = commands.pause(settings, run_id)
    console.print(f"run {run_id} paused: no chunk is handed out; {running} running chunk"
                  f"{'s' if running != 1 else ''} finish; `shuttle continue {run_id}` goes on")


@cli.command(name="continue")
@click.argument("run_id")
@click.option("--wait", is_flag=True, help="Follow the run to its report.")
@click.option("--json", "as_json", is_flag=True, help="With --wait, print the report as JSON.")
@settings_options
def continue_(settings: Settings, run_id: str, wait: bool, as_json: bool) -> None:
    """Continue a paused run: its queued chunks are sent again and handed out."""
    continued = commands.continue_run(settings, run_id)
    state = "continued" if continued.was_paused else "was not paused"
    sent = f"{continued.requeued} queued chunks sent again" if continued.broker_error is None else \
        f"the broker is away ({continued.broker_error}); a sweeper sends the queued chunks once it is back"
    err_console.print(f"run {run_id} {state}: {sent}", soft_wrap=True)
    if wait:
        _follow_and_exit(settings, run_id, as_json)


@cli.command()
@click.argument("run_id")
@click.option("--wait", is_flag=True, help="Follow the resumed run to its report.")
@click.option("--json", "as_json", is_flag=True, help="With --wait, print the report as JSON.")
@settings_options
def resume(settings: Settings, run_id: str, wait: bool, as_json: bool) -> None:
    """Enqueue again every chunk of a run that is not done (failed, cancelled, lost, stale).

    A chunk whose worker is alive (a fresh heartbeat) is left to finish, not run twice. Runs heal from
    lost workers and brokers by themselves; resume is for cancelled and failed runs."""
    resumed = commands.resume(settings, run_id)
    left = f"; {resumed.left_running} still running (their workers are alive), left to finish" \
        if resumed.left_running else ""
    err_console.print(f"run {run_id}: {resumed.requeued} chunks enqueued again{left}")
    controls = commands.controls(settings, run_id)
    if controls is not None and controls.paused:
        err_console.print(f"[yellow]run {run_id} is paused:[/] its chunks wait; `shuttle continue {run_id}` hands "
                          "them out", soft_wrap=True)
    if wait:
        _follow_and_exit(settings, run_id, as_json)


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@settings_options
@database_options
def verify(settings: Settings, run_id: str, as_json: bool) -> None:
    """Recount source and target per partition and record the result (purge requires it)."""
    checks = commands.verify(settings, run_id)
    if as_json:
        click.echo(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        display.show_checks(console, checks)
    sys.exit(0 if all(c.ok for c in checks) else 1)


@cli.command()
@click.argument("migration")
@click.option("--all", "purge_all", is_flag=True, help="Purge every date.")
@click.option("--before", type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
              help="Purge only rows before this UTC date.")
@click.option("--deployment-ids", "--partitions", "partitions", multiple=True, metavar="ID ...", callback=_ids,
              help="Only these partitions (default: every verified one).")
@click.option("--dry-run", is_flag=True, help="Count what would be purged; delete nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@settings_options
@database_options
def purge(settings: Settings, migration: str, purge_all: bool, before: datetime | None,
          partitions: tuple[str, ...], dry_run: bool, yes: bool) -> None:
    """Delete migrated source rows, only for partitions whose migration completed and verified."""
    if purge_all == (before is not None):
        raise click.UsageError("give exactly one of --all or --before DATE")
    ids = partitions or None
    interactive = sys.stdin.isatty()

    def confirm(question: str) -> bool:
        return yes or (interactive and click.confirm(question, default=False))

    result = commands.purge(settings, migration, ids, _utc(before), dry_run, confirm)
    verb = "would purge" if dry_run else "purged"
    total = 0
    for partition, outcome in sorted(result.items()):
        if isinstance(outcome, int):
            total += outcome
            console.print(f"{partition}: {verb} {outcome:,} rows")
        else:
            console.print(f"{partition}: {outcome}")
    console.print(f"{verb} {total:,} rows in total")
    sys.exit(0 if all(isinstance(v, int) for v in result.values()) else 1)


@cli.group()
def models() -> None:
    """Browse and manage the versioned `models` table (the target of `model-files`)."""


def models_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Where the table is: --target-url (else model-files' target URL from the config), --table."""
    @click.option("--target-url", help="The models database [model-files' target URL, SHUTTLE_TARGET_URL].")
    @click.option("--table", default="models", show_default=True, help="Table, optionally schema.models.")
    @wraps(func)
    def wrapper(settings: Settings, target_url: str | None, table: str, **kwargs: Any) -> Any:
        url = target_url or settings.urls_for("model-files")[1]
        if not url:
            raise ConfigError("no models database: pass --target-url, set SHUTTLE_TARGET_URL, or add target_url "
                              "to [migrations.model-files] in the config file")
        return func(url, table, **kwargs)
    return wrapper


@models.command("list")
@click.option("--name", help="Only this model name.")
@click.option("--all-versions", is_flag=True, help="Every version, not only the active ones.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@settings_options
@models_options
def models_list(url: str, table: str, name: str | None, all_versions: bool, as_json: bool) -> None:
    """Stored models: the active version of each, or every version."""
    from common.models_api import list_versions

    versions = [v for v in list_versions(url, name, table=table) if all_versions or v.is_active]
    _print_versions(versions, as_json, f"{'Versions' if all_versions else 'Active versions'} in {table}")


@models.command("show")
@click.argument("name")
@click.option("--event", help="Only this event.")
@click.option("--model-type", help="Only this model type.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@settings_options
@models_options
def models_show(url: str, table: str, name: str, event: str | None, model_type: str | None, as_json: bool) -> None:
    """Every version of one model name, active or not, with size, hash and source file."""
    from common.models_api import list_versions

    versions = list_versions(url, name, event, model_type, table=table)
    if not versions:
        raise ConfigError(f"no versions of model {name!r} in {table}; `shuttle models list` shows the names")
    _print_versions(versions, as_json, f"{name} in {table}")


@models.command("deactivate")
@click.argument("name")
@click.argument("event")
@click.argument("model_type")
@click.argument("version", type=click.IntRange(min=1))
@settings_options
@models_options
def models_deactivate(url: str, table: str, name: str, event: str, model_type: str, version: int) -> None:
    """Deactivate one version (kept in the table); loading then falls back to the latest active one."""
    from common.models_api import ModelNotFound, deactivate_model

    try:
        was_active = deactivate_model(url, name, event, model_type, version, table=table)
    except ModelNotFound as exc:
        raise ConfigError(str(exc)) from None
    console.print(f"{name} {event} {model_type} version {version}: "
                  + ("deactivated" if was_active else "already inactive, unchanged"))


def _print_versions(versions: list, as_json: bool, title: str) -> None:
    if as_json:
        click.echo(json.dumps([v.as_dict() for v in versions], indent=2))
        return
    display.show_versions(console, versions, title)


@cli.command()
@click.option("--port", type=click.IntRange(min=1, max=65535), default=9808, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for Prometheus on another host or container).")
@click.option("--window-hours", type=click.FloatRange(min=0), default=24.0, show_default=True,
              help="Export runs still open and those created this many hours ago or later.")
@settings_options
def metrics(settings: Settings, port: int, address: str, window_hours: float) -> None:
    """Serve Prometheus metrics of the runs (rows, chunks, progress, durations), read from the ledger."""
    from common.metrics import serve

    with commands.open_ledger(settings) as ledger:
        server = serve(ledger, port, address, window_hours)
        err_console.print(f"run metrics of ledger {ledger.public_url} at http://{address}:{port}/metrics "
                          "(Ctrl-C stops)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            server.shutdown()


@cli.command()
@click.option("--migration", type=click.Choice(["modmon", "userdata-split", "model-files"]), default="modmon",
              show_default=True, help="Which migration to demonstrate (userdata-split needs a MongoDB server: "
              "--source-url mongodb://…).")
@click.option("--rows", type=click.IntRange(min=1000), default=None,
              help="Archived predictions (modmon, default 1,000,000) or user_data documents (default 100,000).")
@click.option("--deployments", "--users", type=click.IntRange(min=1), default=30, show_default=True,
              help="Deployments (modmon) or users (userdata-split).")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Local worker processes to start (0: use workers already running).")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=50_000, show_default=True)
@click.option("--source-url", callback=_url_flag,
              help="Where to build the demo source [postgresql://postgres@127.0.0.1:5432/shuttle_demo].")
@click.option("--flower-url", help="Flower address to print [SHUTTLE_FLOWER_URL].")
@click.option("--skip-data", is_flag=True, help="Reuse the demo source already built.")
@click.option("--models-dir", default="/tmp/shuttle-demo-models", show_default=True,
              help="model-files: where the demo writes its model files (a path every worker sees).")
@click.option("--keep-flower/--stop-flower", default=True, show_default=True,
              help="Leave the Flower the demo started running, to look at the run afterwards.")
@settings_options
def demo(settings: Settings, **options: Any) -> None:
    """Build a realistic demo source, start local workers, run the migration and print the report."""
    from producer.demo import run_demo

    verdict = run_demo(settings, console, **options)
    sys.exit(0 if verdict == "clean" else 1)


def _follow_and_exit(settings: Settings, run_id: str, as_json: bool) -> None:
    with commands.open_ledger(settings) as ledger:
        run = commands.require_run(ledger, run_id)
        broker = Broker(settings.model_copy(update={"queue": run.queue}))
        try:
            with WorkerWatch(broker) as workers:
                body = follow(err_console if as_json else console, ledger, run_id,
                              lambda rid: commands.finalize_here(settings, ledger, rid),
                              Sweeper(ledger, broker, broker.settings) if settings.sweeper else None, workers)
        except KeyboardInterrupt:
            err_console.print(f"\nstopped watching; run {run_id} goes on in the workers. "
                              f"`shuttle watch {run_id}` follows it again, `shuttle cancel {run_id}` stops it",
                              soft_wrap=True)
            sys.exit(130)
        finally:
            broker.close()
    _print_report(body, as_json)
    sys.exit(0 if body["verdict"] == "clean" else 1)


def _print_report(body: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(mask(json.dumps(in_reading_order(body), indent=2, default=str)))
    else:
        display.show_report(console, body)


def _utc(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=timezone.utc) if moment and moment.tzinfo is None else moment


def expand_multi_values(argv: Sequence[str]) -> list[str]:
    """Let `--deployment-ids A B C` mean three values, as users of the previous tools type it.

    A selection flag followed by no value (`--deployment-ids $IDS --wait` with IDS unset) is a usage
    error: dropped silently, it would select every partition.
    """
    out: list[str] = []
    current: str | None = None
    values = 0
    for arg in [*argv, None]:
        if current is not None and not values and (arg is None or arg.startswith("-")):
            raise click.UsageError(f"{current} needs at least one value; leave the flag out to select every "
                                   "partition")
        if arg is None:
            break
        if arg in MULTI_VALUE_OPTIONS:
            current, values = arg, 0
            continue
        if current is not None and not arg.startswith("-"):
            out += [current, arg]
            values += 1
            continue
        current = None
        out.append(arg)
    return out


def require_utf8(argv: Sequence[str]) -> None:
    """Refuse an argument with bytes that are not UTF-8, naming it but not showing it (it may be a URL
    with a password); undecoded, it would fail deep inside a driver or the terminal output."""
    for index, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as exc:
            flag, sep, _ = arg.partition("=")
            if arg.startswith("--") and sep and exc.start > len(flag):
                name = f"the value of {flag}"
            elif index and argv[index - 1].startswith("-"):
                name = f"argument {index + 1} (after {argv[index - 1]})"
            else:
                name = f"argument {index + 1}"
            raise click.UsageError(f"{name} is not valid UTF-8 (an undecodable byte at position {exc.start}); "
                                   "Shuttle takes UTF-8 text only") from None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: one-line `FAILED:` errors with masked URLs; --debug shows tracebacks."""
    raw = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in raw or os.environ.get("SHUTTLE_DEBUG") == "1"
    try:
        require_utf8(raw)
        cli.main(args=expand_multi_values(raw), prog_name="shuttle", standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C (click turns it into Abort) or a declined question
        err_console.print("aborted; anything already enqueued goes on in the workers (`shuttle status` lists the "
                          "runs, `shuttle cancel RUN` stops one)", soft_wrap=True)
        sys.exit(130 if isinstance(sys.exc_info()[1].__context__, KeyboardInterrupt) else 1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ShuttleError as exc:
        code = 2 if isinstance(exc, ConfigError) else 1
        if debug:
            _exit_with_traceback(code)
        err_console.print(f"[bold red]FAILED:[/] {escape(mask(str(exc)))}", soft_wrap=True)
        sys.exit(code)
    except KeyboardInterrupt:
        err_console.print("interrupted; the run goes on in the workers (`shuttle cancel RUN` stops it)")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - an error not translated yet must not print a password either
        if debug:
            _exit_with_traceback(1)
        first = (str(exc).strip().splitlines() or [""])[0]
        err_console.print(f"[bold red]FAILED:[/] {type(exc).__name__}: {escape(mask(first))} "
                          "(--debug shows the traceback)", soft_wrap=True)
        sys.exit(1)


def _exit_with_traceback(code: int) -> None:
    """--debug: the traceback of the error being handled, with every password in it masked."""
    sys.stderr.write(mask(traceback.format_exc()))
    sys.exit(code)
