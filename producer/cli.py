"""`shuttle`: plan, run, watch, report, cancel, resume, verify and purge migrations.

Exit codes: 0 success (a clean verdict), 1 the work failed (verdict not clean, a service failed
mid-way), 2 usage or configuration errors (nothing was written).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from functools import wraps
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from common.errors import ConfigError, ShuttleError
from common.migrations.base import Selection
from common.settings import Settings, load_settings
from common.urls import mask
from producer import commands, display
from producer.progress import follow

MULTI_VALUE_OPTIONS = ("--deployment-ids", "--partitions", "--experiment-ids", "--user-ids", "--model-names")
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def settings_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--config and the service URLs; builds the settings once and passes them as the first argument."""
    @click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
                  help="TOML or JSON config file (overrides the environment; flags override it).")
    @click.option("--ledger-url", help="Ledger database URL [SHUTTLE_LEDGER_URL].")
    @click.option("--broker-url", help="Celery broker URL [SHUTTLE_BROKER_URL].")
    @wraps(func)
    def wrapper(config_file: Path | None, ledger_url: str | None, broker_url: str | None, **kwargs: Any) -> Any:
        settings = load_settings(config_file, ledger_url=ledger_url, broker_url=broker_url)
        return func(settings, **kwargs)
    return wrapper


def selection_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """What to migrate and where; migration-specific flags reach the migration's `plan_options`."""
    @click.option("--deployment-ids", "--partitions", "--experiment-ids", "--user-ids", "partitions", multiple=True,
                  metavar="ID ...", help="Only these partitions (deployment, experiment or user ids); several may "
                  "follow the flag, or comma-separated.")
    @click.option("--model-names", "model_names", multiple=True, metavar="NAME ...",
                  help="Only these registered models (MLflow registry tables).")
    @click.option("--since", type=click.DateTime(), help="Only rows at or after this UTC time (whole hours).")
    @click.option("--until", type=click.DateTime(), help="Only rows before this UTC time (whole hours).")
    @click.option("--chunk-rows", type=click.IntRange(min=1), help="Rows per chunk at most [default 50,000].")
    @click.option("--source-url", "--postgres-uri", "source_url", help="Source URL [SHUTTLE_SOURCE_URL].")
    @click.option("--target-url", "--mongodb-uri", "target_url", help="Target URL [SHUTTLE_TARGET_URL].")
    @click.option("--source-schema", help="Schema of the source tables [public].")
    @click.option("--target-schema", help="Schema (or MongoDB database) of the target [public].")
    @click.option("--batch-size", type=click.IntRange(min=1), help="Rows per write batch inside a chunk.")
    @click.option("--only-missing", is_flag=True, help="Fill only what the target lacks (where the migration supports it).")
    @click.option("--sample", type=click.IntRange(min=0), help="Rows to compare field by field in the report.")
    @click.option("--option", "extra_options", multiple=True, metavar="KEY=VALUE",
                  help="A migration-specific option (see the README's catalogue).")
    @wraps(func)
    def wrapper(*args: Any, partitions: tuple[str, ...], model_names: tuple[str, ...], since: datetime | None,
                until: datetime | None, extra_options: tuple[str, ...], **kwargs: Any) -> Any:
        ids, names = _split(partitions), _split(model_names)
        selection = Selection(partitions=ids or None, since=_utc(since), until=_utc(until), model_names=names or None)
        for item in extra_options:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise click.BadParameter(f"{item!r}: use KEY=VALUE", param_hint="--option")
            kwargs.setdefault("options", {})[key.replace("-", "_")] = value
        return func(*args, selection=selection, **kwargs)
    return wrapper


def _defaults_from(settings: Settings, flags: dict[str, Any]) -> None:
    """--batch-size and --sample from the config file or environment when the flags are absent."""
    for key in ("batch_size", "sample"):
        if flags.get(key) is None and getattr(settings, key) is not None:
            flags[key] = getattr(settings, key)


