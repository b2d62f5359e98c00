"""`userdata-split`: the monolithic `user_data` collection → `dataset_metadata` + `transformation_configs`.

    source (MongoDB)                         target (MongoDB, `--target-schema` or the URL's database)
    ───────────────────────────────────────  ─────────────────────────────────────────────────────────
    user_data, partition: user_id         →  dataset_metadata         `_id` = the source `_id`
      one document per uploaded dataset   →  transformation_configs   `_id` = config_id = "{dataset_id}_config"
    field by field: `userdata_mapping` (the runbook's two tables, plus `legacy` so nothing is lost)

Chunks are (user, `_id` range [lo, hi)), cut from the data (`mongo_source`). A chunk makes its range of the
target equal to what the source holds now: both documents of every source document are upserted by `_id`
(identical ones are not rewritten), and the target documents of source documents that are gone are deleted,
configuration first (unless the run's `keep_deleted` option is set). A rejected document's earlier target
documents are left as they were: a reject is not a deletion.

Indexes are built once all chunks are done (`finish_target`). Verification: counts per collection and
user, the runbook's check (documents with a non-empty history = configurations with
`total_transformations > 0`), every index present, and `--sample N` documents compared field by field
through the mapping.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from common.connectors.mongo import Index, Sink, translate_errors
from common.connectors.mongo_source import NO_PARTITION, Source
from common.errors import ConfigError
from common.migrations.base import Check, Migration, ProgressCallback, Selection
from common.migrations.userdata_mapping import BadDocument, config_id, differences, split
from common.model import ChunkOutcome, ChunkSpec, PartitionCount, Reject, WriteCounts
from common.write_behind import WriteBehind

log = logging.getLogger("shuttle.userdata_split")

ENTITY = "user_data"
METADATA = "dataset_metadata"
CONFIGS = "transformation_configs"
DEFAULT_BATCH = 1_000
DEFAULT_SAMPLE = 50

#  collection               indexes (built after the load): the runbook's, unique where it says so
INDEXES: dict[str, tuple[Index, ...]] = {
    METADATA: (Index((("dataset_id", 1),), unique=True), Index((("user_id", 1), ("created_at", -1)))),
    CONFIGS:  (Index((("config_id", 1),), unique=True), Index((("user_id", 1), ("dataset_id", 1)))),
}


def truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def cut_chunks(source: Source, counts: dict[str, int], entity: str, chunk_rows: int) -> Iterator[ChunkSpec]:
    """A partition that fits is one chunk over every `_id`; a larger one is cut at the data's own `_id`s."""
    for partition in sorted(counts):
        rows = counts[partition]
        bounds = ["", *source.boundaries(partition, chunk_rows), ""] if rows > chunk_rows else ["", ""]
        for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            yield ChunkSpec(entity, partition, lo, hi, min(chunk_rows, max(0, rows - i * chunk_rows)))


def unknown_partitions(selected: Sequence[str] | None, counts: dict[str, int]) -> None:
    missing = sorted(set(selected or ()) - set(counts))
    if missing:
        raise ConfigError(f"unknown user ids: {', '.join(missing)}; list them with: "
                          "db.user_data.distinct('user_id')")


def group_counts(sink: Sink, collection: str, field: str = "user_id") -> dict[str, int]:
    """Documents per value of `field` in a target collection, counted by the server in one `$group`."""
    out: dict[str, int] = {}
    with translate_errors(f"target {sink.public_url}"):
        for group in sink.db[collection].aggregate([{"$group": {"_id": f"${field}", "n": {"$sum": 1}}}]):
            name = group["_id"] if isinstance(group["_id"], str) and group["_id"] else NO_PARTITION
            out[name] = out.get(name, 0) + int(group["n"])
    return out


