"""The two small abstract classes every connector implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from common.model import WriteCounts

Row = tuple[Any, ...]


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # the target's type name, e.g. "text", "float8", "int8[]", "jsonb"


@dataclass(frozen=True)
class TableSpec:
    """A target table: its name, columns in order, and the natural key the upsert is keyed on."""

    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


class Source(ABC):
    """Where rows are read from. Reads are streamed; nothing loads a whole table."""

    kind: ClassVar[str]

    @abstractmethod
    def close(self) -> None:
        """Release connections."""


class Sink(ABC):
    """Where rows are written, always by upsert on a natural key."""

    kind: ClassVar[str]

    @abstractmethod
    def upsert(self, table: TableSpec, rows: Sequence[Row]) -> WriteCounts:
        """Write rows keyed on `table.key`; writing the same rows again changes nothing."""

    @abstractmethod
    def ensure_table(self, table: TableSpec) -> None:
        """Create the table if missing; raise ConfigError if it exists with conflicting columns."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""


def batched(rows: Iterable[Row], size: int) -> Iterable[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
