"""`shuttle demo`: a realistic source (modmon's, user_data documents, or a tree of model files), local
workers, a full run, and its report."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from common.migrations.base import Selection
from common.migrations.modmon_fixtures import build_source, drop_target
from common.settings import Settings
from common.urls import mask
from producer import commands, display
from producer.local_workers import LocalWorkers, start_flower
from producer.progress import follow

DEFAULT_DEMO_URL = "postgresql://postgres@127.0.0.1:5432/shuttle_demo"
DEFAULT_MODELS_DIR = "/tmp/shuttle-demo-models"
DEFAULT_MONGO_DEMO_URL = "mongodb://127.0.0.1:27017/shuttle_demo"


def run_demo(settings: Settings, console: Console, *, migration: str = "modmon", rows: int | None, deployments: int,
             workers: int, chunk_rows: int, source_url: str | None, flower_url: str | None, skip_data: bool,
             models_dir: str = DEFAULT_MODELS_DIR, keep_flower: bool = True) -> str:
    """Returns the verdict. The Flower it started stays up (unless told otherwise), so its address still
    answers once the report is read."""
    if migration == "userdata-split":
        return run_userdata_demo(settings, console, documents=rows or 100_000, users=deployments, workers=workers,
                                 chunk_rows=chunk_rows, source_url=source_url, flower_url=flower_url,
                                 skip_data=skip_data, keep_flower=keep_flower)
    if migration == "model-files":
        return _model_files_demo(settings, console, workers=workers, flower_url=flower_url, skip_data=skip_data,
                                 models_dir=Path(models_dir), target_url=settings.target_url or DEFAULT_DEMO_URL,
                                 keep_flower=keep_flower)
    rows = rows or 1_000_000
    url = source_url or settings.source_url or DEFAULT_DEMO_URL
    settings = settings.model_copy(update={"source_url": url, "target_url": settings.target_url or url})
    if not skip_data:
        console.print(f"building the demo source in {mask(url)}: {deployments} deployments, {rows:,} predictions …")
        started = time.monotonic()
        data = build_source(url, rows=rows, deployments=deployments)
        drop_target(settings.target_url or url)  # buckets of an earlier demo's data would not reconcile
        console.print(f"  {data.total_rows:,} archived predictions ({len(data.malformed_ids)} malformed on purpose) "
                      f"in {time.monotonic() - started:.1f}s")
    run_id, report = _run_and_report(settings, console, "modmon", "rows", workers, flower_url, keep_flower,
                                     chunk_rows=chunk_rows, reenable_drift_tracking=True)
    console.print(f"\nnext: `shuttle report {run_id} --json`, `shuttle verify {run_id}`, "
                  f"then `shuttle purge modmon --before 2026-06-04 --dry-run`")
    return report["verdict"]


def _model_files_demo(settings: Settings, console: Console, *, workers: int, flower_url: str | None,
                      skip_data: bool, models_dir: Path, target_url: str, keep_flower: bool) -> str:
    """A generated tree of joblib files (scikit-learn, from the `dev` extra) → the `models` table."""
    from common.connectors.postgres import create_database

    if not skip_data:
        from common.migrations.model_files_fixtures import build_tree

        console.print(f"writing demo model files under {models_dir} …")
        tree = build_tree(models_dir, names=30)
        console.print(f"  {tree.files} joblib and pickle files, {len(tree.names)} model names")
    create_database(target_url)
    settings = settings.model_copy(update={"source_url": f"file://{models_dir}", "target_url": target_url})
    _, report = _run_and_report(settings, console, "model-files", "files", workers, flower_url, keep_flower,
                                chunk_rows=1000)
    console.print(f"\nnext: `shuttle models list --target-url {mask(target_url)}`; run the demo again with "
                  "--skip-data: nothing is stored twice")
    return report["verdict"]


def _run_and_report(settings: Settings, console: Console, migration: str, unit: str, workers: int,
                    flower_url: str | None, keep_flower: bool, *, chunk_rows: int,
                    **options: Any) -> tuple[str, dict[str, Any]]:
    """Start `migration` on the settings' source and target with local workers, follow it to its end
    and print its report; returns the run id and the report."""
    with _local_workers(settings, console, workers, flower_url, keep_flower):
        run = commands.start_run(settings, migration, Selection(), chunk_rows, settings.max_rejects, **options)
        console.print(f"run [bold]{run.run_id}[/]: {run.total_rows:,} {unit} in {run.chunk_count} chunks; "
                      f"Flower: {mask(flower_url or settings.flower_url)}")
        with commands.open_ledger(settings) as ledger:
            report: dict[str, Any] = follow(console, ledger, run.run_id,
                                            lambda rid: commands.finalize_here(settings, ledger, rid))
        display.show_report(console, report)
    return run.run_id, report


@contextmanager
def _local_workers(settings: Settings, console: Console, workers: int, flower_url: str | None,
                   keep_flower: bool) -> Iterator[None]:
    """Flower and `workers` local worker processes for the demo's run; the workers stop after it, Flower
    stays up (unless `keep_flower` is off) so its address still answers once the report is read."""
    flower = start_flower(settings) if workers else None
    pool = LocalWorkers(settings, workers, name="demo")
    try:
        if workers:
            console.print(f"starting {workers} local worker processes …")
            pool.__enter__()
        yield
    finally:
        if workers:
            pool.stop()
        if flower is not None and keep_flower:
            console.print(f"Flower stays up at {mask(flower_url or settings.flower_url)} with this run's tasks "
                          f"(`kill {flower.pid}` stops it)", soft_wrap=True)
        elif flower is not None:
            os.killpg(flower.pid, signal.SIGTERM)


def run_userdata_demo(settings: Settings, console: Console, *, documents: int, users: int, workers: int,
                      chunk_rows: int, source_url: str | None, flower_url: str | None, skip_data: bool,
                      keep_flower: bool = True) -> str:
    """`userdata-split` on generated `user_data` documents, source and target in one MongoDB database."""
    import pymongo

    from common.migrations.userdata_fixtures import build_source as build_user_data

    url = source_url or DEFAULT_MONGO_DEMO_URL
    settings = settings.model_copy(update={"source_url": url, "target_url": url})
    if not skip_data:
        console.print(f"building the demo source in {mask(url)}: {documents:,} user_data documents of {users} users …")
        started = time.monotonic()
        with pymongo.MongoClient(url) as client:
            database = client.get_default_database("shuttle_demo")
            data = build_user_data(database, documents, users=users, bad=True)
            for collection in ("dataset_metadata", "transformation_configs", "user_data_restored"):
                database.drop_collection(collection)
        console.print(f"  {data.total:,} documents ({len(data.rejected)} bad on purpose) "
                      f"in {time.monotonic() - started:.1f}s")
    run_id, report = _run_and_report(settings, console, "userdata-split", "documents", workers, flower_url,
                                     keep_flower, chunk_rows=chunk_rows)
    console.print(f"\nnext: `shuttle rollback {run_id} --into user_data_restored --verify --wait`")
    return report["verdict"]