def index_checks(sink: Sink, wanted: dict[str, tuple[Index, ...]]) -> list[Check]:
    """One line per collection: each index present, unique where it must be (compared by field names)."""
    checks = []
    for collection, indexes in sorted(wanted.items()):
        present = {(tuple(f for f, _ in i.keys), i.unique) for i in sink.indexes(collection)}
        absent = [i for i in indexes if (tuple(f for f, _ in i.keys), i.unique) not in present]
        detail = "; ".join(f"{'unique ' if i.unique else ''}index ({', '.join(f for f, _ in i.keys)}) missing"
                           for i in absent)
        checks.append(Check(f"{collection} (indexes)", "indexes", not absent, len(indexes),
                            len(indexes) - len(absent), 0, detail))
    return checks


class UserdataSplit(Migration):
    name = "userdata-split"
    summary = "user_data (MongoDB) → dataset_metadata + transformation_configs, lossless; `shuttle rollback` undoes it"
    source_kind = "mongo"
    target_kind = "mongo"
    partition_label = "user"
    status = "available"

    def __init__(self, source_url: str, target_url: str, options: dict[str, Any]) -> None:
        super().__init__(source_url, target_url, options)
        self.source = Source(source_url, options.get("source_collection") or ENTITY, "user_id",
                             database=options.get("source_database") or None)
        self.sink = Sink(target_url, database=options.get("target_database") or None,
                         batch_size=int(options.get("batch_size") or DEFAULT_BATCH))
        self.keep_deleted = bool(options.get("keep_deleted"))
        self._counts: dict[str, int] | None = None
        self._writes = WriteBehind()

    @classmethod
    def plan_options(cls, **flags: Any) -> dict[str, Any]:
        extra = flags.get("options") or {}
        source_schema, target_schema = flags.get("source_schema"), flags.get("target_schema")
        return {
            # --source-schema / --target-schema name the MongoDB databases (else the URLs' paths do).
            "source_database": source_schema if source_schema and source_schema != "public" else None,
            "target_database": target_schema if target_schema and target_schema != "public" else None,
            "source_collection": extra.get("source_collection", ENTITY),
            "batch_size": int(flags.get("batch_size") or extra.get("batch_size") or DEFAULT_BATCH),
            "sample": int(flags["sample"] if flags.get("sample") is not None else extra.get("sample", DEFAULT_SAMPLE)),
            "keep_deleted": truthy(extra.get("keep_deleted", False)),
        }

    def check_services(self) -> None:
        self.source.check_reachable()
        self.sink.check_reachable()

    # -- planning --------------------------------------------------------------------------------

    def count_partitions(self, selection: Selection) -> list[PartitionCount]:
        """Documents per user. Users that are in the target but no longer in the source count 0 rows and
        get one chunk, which deletes their documents (a chunk owns its range, here the whole user)."""
        counts = self.source.count_partitions(None)
        in_target = group_counts(self.sink, METADATA) if METADATA in self._collections() else {}
        # Stored with the run: into an empty target no chunk has anything to delete (see `run_chunk`).
        self.options["target_was_empty"] = not in_target
        if not self.keep_deleted:
            for user in in_target:
                counts.setdefault(user, 0)
        unknown_partitions(selection.partitions, counts)
        if selection.partitions is not None:
            counts = {p: counts[p] for p in selection.partitions}
        self._counts = counts
        return [PartitionCount(ENTITY, p, n) for p, n in sorted(counts.items())]

    def _collections(self) -> set[str]:
        with translate_errors(f"target {self.sink.public_url}"):
            return set(self.sink.db.list_collection_names())

    def plan_chunks(self, selection: Selection, chunk_rows: int) -> Iterator[ChunkSpec]:
        if self._counts is None:
            self.count_partitions(selection)
        yield from cut_chunks(self.source, self._counts or {}, ENTITY, chunk_rows)

    def prepare_target(self) -> None:
        """The collections only: their indexes are built after the load (`finish_target`)."""
        self.sink.ensure_collections([METADATA, CONFIGS])

    def finish_target(self) -> None:
        """The runbook's indexes, built once every chunk has ended (idempotent); a refused one shows in verify."""
        for collection, indexes in INDEXES.items():
            for index, reason in self.sink.ensure_indexes(collection, indexes).items():
                log.warning("userdata-split: index %s on %s refused: %s", index.keys, collection, reason)

    # -- one chunk -------------------------------------------------------------------------------

    def run_chunk(self, spec: ChunkSpec, progress: ProgressCallback) -> ChunkOutcome:
        """Read batches, split each document, write both collections while the next batch is read."""
        outcome = ChunkOutcome(writes={METADATA: WriteCounts(), CONFIGS: WriteCounts()})
        seen: set[Any] = set()
        try:
            for batch in self.source.read(spec.partition, spec.lo, spec.hi, self.sink.batch_size):
                metadata, configs = [], []
                for doc in batch:
                    outcome.rows_read += 1
                    seen.add(doc["_id"])
                    try:
                        m, c = split(doc)
                    except BadDocument as exc:
                        outcome.rejects.append(Reject(ENTITY, str(doc.get("_id")), str(exc), _excerpt(doc)))
                        continue
                    metadata.append(m)
                    configs.append(c)
                self._writes.submit(self._flush, metadata, configs, outcome)
                progress(outcome.rows_read)
            self._writes.finish()
        except BaseException:
            self._writes.abandon()
            raise
        if not (self.keep_deleted or self.options.get("target_was_empty")) and spec.partition != NO_PARTITION:
            self._delete_gone(spec, seen, outcome)
        progress(outcome.rows_read)
        return outcome

    def _flush(self, metadata: list[dict[str, Any]], configs: list[dict[str, Any]], outcome: ChunkOutcome) -> None:
        """Runs in the write-behind thread, which alone touches `outcome.writes` (see mlflow_to_mongo)."""
        for collection, docs in ((METADATA, metadata), (CONFIGS, configs)):
            if docs:
                result = self.sink.upsert_documents(collection, docs, entity=ENTITY)
                outcome.rejects.extend(result.rejects)
                outcome.writes[collection] += result.counts

    def _delete_gone(self, spec: ChunkSpec, seen: set[Any], outcome: ChunkOutcome) -> None:
        """Target documents of the chunk's range whose source document is gone: the configuration first,
        so a crash in between leaves a dataset whose deletion the re-run completes, never an orphan config.

        Skipped by a run whose target was empty when it was planned: nothing there can be gone, and the
        query reads every dataset of the range (a full scan per chunk on a server without an index on
        `user_id`, the cost of the load growing with the square of its size). A document deleted at the
        source while such a run is under way, after its chunk wrote it and before a redelivery of that chunk,
        stays in the target; the report's counts then exceed the source's and fail the verdict, and the next
        run (whose target is not empty) deletes it."""
        query = self.source.query(spec.partition, spec.lo, spec.hi)
        with translate_errors(f"target {self.sink.public_url}"):
            present = [d["_id"] for d in self.sink.db[METADATA].find(query, {"_id": 1})]
            gone = [i for i in present if i not in seen]
            if not gone:
                return
            configs = self.sink.db[CONFIGS].delete_many({"_id": {"$in": [config_id(i) for i in gone]}})
            metadata = self.sink.db[METADATA].delete_many({"_id": {"$in": gone}})
        outcome.writes[CONFIGS].deleted += configs.deleted_count
        outcome.writes[METADATA].deleted += metadata.deleted_count

    # -- after the run ---------------------------------------------------------------------------

    def target_counts(self, partitions: Sequence[str]) -> dict[tuple[str, str], int]:
        wanted = set(partitions)
        return {(collection, user): n for collection in (METADATA, CONFIGS)
                for user, n in group_counts(self.sink, collection).items() if user in wanted}

    def verify(self, selection: Selection, partitions: Sequence[str], rejected: dict[str, int]) -> list[Check]:
        source = self.source.count_partitions(list(partitions))
        target = self.target_counts(partitions)
        checks = []
        for partition in sorted(set(partitions)):
            src, rej = source.get(partition, 0), rejected.get(partition, 0)
            for collection in (METADATA, CONFIGS):
                dst = target.get((collection, partition), 0)
                ok = src - rej <= dst <= src  # a rejected document's earlier target documents may remain
                detail = "" if dst == src else f"{src - dst:+d} documents missing" + (f" ({rej} rejects)" if rej else "")
                checks.append(Check(collection, partition, ok, src, dst, rej if src != dst else 0, detail))
        checks.append(self._history_check(list(partitions), sum(rejected.values())))
        checks += index_checks(self.sink, INDEXES)
        checks += self._sample_check(None if selection.partitions is None else list(partitions),
                                     int(self.options.get("sample", DEFAULT_SAMPLE)))
        return checks

    def _history_check(self, partitions: list[str], rejects: int) -> Check:
        """The runbook's check: source documents with a non-empty history = configurations with
        `total_transformations > 0` (fewer by at most the rejects, whose configurations were not written).

        Both sides are a `$match` a server answers from the documents' fields, then a `$group`: the source's
        `{"transformation_history.0": {"$exists": true}}` (a first element exists: a non-empty history; a history
        that is not an array is a reject), the target's `total_transformations > 0`. Computing "is a non-empty
        array" inside the `$group` (`$isArray`, `$size`) made a server evaluate an expression per document, which
        some do in an interpreter: on the test server it cost more than the split itself (ops/bench/RESULTS.md)."""
        wanted = set(partitions)
        with self.source.errors():
            groups = self.source.collection.aggregate([{"$match": {"transformation_history.0": {"$exists": True}}},
                                                       {"$group": {"_id": "$user_id", "n": {"$sum": 1}}}])
            src = sum(int(g["n"]) for g in groups if g["_id"] in wanted)
        with translate_errors(f"target {self.sink.public_url}"):
            groups = self.sink.db[CONFIGS].aggregate([{"$match": {"total_transformations": {"$gt": 0}}},
                                                      {"$group": {"_id": "$user_id", "n": {"$sum": 1}}}])
            dst = sum(int(g["n"]) for g in groups if g["_id"] in wanted)
        ok = dst == src or 0 <= src - dst <= rejects
        return Check("history = configs applied", "runbook check", ok, src, dst, src - dst if src != dst else 0,
                     "" if src == dst else f"{src - dst:+d} (rejects: {rejects})")

    def _sample_check(self, partitions: list[str] | None, sample: int) -> list[Check]:
        """`sample` source documents (the server's `$sample`: a random pick, different on every report)
        mapped again and compared field by field, type by type, with both stored documents. A rejected
        document is not expected in the target."""
        ids = self.source.sample_ids(partitions, sample)
        if not ids:
            return []
        docs = self.source.find_by_ids(ids)
        metadata = {d["_id"]: d for d in self.sink.find(METADATA, {"_id": {"$in": ids}})}
        configs = {d["_id"]: d for d in self.sink.find(CONFIGS, {"_id": {"$in": [config_id(i) for i in ids]}})}
        problems, compared, rejected = [], 0, 0
        for i in ids:
            try:
                want_m, want_c = split(docs[i])
            except (BadDocument, KeyError):
                rejected += 1
                continue
            compared += 1
            for name, want, got in ((METADATA, want_m, metadata.get(i)), (CONFIGS, want_c, configs.get(config_id(i)))):
                if got is None:
                    problems.append(f"{i}: missing in {name}")
                elif diff := differences(want, got):
                    problems.append(f"{i}: {name} differs at {'; '.join(diff[:2])}")
        return [Check("user_data (sample)", "field by field", not problems, compared + rejected,
                      compared - len({p.split(':')[0] for p in problems}), rejected, "; ".join(problems[:3]))]

    def close(self) -> None:
        self._writes.close()
        self.source.close()
        self.sink.close()


def _excerpt(doc: dict[str, Any]) -> str:
    return repr({k: (v if len(repr(v)) < 100 else f"<{type(v).__name__}>") for k, v in doc.items()})[:500]
