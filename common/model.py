"""Small frozen types passed between planner, ledger, runner and report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChunkSpec:
    """One bounded unit of work of a run: (entity, partition, key range [lo, hi)).

    `chunk_key` is a pure function of what the chunk is, so re-planning yields the same keys; the
    chunk id (also the Celery task id) prefixes the run id, which names the migration.
    """

    entity: str
    partition: str
    lo: str
    hi: str
    est_rows: int

    @property
    def chunk_key(self) -> str:
        return f"{self.entity}:{self.partition}:{self.lo}-{self.hi}"

    def chunk_id(self, run_id: str) -> str:
        return f"{run_id}:{self.chunk_key}"


@dataclass(frozen=True)
class PartitionCount:
    """Source rows of one partition (a deployment, an experiment, ...) in one entity."""

    entity: str
    partition: str
    rows: int


@dataclass
class WriteCounts:
    """What a chunk's write did to its key range: rows new, rows changed, rows already identical, and
    rows deleted because the source no longer yields them (a chunk owns its range of the target)."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0

    def __iadd__(self, other: WriteCounts) -> WriteCounts:
        self.inserted += other.inserted
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.deleted += other.deleted
        return self

    @property
    def written(self) -> int:
        """Rows the write changed in the target: inserted, rewritten or deleted."""
        return self.inserted + self.updated + self.deleted

    def as_dict(self) -> dict[str, int]:
        return {"inserted": self.inserted, "updated": self.updated, "unchanged": self.unchanged,
                "deleted": self.deleted}

    @classmethod
    def zero(cls) -> dict[str, int]:
        """The counts of a target nothing was written to, as `as_dict` spells them."""
        return cls().as_dict()


@dataclass(frozen=True)
class Reject:
    """A source row that could not be migrated, kept with its key and the reason."""

    entity: str
    key: str
    reason: str
    raw: str = ""


@dataclass
class ChunkOutcome:
    """What one chunk did; recorded in the ledger, summed by the coordinator."""

    rows_read: int = 0
    rejects: list[Reject] = field(default_factory=list)
    writes: dict[str, WriteCounts] = field(default_factory=dict)

    def totals(self) -> WriteCounts:
        total = WriteCounts()
        for counts in self.writes.values():
            total += counts
        return total

    def summary(self) -> dict[str, Any]:
        """The tiny dict a task returns (never rows)."""
        totals = self.totals()
        return {"read": self.rows_read, "rejected": len(self.rejects), **totals.as_dict()}
