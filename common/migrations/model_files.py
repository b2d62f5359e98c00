"""`model-files`: model files on disk → the versioned PostgreSQL `models` table, never unpickled.

    source: files under the roots of file:///…          target: models (one row per version)
    ──────────────────────────────────────────────────  ──────────────────────────────────────────────
    {name}__{event}__{model_type}.{joblib|pkl}       →  name, event, model_type   from the file's name
      (--name-pattern; in any directory under a root)   version                  next of the name, 1, 2, …
    the file's bytes                                 →  model_binary             as they are, never unpickled
    SHA-256 of those bytes, as read                  →  content_hash             dedupe + integrity check
    root + relative path                             →  source_path              where this version came from
    (stored by this run, newest of its model)        →  is_active = true; the model's earlier versions false
                                                        id, created_at           the table's defaults

    partition: model name (--model-names)   chunk: one name's files, by relative path [first, last]

Rules (common/model_store.py holds them, shared with `save_model`): content already stored for the
model (name, event, model_type) is skipped, so a re-run inserts nothing; new content becomes the next
version of the name and the model's only active version. A name is never split across chunks, and a
chunk reads its files in relative-path order (first root first on a tie), so a tree gets the same
version numbers on every run. A file is checked by its header only (REJECTS below); the one place that
unpickles is `load_model`, for trusted tables.

Versions are never deleted, so `WriteCounts.deleted` stays 0: a file removed from disk leaves its
versions in place, because the table is the models' history, not a mirror of the directory. Training
code loads a version by number, and teams delete old files once they are migrated (the reference
document's own advice): that must not delete what was migrated. Deactivating a version is the users'
call (`shuttle models deactivate`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from psycopg import sql

from common.connectors.files import DEFAULT_PATTERN, ModelFile
from common.connectors.files import Source as FilesSource
from common.connectors.postgres import Sink, identifier, translate_errors
from common.errors import ConfigError, DataError
from common.migrations.base import Check, Migration, ProgressCallback, Selection
from common.model import ChunkOutcome, ChunkSpec, PartitionCount, Reject
from common.model_store import DEFAULT_TABLE, HASH_SQL, column_limits, ensure_table, versioning

ENTITY = "files"
TARGET = "models"
MB = 1 << 20
DEFAULT_MAX_FILE_MB = 1000
BYTEA_MAX_MB = 1000  # PostgreSQL holds at most 1 GB in one bytea value: a larger file is a reject, not a failed chunk
DEFAULT_BUFFER_MB = 64
PROGRESS_EVERY_S = 0.5

#  reject reason (the reader's DataError)       when
REJECTS = {
    "symlink out of the roots":                 "the path resolves outside every root; it is never opened",
    "not a regular file":                       "a directory, FIFO, device or socket named like a model",
    "unreadable":                               "permission denied or an I/O error",
    "empty file":                               "zero bytes",
    "over the limit (--max-file-mb)":           "larger than the limit, not read",
    "not a joblib or pickle file by its header": "first bytes neither pickle protocol 2–5 nor joblib compression",
    "longer than N characters":                 "name, event or type too long for its column",
}


class ModelFiles(Migration):
    name = "model-files"
    summary = "Model files (.joblib, .pkl) → versioned PostgreSQL `models` table, deduplicated by content hash"
    source_kind = "files"
    target_kind = "postgres"
    partition_label = "model name"
    status = "available"

    def __init__(self, source_url: str, target_url: str, options: dict[str, Any]) -> None:
        super().__init__(source_url, target_url, options)
        self.source = FilesSource(source_url, options.get("name_pattern") or DEFAULT_PATTERN)
        self.sink = Sink(target_url)
        schema = options.get("target_schema") or "public"
        self.table = DEFAULT_TABLE if schema == "public" else f"{schema}.{DEFAULT_TABLE}"
        identifier(self.table)  # a hostile schema name is a usage error before anything runs
        self.max_bytes = int(min(float(options.get("max_file_mb") or DEFAULT_MAX_FILE_MB), BYTEA_MAX_MB) * MB)
        self.buffer_bytes = int(float(options.get("buffer_mb") or DEFAULT_BUFFER_MB) * MB)
        self._listing: dict[tuple[str, ...] | None, list[ModelFile]] = {}
        self._limits: dict[str, int] | None = None

    @classmethod
    def plan_options(cls, **flags: Any) -> dict[str, Any]:
        extra = flags.get("options") or {}
        sizes = {}
        for key, flag, default in (("max_file_mb", "--max-file-mb", DEFAULT_MAX_FILE_MB),
                                   ("buffer_mb", "--option buffer_mb", DEFAULT_BUFFER_MB)):
            value = flags.get(key) or extra.get(key) or default
            try:
                sizes[key] = float(value)
            except ValueError:
                sizes[key] = -1.0
            if not sizes[key] > 0:
                raise ConfigError(f"{flag} must be a positive number of MB, got {value!r}")
        return {"target_schema": flags.get("target_schema") or "public",
                "name_pattern": flags.get("name_pattern") or extra.get("name_pattern") or DEFAULT_PATTERN, **sizes}

    # -- planning ----------------------------------------------------------------------------------

    def check_services(self) -> None:
        self.source.check_reachable()
        self.sink.check_reachable()

    @staticmethod
    def _names(selection: Selection) -> tuple[str, ...] | None:
        if selection.since or selection.until:
            raise ConfigError("model-files has no time window; select model names with --model-names")
        return selection.model_names or selection.partitions

    def _files(self, selection: Selection) -> list[ModelFile]:
        """The selected files, sorted as chunks read them; listed once per selection (names only, no reads)."""
        names = self._names(selection)
        if names not in self._listing:
            found = self.source.files(set(names) if names is not None else None)
            self._listing[names] = sorted(found, key=lambda f: (f.name, *f.sort_key(self.source.roots)))
        return self._listing[names]

    def count_partitions(self, selection: Selection) -> list[PartitionCount]:
        per_name = Counter(f.name for f in self._files(selection))
        names = self._names(selection)
        if names is not None:
            unknown = sorted(set(names) - set(per_name))
            if unknown:
                raise ConfigError(f"no model files named {', '.join(unknown)} under {', '.join(self.source.roots)} "
                                  f"(pattern {self.source.pattern.pattern}); `shuttle plan model-files` lists the names")
        return [PartitionCount(ENTITY, name, n) for name, n in sorted(per_name.items())]

    def plan_chunks(self, selection: Selection, chunk_rows: int) -> Iterator[ChunkSpec]:
        """One chunk per name, never split (see the module docstring); `chunk_rows` does not apply."""
        by_name: dict[str, list[ModelFile]] = {}
        for f in self._files(selection):
            by_name.setdefault(f.name, []).append(f)
        for name, files in sorted(by_name.items()):
            relpaths = [f.relpath for f in files]
            yield ChunkSpec(ENTITY, name, min(relpaths), max(relpaths), len(files))

    def prepare_target(self) -> None:
        with translate_errors(f"target {self.sink.public_url}"):
            self._limits = ensure_table(self.sink.connection(), self.table)

    # -- one chunk ---------------------------------------------------------------------------------

    def run_chunk(self, spec: ChunkSpec, progress: ProgressCallback) -> ChunkOutcome:
        """Under the name's lock: each file checked, hashed and, when its content is new, streamed in."""
        roots = self.source.roots
        files = sorted(self.source.files({spec.partition}, spec.lo, spec.hi), key=lambda f: f.sort_key(roots))
        outcome = ChunkOutcome(rows_read=len(files))
        with translate_errors(f"target {self.sink.public_url}"):
            conn = self.sink.connection()
            if self._limits is None:
                self._limits = column_limits(conn, self.table)
            next_report = time.monotonic() + PROGRESS_EVERY_S
            with versioning(conn, spec.partition, self.table, self._limits) as writer:
                for done, f in enumerate(files, 1):
                    try:
                        writer.check(f.event, f.model_type)
                        content = self.source.read(f, self.max_bytes, self.buffer_bytes)
                    except DataError as exc:
                        outcome.rejects.append(Reject(ENTITY, f.path, str(exc), f"root {f.root}"))
                        continue
                    writer.add(f.event, f.model_type, content.sha256, content.size, content.blocks(), f.path)
                    if time.monotonic() >= next_report:  # each call is a broker event: not one per small file
                        progress(done)
                        next_report = time.monotonic() + PROGRESS_EVERY_S
        progress(len(files))
        outcome.writes = {TARGET: writer.counts}
        return outcome

    # -- after the run -----------------------------------------------------------------------------

    def target_counts(self, partitions: Sequence[str]) -> dict[tuple[str, str], int]:
        counts = {(TARGET, name): 0 for name in partitions}
        query = sql.SQL("SELECT name, count(*) FROM {} WHERE name = ANY(%s) GROUP BY name").format(identifier(self.table))
        for name, n in self.sink.query(query, [list(partitions)]):
            counts[(TARGET, name)] = int(n)
        return counts

    def verify(self, selection: Selection, partitions: Sequence[str], rejected: dict[str, int]) -> list[Check]:
        """Per name: every stored version's bytes hash to its content_hash (the file's hash when it was read),
        and every file there now has a stored version of its model unless it was rejected."""
        files: dict[str, list[ModelFile]] = {}
        for f in self.source.files(set(partitions)):
            files.setdefault(f.name, []).append(f)
        stored = {name: (int(n), int(bad)) for name, n, bad in self.sink.query(sql.SQL(
            "SELECT name, count(*), count(*) FILTER (WHERE content_hash IS DISTINCT FROM " + HASH_SQL + ")"
            " FROM {} WHERE name = ANY(%s) GROUP BY name").format(identifier(self.table)), [list(partitions)])}
        models = set(self.sink.query(sql.SQL("SELECT DISTINCT name, event, model_type FROM {} WHERE name = ANY(%s)")
                                     .format(identifier(self.table)), [list(partitions)]))
        checks = []
        for name in partitions:
            found = files.get(name, [])
            versions, bad = stored.get(name, (0, 0))
            missing = sum((f.name, f.event, f.model_type) not in models for f in found)
            rej = rejected.get(name, 0)
            if bad:
                detail = f"{bad} stored versions do not hash to their content_hash"
            elif missing > rej:
                detail = f"{missing - rej} files have no stored version and were not rejected"
            else:
                roots = Counter(f.root for f in found)
                detail = "files from " + ", ".join(f"{root} ({n})" for root, n in sorted(roots.items()))
            checks.append(Check(TARGET, name, not bad and missing <= rej, len(found), versions, rej, detail))
        return checks

    def after_run(self, partitions: Sequence[str]) -> list[str]:
        """The roots the files came from (workers on several hosts read them at these shared paths)."""
        per_root = Counter(f.root for f in self.source.files(set(partitions)))
        lines = [f"read from root {root}: {n} model file{'' if n == 1 else 's'}"
                 for root, n in ((root, per_root.get(root, 0)) for root in self.source.roots)]
        if self.source.unmatched:
            lines.append(f"{self.source.unmatched} files under the roots do not fit the pattern "
                         f"{self.source.pattern.pattern} and were not read")
        return lines

    def storage_sizes(self) -> dict[str, int]:
        size = sql.SQL("SELECT coalesce(pg_total_relation_size(to_regclass(%s)), 0)")
        source = sum(f.size for files in self._listing.values() for f in files) if self._listing else \
            sum(f.size for f in self.source.files())
        return {"source_bytes": int(source), "target_bytes": int(self.sink.query(size, [self.table])[0][0])}

    def close(self) -> None:
        self.source.close()
        self.sink.close()
