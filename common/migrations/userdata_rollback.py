"""`userdata-rollback`: `user_data` documents rebuilt from `dataset_metadata` + `transformation_configs`.

    source (the split's target)              target (the split's source database)
    ───────────────────────────────────────  ─────────────────────────────────────────────────────────
    dataset_metadata, partition: user_id  →  user_data, or the collection `into` names
      + its transformation_configs           `_id` = the original `_id`, every field and type as it was
        document (by config_id)              (`userdata_mapping.join`: the tables read backwards, then
                                             `legacy` and `legacy_absent`)

Started by `shuttle rollback RUN` from a `userdata-split` run, whose URLs, databases and selection it
takes. An engine run like any other: chunked by user and `_id` range, idempotent (a rebuilt document
identical to the stored one is not rewritten, so a rollback over an intact `user_data` writes nothing),
resumable and reported.

It adds and replaces, never deletes: a `user_data` document the split rejected has no target documents
and must stay where it is. With `verify`, every rebuilt document is compared, field by field and type
by type, with the original of the same `_id` in `original` (default `user_data`) where it still exists,
before anything is written: one that differs is not written, becomes a reject naming the fields, and
fails the verdict.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from common.connectors.mongo import Sink, translate_errors
from common.connectors.mongo_source import Source
from common.migrations.base import Check, Migration, ProgressCallback, Selection
from common.migrations.userdata_mapping import config_id, differences, join
from common.migrations.userdata_split import (CONFIGS, DEFAULT_BATCH, METADATA, cut_chunks, group_counts, truthy,
                                              unknown_partitions)
from common.model import ChunkOutcome, ChunkSpec, PartitionCount, Reject, WriteCounts
from common.write_behind import WriteBehind

ORIGINAL = "user_data"


class UserdataRollback(Migration):
    name = "userdata-rollback"
    summary = "Rebuild user_data from dataset_metadata + transformation_configs (`shuttle rollback RUN`)"
    source_kind = "mongo"
    target_kind = "mongo"
    partition_label = "user"
    status = "available"

    def __init__(self, source_url: str, target_url: str, options: dict[str, Any]) -> None:
        super().__init__(source_url, target_url, options)
        self.source = Source(source_url, METADATA, "user_id", database=options.get("source_database") or None)
        self.sink = Sink(target_url, database=options.get("target_database") or None,
                         batch_size=int(options.get("batch_size") or DEFAULT_BATCH))
        self.into = options.get("into") or ORIGINAL
        self.original = options.get("original") or ORIGINAL
        self.check_originals = bool(options.get("verify"))
        self._counts: dict[str, int] | None = None
        self._writes = WriteBehind()

    @classmethod
    def plan_options(cls, **flags: Any) -> dict[str, Any]:
        extra = flags.get("options") or {}
        original = flags.get("original") or extra.get("original") or ORIGINAL
        return {
            "source_database": flags.get("source_database") or extra.get("source_database"),
            "target_database": flags.get("target_database") or extra.get("target_database"),
            "into": flags.get("into") or extra.get("into") or original,
            "original": original,
            "verify": bool(flags.get("verify")) or truthy(extra.get("verify", False)),
            "batch_size": int(flags.get("batch_size") or extra.get("batch_size") or DEFAULT_BATCH),
            "split_run": flags.get("split_run"),
        }

    def check_services(self) -> None:
        self.source.check_reachable()
        self.sink.check_reachable()

    def count_partitions(self, selection: Selection) -> list[PartitionCount]:
        counts = self.source.count_partitions(None)
        unknown_partitions(selection.partitions, counts)
        if selection.partitions is not None:
            counts = {p: counts[p] for p in selection.partitions}
        self._counts = counts
        return [PartitionCount(METADATA, p, n) for p, n in sorted(counts.items())]

    def plan_chunks(self, selection: Selection, chunk_rows: int) -> Iterator[ChunkSpec]:
        if self._counts is None:
            self.count_partitions(selection)
        yield from cut_chunks(self.source, self._counts or {}, METADATA, chunk_rows)

    def prepare_target(self) -> None:
        self.sink.ensure_collections([self.into])

    # -- one chunk -------------------------------------------------------------------------------

    def run_chunk(self, spec: ChunkSpec, progress: ProgressCallback) -> ChunkOutcome:
        """Each batch of `dataset_metadata` with its configurations, joined, checked, written behind."""
        outcome = ChunkOutcome(writes={self.into: WriteCounts()})
        configs = self.source.client[self.source.database_name][CONFIGS]
        try:
            for batch in self.source.read(spec.partition, spec.lo, spec.hi, self.sink.batch_size):
                outcome.rows_read += len(batch)
                with self.source.errors():
                    found = {d["_id"]: d for d in configs.find({"_id": {"$in": [config_id(m["_id"]) for m in batch]}})}
                rebuilt = []
                for metadata in batch:
                    config = found.get(config_id(metadata["_id"]))
                    if config is None:
                        outcome.rejects.append(Reject(METADATA, str(metadata["_id"]),
                                                      f"no {CONFIGS} document {config_id(metadata['_id'])}"))
                        continue
                    rebuilt.append(join(metadata, config))
                if self.check_originals:
                    rebuilt = self._same_as_originals(rebuilt, outcome)
                self._writes.submit(self._flush, rebuilt, outcome)
                progress(outcome.rows_read)
            self._writes.finish()
        except BaseException:
            self._writes.abandon()
            raise
        return outcome

    def _same_as_originals(self, rebuilt: list[dict[str, Any]], outcome: ChunkOutcome) -> list[dict[str, Any]]:
        """The rebuilt documents equal to their originals (or whose original is gone); the others are rejects."""
        with translate_errors(f"target {self.sink.public_url}"):
            originals = {d["_id"]: d for d in self.sink.db[self.original].find(
                {"_id": {"$in": [d["_id"] for d in rebuilt]}})}
        keep = []
        for doc in rebuilt:
            original = originals.get(doc["_id"])
            found = differences(original, doc) if original is not None else []
            if found:
                outcome.rejects.append(Reject(METADATA, str(doc["_id"]),
                                              f"rebuilt document differs from the original in {self.original}: "
                                              + "; ".join(found[:5])))
            else:
                keep.append(doc)
        return keep

    def _flush(self, docs: list[dict[str, Any]], outcome: ChunkOutcome) -> None:
        if docs:
            result = self.sink.upsert_documents(self.into, docs, entity=METADATA)
            outcome.rejects.extend(result.rejects)
            outcome.writes[self.into] += result.counts

    # -- after the run ---------------------------------------------------------------------------

    def target_counts(self, partitions: Sequence[str]) -> dict[tuple[str, str], int]:
        wanted = set(partitions)
        return {(self.into, user): n for user, n in group_counts(self.sink, self.into).items() if user in wanted}

    def verify(self, selection: Selection, partitions: Sequence[str], rejected: dict[str, int]) -> list[Check]:
        """Per user: every dataset has its rebuilt document (the collection may hold more: documents the
        split rejected stay in `user_data`); with `verify`, no rebuilt document differed from its original."""
        source = self.source.count_partitions(list(partitions))
        target = self.target_counts(partitions)
        checks = []
        for partition in sorted(set(partitions)):
            src, dst, rej = source.get(partition, 0), target.get((self.into, partition), 0), rejected.get(partition, 0)
            ok = dst >= src and not rej
            detail = f"{rej} documents not rebuilt (see rejects)" if rej else (
                f"{dst - src} more documents than datasets (e.g. ones the split rejected)" if dst > src else
                "" if ok else f"{src - dst} documents missing")
            checks.append(Check(self.into, partition, ok, src, dst, rej, detail))
        if self.check_originals:
            differing = sum(rejected.values())
            checks.append(Check(f"{self.into} = {self.original}", "every document, field by field", not differing,
                                sum(source.values()), sum(source.values()) - differing, differing,
                                f"{differing} rebuilt documents differ from their originals" if differing else
                                "each rebuilt document equal to its original (where it still exists), every "
                                "field and type"))
        return checks

    def close(self) -> None:
        self._writes.close()
        self.source.close()
        self.sink.close()
