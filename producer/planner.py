"""Planning a run: count the source per partition, cut bounded chunks from the data, record the plan."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from common.ledger import Ledger, RunRecord
from common.migrations import Migration
from common.migrations.base import Selection
from common.model import ChunkSpec, PartitionCount
from common.urls import strip_password

# Measured per worker process on the benchmark machine (ops/bench/RESULTS.md); only for estimates.
ESTIMATED_ROWS_PER_SECOND_PER_WORKER = 60_000


@dataclass(frozen=True)
class Plan:
    """A dry run's result: what would be copied, in how many chunks."""

    migration: str
    selection: Selection
    partitions: list[PartitionCount]
    chunks: list[ChunkSpec]
    options: dict[str, Any]

    @property
    def total_rows(self) -> int:
        return sum(p.rows for p in self.partitions)

    def estimated_seconds(self, workers: int) -> float:
        return self.total_rows / (ESTIMATED_ROWS_PER_SECOND_PER_WORKER * max(1, workers))

    def planned_rows(self) -> dict[str, dict[str, int]]:
        planned: dict[str, dict[str, int]] = {}
        for p in self.partitions:
            planned.setdefault(p.entity, {})[p.partition] = p.rows
        return planned


def make_plan(migration: Migration, selection: Selection, chunk_rows: int) -> Plan:
    """Count and cut without writing anything anywhere."""
    partitions = migration.count_partitions(selection)
    chunks = list(migration.plan_chunks(selection, chunk_rows))
    return Plan(migration.name, selection, partitions, chunks, dict(migration.options))


def new_run_id(migration: str) -> str:
    """Readable and unique: the migration, the UTC time, and a random suffix."""
    return f"{migration}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(2)}"


def record_run(ledger: Ledger, plan: Plan, source_url: str, target_url: str, max_rejects: int | None,
               queue: str) -> RunRecord:
    """Write the run and all its chunks to the ledger in one transaction; passwords are stripped."""
    run = RunRecord(
        run_id=new_run_id(plan.migration), migration=plan.migration, status="running",
        selection=plan.selection.as_dict(), options={**plan.options, "planned": plan.planned_rows()},
        source_url=strip_password(source_url), target_url=strip_password(target_url),
        total_rows=plan.total_rows, chunk_count=len(plan.chunks), max_rejects=max_rejects, queue=queue)
    ledger.create_run(run, plan.chunks)
    return run
