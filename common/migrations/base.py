"""What every migration in the catalogue provides to the engine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from common.model import ChunkOutcome, ChunkSpec, PartitionCount

ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class Selection:
    """Which part of the source a run covers: partitions (None = all), an optional time window, and
    for migrations with a second partition key (MLflow's registry: registered model names) its values."""

    partitions: tuple[str, ...] | None = None
    since: datetime | None = None
    until: datetime | None = None
    model_names: tuple[str, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"partitions": list(self.partitions) if self.partitions is not None else None,
                "since": self.since.isoformat() if self.since else None,
                "until": self.until.isoformat() if self.until else None,
                "model_names": list(self.model_names) if self.model_names is not None else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Selection:
        parts, names = data.get("partitions"), data.get("model_names")
        return cls(partitions=tuple(parts) if parts is not None else None,
                   since=datetime.fromisoformat(data["since"]) if data.get("since") else None,
                   until=datetime.fromisoformat(data["until"]) if data.get("until") else None,
                   model_names=tuple(names) if names is not None else None)


@dataclass(frozen=True)
class Check:
    """One line of verification: what was compared, whether it held, and the figures."""

    entity: str
    partition: str
    ok: bool
    source_rows: int
    target_rows: int
    rejected_rows: int = 0
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"entity": self.entity, "partition": self.partition, "ok": self.ok,
                "source_rows": self.source_rows, "target_rows": self.target_rows,
                "rejected_rows": self.rejected_rows, "detail": self.detail}


class Migration(ABC):
    """A catalogue entry: how to count, cut, copy and check one kind of data.

    Built with the run's source and target URLs (passwords added by the process that builds it) and
    the run's options; holds its connections until `close()`.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    source_kind: ClassVar[str]
    target_kind: ClassVar[str]
    partition_label: ClassVar[str]
    status: ClassVar[str]

    def __init__(self, source_url: str, target_url: str, options: dict[str, Any]) -> None:
        self.source_url = source_url
        self.target_url = target_url
        self.options = options

    @classmethod
    def plan_options(cls, **flags: Any) -> dict[str, Any]:
        """Options fixed at plan time and stored with the run, so every chunk sees the same ones."""
        return {}

    @abstractmethod
    def check_services(self) -> None:
        """Raise ServiceUnavailable naming source or target if either cannot be reached."""

    @abstractmethod
    def count_partitions(self, selection: Selection) -> list[PartitionCount]:
        """Source rows per partition; raise ConfigError listing selected partitions that do not exist."""

    @abstractmethod
    def plan_chunks(self, selection: Selection, chunk_rows: int) -> Iterator[ChunkSpec]:
        """Cut the selection into bounded chunks, boundaries taken from the data."""

    @abstractmethod
    def prepare_target(self) -> None:
        """Create target tables idempotently; refuse a conflicting existing schema."""

    def finish_target(self) -> None:
        """Work on the target once every chunk has ended, before verification: e.g. building indexes
        that would slow every chunk's writes down if they existed during the load.

        Called by the coordinator (and every other path that builds a finished run's report), so it may
        run more than once: it must be idempotent. A TransientError is retried like the rest of the
        finalize step; a problem with the data must show in `verify`'s checks, not pass silently."""

    @abstractmethod
    def run_chunk(self, spec: ChunkSpec, progress: ProgressCallback) -> ChunkOutcome:
        """Read the chunk's range, transform, upsert; rows that cannot be migrated become rejects."""

    @abstractmethod
    def target_counts(self, partitions: Sequence[str]) -> dict[tuple[str, str], int]:
        """Rows now in the target per (target entity, partition)."""

    @abstractmethod
    def verify(self, selection: Selection, partitions: Sequence[str], rejected: dict[str, int]) -> list[Check]:
        """Recount both sides per partition; `rejected` is the ledger's rejects per partition."""

    def after_run(self, partitions: Sequence[str]) -> list[str]:
        """Work that follows a clean run (e.g. re-enabling a feature); returns lines for the report."""
        return []

    def storage_sizes(self) -> dict[str, int]:
        """Bytes used by source and target tables, when the migration can tell."""
        return {}

    @abstractmethod
    def close(self) -> None:
        """Release connections."""