def _split(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p for value in values for p in value.split(",") if p)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, envvar="SHUTTLE_DEBUG", help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Shuttle: distributed, idempotent migrations of ML-platform data."""
    ctx.obj = {"debug": debug}


@cli.command()
def migrations() -> None:
    """List the migrations in the catalogue."""
    display.show_migrations(console)


@cli.command()
@click.argument("migration")
@selection_options
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Worker processes to estimate the time for.")
@settings_options
def plan(settings: Settings, migration: str, selection: Selection, chunk_rows: int | None, workers: int,
         **flags: Any) -> None:
    """Dry run: counts per partition, chunks and estimated time; writes nothing."""
    _defaults_from(settings, flags)
    the_plan = commands.plan(settings, migration, selection, chunk_rows or settings.chunk_rows, **flags)
    display.show_plan(console, the_plan, workers)


@cli.command()
@click.argument("migration")
@selection_options
@click.option("--max-rejects", type=click.IntRange(min=0), help="Fail the run when more rows than this are rejected.")
@click.option("--reenable-drift-tracking", is_flag=True, help="modmon: re-enable drift tracking after a clean run.")
@click.option("--wait", is_flag=True, help="Show live progress, then the report; exit 0 only on a clean verdict.")
@click.option("--json", "as_json", is_flag=True, help="With --wait, print the report as JSON.")
@click.option("--dry-run", is_flag=True, help="Only show the plan (as `shuttle plan`); write nothing.")
@settings_options
def run(settings: Settings, migration: str, selection: Selection, chunk_rows: int | None, max_rejects: int | None,
        wait: bool, as_json: bool, dry_run: bool, **flags: Any) -> None:
    """Plan, record and enqueue a run; with --wait follow it to its report."""
    _defaults_from(settings, flags)
    if dry_run or settings.dry_run:
        display.show_plan(console, commands.plan(settings, migration, selection, chunk_rows or settings.chunk_rows,
                                                 **flags), workers=2)
        return
    record = commands.start_run(settings, migration, selection, chunk_rows or settings.chunk_rows,
                                max_rejects if max_rejects is not None else settings.max_rejects, **flags)
    err_console.print(f"run [bold]{record.run_id}[/]: {record.total_rows:,} rows in {record.chunk_count} chunks "
                      f"enqueued; watch in Flower at {settings.flower_url} or with `shuttle watch {record.run_id}`")
    if wait:
        _follow_and_exit(settings, record.run_id, as_json)
    console.print(record.run_id)


@cli.command()
@click.argument("run_id", required=False)
@settings_options
def status(settings: Settings, run_id: str | None) -> None:
    """Recent runs, or where one run stands."""
    with commands.open_ledger(settings) as ledger:
        if run_id is None:
            display.show_runs(console, ledger.latest_runs())
            return
        run = commands.require_run(ledger, run_id)
        display.show_progress(console, run, ledger.progress(run_id))
        for chunk in ledger.chunks_of(run_id, states=["failed"])[:10]:
            console.print(f"  failed {chunk.chunk_id}: {escape(ledger.get_chunk_error(chunk.chunk_id) or '')}")


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
@settings_options
def watch(settings: Settings, run_id: str, as_json: bool) -> None:
    """Follow a run's progress live until it ends, then print its report."""
    _follow_and_exit(settings, run_id, as_json)


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--refresh", is_flag=True, help="Rebuild the report from the ledger and the target now.")
@settings_options
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
@click.option("--wait", is_flag=True, help="Follow the resumed run to its report.")
@click.option("--json", "as_json", is_flag=True, help="With --wait, print the report as JSON.")
@settings_options
def resume(settings: Settings, run_id: str, wait: bool, as_json: bool) -> None:
    """Enqueue again every chunk of a run that is not done (failed, cancelled, lost, stale).

    A chunk a live worker is running now is left to finish, not run twice."""
    resumed = commands.resume(settings, run_id)
    left = f"; {resumed.left_running} still running on live workers, left to finish" if resumed.left_running else ""
    err_console.print(f"run {run_id}: {resumed.requeued} chunks enqueued again{left}")
    if wait:
        _follow_and_exit(settings, run_id, as_json)


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@settings_options
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
@click.option("--deployment-ids", "--partitions", "partitions", multiple=True, metavar="ID ...",
              help="Only these partitions (default: every verified one).")
@click.option("--dry-run", is_flag=True, help="Count what would be purged; delete nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@settings_options
def purge(settings: Settings, migration: str, purge_all: bool, before: datetime | None,
          partitions: tuple[str, ...], dry_run: bool, yes: bool) -> None:
    """Delete migrated source rows, only for partitions whose migration completed and verified."""
    if purge_all == (before is not None):
        raise click.UsageError("give exactly one of --all or --before DATE")
    ids = _split(partitions) or None
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


@cli.command()
@click.option("--migration", type=click.Choice(["modmon", "userdata-split"]), default="modmon", show_default=True,
              help="Which migration to demonstrate (userdata-split needs a MongoDB server: --source-url mongodb://…).")
@click.option("--rows", type=click.IntRange(min=1000), default=None,
              help="Archived predictions (modmon, default 1,000,000) or user_data documents (default 100,000).")
@click.option("--deployments", "--users", type=click.IntRange(min=1), default=30, show_default=True,
              help="Deployments (modmon) or users (userdata-split).")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Local worker processes to start (0: use workers already running).")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=50_000, show_default=True)
@click.option("--source-url", help="Where to build the demo source [postgresql://postgres@127.0.0.1:5432/shuttle_demo].")
@click.option("--flower-url", help="Flower address to print [SHUTTLE_FLOWER_URL].")
@click.option("--skip-data", is_flag=True, help="Reuse the demo source already built.")
@settings_options
def demo(settings: Settings, **options: Any) -> None:
    """Build a realistic demo source, start local workers, run the migration and print the report."""
    from producer.demo import run_demo

    verdict = run_demo(settings, console, **options)
    sys.exit(0 if verdict == "clean" else 1)


def _follow_and_exit(settings: Settings, run_id: str, as_json: bool) -> None:
    with commands.open_ledger(settings) as ledger:
        commands.require_run(ledger, run_id)
        body = follow(err_console if as_json else console, ledger, run_id,
                      lambda rid: commands.finalize_here(settings, ledger, rid))
    _print_report(body, as_json)
    sys.exit(0 if body["verdict"] == "clean" else 1)


def _print_report(body: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(mask(json.dumps(body, indent=2, default=str)))
    else:
        display.show_report(console, body)


def _utc(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=timezone.utc) if moment and moment.tzinfo is None else moment


def expand_multi_values(argv: Sequence[str]) -> list[str]:
    """Let `--deployment-ids A B C` mean three values, as users of the previous tools type it."""
    out: list[str] = []
    current: str | None = None
    for arg in argv:
        if arg in MULTI_VALUE_OPTIONS:
            current = arg
            continue
        if current is not None and not arg.startswith("-"):
            out += [current, arg]
            continue
        current = None
        out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: one-line `FAILED:` errors with masked URLs; --debug shows tracebacks."""
    args = expand_multi_values(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in args or os.environ.get("SHUTTLE_DEBUG") == "1"
    try:
        cli.main(args=args, prog_name="shuttle", standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ShuttleError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]FAILED:[/] {escape(mask(str(exc)))}")
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    except KeyboardInterrupt:
        err_console.print("interrupted; the run goes on in the workers (`shuttle cancel RUN` stops it)")
        sys.exit(130)
