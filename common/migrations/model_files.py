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

    partition and chunk: a range of model names [first, last], labelled `first/last` (or the name alone);
      small names are packed into one chunk, a name is never split (--model-names: one chunk per name)

Rules (common/model_store.py holds them, shared with `save_model`): content already stored for the
model (name, event, model_type) is skipped, so a re-run inserts nothing; new content becomes the next
version of the name and the model's only active version. A name is never split across chunks, and a
chunk reads each name's files in relative-path order (first root first on a tie), so a tree gets the
same version numbers on every run. Names are packed into about TARGET_CHUNKS chunks of similar size (a
name's fixed cost, one chunk's ledger claim and dispatch, measured ~40 ms, is paid per chunk, not per
name); a chunk locks all its names and writes them in one transaction with one COPY. A label holds a
`/` only as the range's separator: a name, one path segment, never holds one.

What each file was when read (size, mtime, hash) is recorded beside the table (model_files_state.py):
re-runs skip re-reading unchanged files, and verification compares hashes without re-hashing. A file
is checked by its header only (REJECTS below); the one place that unpickles is `load_model`, for
trusted tables.

Versions are never deleted, so `WriteCounts.deleted` stays 0: a file removed from disk leaves its
versions in place, because the table is the models' history, not a mirror of the directory. Training
code loads a version by number, and teams delete old files once they are migrated (the reference
document's own advice): that must not delete what was migrated. Deactivating a version is the users'
call (`shuttle models deactivate`).
"""

from __future__ import annotations

import bisect
import math
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
from common.migrations import model_files_state as state
from common.model_store import DEFAULT_TABLE, HASH_SQL, column_limits, ensure_table, versioning

ENTITY = "files"
TARGET = "models"
MB = 1 << 20
DEFAULT_MAX_FILE_MB = 1000
BYTEA_MAX_MB = 1000  # PostgreSQL holds at most 1 GB in one bytea value: a larger file is a reject, not a failed chunk
DEFAULT_BUFFER_MB = 64
PROGRESS_EVERY_S = 0.5
TARGET_CHUNKS = 8  # enough to keep a few workers busy and balanced; each chunk costs ~40 ms of engine work
PACK_MAX_FILES = 1000
PACK_MAX_BYTES = 256 * MB  # a chunk streams its files one at a time: this bounds its duration, not memory

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
                "name_pattern": flags.get("name_pattern") or extra.get("name_pattern") or DEFAULT_PATTERN,
                "recompute": bool(flags.get("recompute")),
                "files_per_chunk": _positive_int(extra.get("files_per_chunk"), "--option files_per_chunk"),
                "verify_bytes": str(extra.get("verify_bytes", "")).lower() in ("1", "true", "yes"), **sizes}

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

    def _packs(self, selection: Selection) -> list[tuple[str, str, str, int]]:
        """(label, first name, last name, files) per chunk: consecutive names packed up to a share of the
        tree (1/TARGET_CHUNKS of its files or bytes, at most PACK_MAX_*; `--option files_per_chunk=N` sets
        the files instead); a selection of names gets one chunk each."""
        per_name: dict[str, list[int]] = {}
        for f in self._files(selection):
            per_name.setdefault(f.name, [0, 0])
            per_name[f.name][0] += 1
            per_name[f.name][1] += f.size
        if self._names(selection) is not None:
            return [(name, name, name, n) for name, (n, _) in sorted(per_name.items())]
        files = sum(n for n, _ in per_name.values())
        size = sum(b for _, b in per_name.values())
        max_files = self.options.get("files_per_chunk") or min(PACK_MAX_FILES, max(1, math.ceil(files / TARGET_CHUNKS)))
        max_bytes = min(PACK_MAX_BYTES, max(1, math.ceil(size / TARGET_CHUNKS)))
        packs, names, n, b = [], [], 0, 0
        for name, (count, size_of) in sorted(per_name.items()):
            names.append(name)
            n, b = n + count, b + size_of
            if n >= max_files or b >= max_bytes:
                packs.append((pack_label(names[0], names[-1]), names[0], names[-1], n))
                names, n, b = [], 0, 0
        if names:
            packs.append((pack_label(names[0], names[-1]), names[0], names[-1], n))
        return packs

    def count_partitions(self, selection: Selection) -> list[PartitionCount]:
        names = self._names(selection)
        if names is not None:
            found = {f.name for f in self._files(selection)}
            unknown = sorted(set(names) - found)
            if unknown:
                raise ConfigError(f"no model files named {', '.join(unknown)} under {', '.join(self.source.roots)} "
                                  f"(pattern {self.source.pattern.pattern}); `shuttle plan model-files` lists the names")
        return [PartitionCount(ENTITY, label, n) for label, _, _, n in self._packs(selection)]

    def plan_chunks(self, selection: Selection, chunk_rows: int) -> Iterator[ChunkSpec]:
        """One chunk per pack of names (see `_packs`), its key range the names [first, last];
        `chunk_rows` does not apply."""
        for label, first, last, n in self._packs(selection):
            yield ChunkSpec(ENTITY, label, first, last, n)

    def prepare_target(self) -> None:
        with translate_errors(f"target {self.sink.public_url}"):
            self._limits = ensure_table(self.sink.connection(), self.table)
            state.ensure_state(self.sink.connection(), self.table)

    # -- one chunk ---------------------------------------------------------------------------------

    def run_chunk(self, spec: ChunkSpec, progress: ProgressCallback) -> ChunkOutcome:
        """Under the names' locks, in one transaction: each file checked; one whose status and hash are as
        recorded and stored is unchanged unread; any other is read, hashed and, when new, streamed in."""
        files = self._chunk_files(spec)
        outcome = ChunkOutcome(rows_read=len(files))
        names = sorted({f.name for f in files})
        records: list[state.FileRecord] = []
        with translate_errors(f"target {self.sink.public_url}"):
            conn = self.sink.connection()
            if self._limits is None:
                self._limits = column_limits(conn, self.table)
            next_report = time.monotonic() + PROGRESS_EVERY_S
            with versioning(conn, names, self.table, self._limits) as writer:
                known = {} if self.options.get("recompute") else state.recorded(writer.cur, self.table, names)
                for done, f in enumerate(files, 1):
                    try:
                        writer.check(f.event, f.model_type, f.name)
                        checked = self.source.check(f, self.max_bytes)
                        info, prior = checked[1], known.get(f.path)
                        if prior is not None and (prior.size, prior.mtime_ns) == (info.st_size, info.st_mtime_ns) \
                                and (prior.name, prior.event, prior.model_type) == (f.name, f.event, f.model_type) \
                                and writer.stored(f.event, f.model_type, prior.content_hash, f.name) is not None:
                            writer.counts.unchanged += 1
                            records.append(prior)
                            continue
                        content = self.source.read(f, self.max_bytes, self.buffer_bytes, checked)
                    except DataError as exc:
                        outcome.rejects.append(Reject(ENTITY, f.path, str(exc), f"root {f.root}"))
                        continue
                    writer.add(f.event, f.model_type, content.sha256, content.size, content.blocks(), f.path, f.name)
                    records.append(state.FileRecord(f.path, f.name, f.event, f.model_type, content.size,
                                                    content.mtime_ns, content.sha256))
                    if time.monotonic() >= next_report:  # each call is a broker event: not one per small file
                        progress(done)
                        next_report = time.monotonic() + PROGRESS_EVERY_S
                writer.end_copy()
                state.record(writer.cur, self.table, (r for r in records if known.get(r.source_path) != r))
        progress(len(files))
        outcome.writes = {TARGET: writer.counts}
        return outcome

    def _chunk_files(self, spec: ChunkSpec) -> list[ModelFile]:
        """The files of the chunk's names [lo, hi], by name, then as the chunk reads them."""
        roots = self.source.roots
        lo, hi = spec.lo, spec.hi
        listed = self.source.files({lo} if lo == hi else None)
        return sorted((f for f in listed if lo <= f.name <= hi), key=lambda f: (f.name, *f.sort_key(roots)))

    # -- after the run -----------------------------------------------------------------------------

    def target_counts(self, partitions: Sequence[str]) -> dict[tuple[str, str], int]:
        counts = {(TARGET, label): 0 for label in partitions}
        ranges = Ranges(partitions)
        for name, n in self._stored_per_name(ranges):
            label = ranges.label_of(name)
            if label is not None:
                counts[(TARGET, label)] += int(n)
        return counts

    def _stored_per_name(self, ranges: Ranges) -> list[tuple[str, int]]:
        if not ranges:
            return []
        return self.sink.query(sql.SQL("SELECT name, count(*) FROM {} WHERE name COLLATE \"C\" BETWEEN %s AND %s"
                                       " GROUP BY name").format(identifier(self.table)), [ranges.lowest, ranges.highest])

    def verify(self, selection: Selection, partitions: Sequence[str], rejected: dict[str, int]) -> list[Check]:
        """Per partition: every file there now was read by a chunk whose record (hash, size) matches a stored
        version of its model, unless it was rejected. No binary is read: the hash was taken over the bytes
        streamed into that version (`--option verify_bytes=true` re-hashes every stored binary as well)."""
        ranges = Ranges(partitions)
        files: dict[str, list[ModelFile]] = {}
        for f in self.source.files(set(self._names(selection) or ()) or None):
            label = ranges.label_of(f.name)
            if label is not None:
                files.setdefault(label, []).append(f)
        recorded = self.sink.query("SELECT to_regclass(%s) IS NOT NULL", [state.state_table(self.table)])[0][0]
        # A target migrated before the records existed has none: its files count as not recorded, and a
        # run (which stores nothing new for them) records them.
        matched = dict(self.sink.query(state.matching_query(self.table), [[f.path for fs in files.values() for f in fs]])) \
            if recorded else {}
        versions: Counter[str] = Counter()
        for name, n in self._stored_per_name(ranges):
            label = ranges.label_of(name)
            if label is not None:
                versions[label] += int(n)
        corrupt: Counter[str] = Counter()
        if self.options.get("verify_bytes") and ranges:
            for name, bad in self.sink.query(sql.SQL(
                    "SELECT name, count(*) FROM {} WHERE name COLLATE \"C\" BETWEEN %s AND %s"
                    " AND content_hash IS DISTINCT FROM " + HASH_SQL + " GROUP BY name").format(identifier(self.table)),
                    [ranges.lowest, ranges.highest]):
                label = ranges.label_of(name)
                if label is not None:
                    corrupt[label] += int(bad)
        checks = []
        for label in partitions:
            found = files.get(label, [])
            missing = sum(f.path not in matched for f in found)
            differs = sum(matched.get(f.path) is False for f in found) + corrupt[label]
            rej = rejected.get(label, 0)
            if corrupt[label]:
                detail = f"{corrupt[label]} stored versions do not hash to their content_hash"
            elif differs:
                detail = f"{differs} files' recorded hash or size matches no stored version of their model"
            elif missing > rej:
                detail = f"{missing - rej} files have no stored version recorded as read from them and were not rejected"
                if not recorded:
                    detail += f" ({state.STATE_TABLE} is missing: a target migrated by an older Shuttle; run again)"
            else:
                roots = Counter(f.root for f in found)
                detail = "files from " + ", ".join(f"{root} ({n})" for root, n in sorted(roots.items()))
            checks.append(Check(TARGET, label, not differs and missing <= rej, len(found), versions[label], rej, detail))
        return checks

    def after_run(self, partitions: Sequence[str]) -> list[str]:
        """The roots the files came from (workers on several hosts read them at these shared paths)."""
        ranges = Ranges(partitions)
        per_root = Counter(f.root for f in self.source.files() if ranges.label_of(f.name) is not None)
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


def _positive_int(value: Any, flag: str) -> int | None:
    if value in (None, ""):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ConfigError(f"{flag} must be a whole number of files, at least 1, got {value!r}")
    return number


def pack_label(first: str, last: str) -> str:
    """A chunk's partition label: the name, or `first/last` for a range of names."""
    return first if first == last else f"{first}/{last}"


class Ranges:
    """Partition labels as name ranges, to find the one a name falls in (labels never overlap)."""

    def __init__(self, labels: Sequence[str]) -> None:
        bounds = sorted((*(label.split("/", 1) * 2)[:2], label) for label in labels)
        self._lo = [lo for lo, _, _ in bounds]
        self._bounds = bounds

    def __bool__(self) -> bool:
        return bool(self._bounds)

    @property
    def lowest(self) -> str:
        return self._lo[0]

    @property
    def highest(self) -> str:
        return max(hi for _, hi, _ in self._bounds)

    def label_of(self, name: str) -> str | None:
        i = bisect.bisect_right(self._lo, name) - 1
        if i < 0:
            return None
        lo, hi, label = self._bounds[i]
        return label if lo <= name <= hi else None
