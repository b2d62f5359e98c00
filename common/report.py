"""The run report: the ledger's counts per entity and partition, recounted targets, and a verdict.

Built from the ledger, never from task results, so a chunk delivered twice counts once. The same
function serves the coordinator task and `shuttle report`.
"""

from __future__ import annotations

import logging
from typing import Any

from common.ledger import TERMINAL_CHUNK_STATES, Ledger, RunRecord
from common.migrations.base import Migration, Selection
from common.model import WriteCounts
from common.urls import mask

CLEAN = "clean"
FAILED = "failed"
CANCELLED = "cancelled"
RUNNING = "running"
REJECT_SAMPLE = 20
log = logging.getLogger("shuttle.report")


def build_report(ledger: Ledger, run: RunRecord, migration: Migration) -> dict[str, Any]:
    """Aggregate the ledger and recount the target; decide the verdict."""
    progress = ledger.progress(run.run_id)
    groups = ledger.partition_totals(run.run_id)
    planned: dict[str, dict[str, int]] = run.options.get("planned", {})
    partitions = sorted({p for rows in planned.values() for p in rows} | {g["partition"] for g in groups})
    finished = progress.finished
    if finished:
        # e.g. indexes built after the load: first, so the counts below and verify can use them
        migration.finish_target()
    target_rows = migration.target_counts(partitions)
    rejected_by_partition: dict[str, int] = {}
    for g in groups:
        rejected_by_partition[g["partition"]] = rejected_by_partition.get(g["partition"], 0) + g["rows_rejected"]
    checks = []
    if finished:
        checks = migration.verify(Selection.from_dict(run.selection), partitions, rejected_by_partition)

    rows = []
    by_key = {(g["entity"], g["partition"]): g for g in groups}
    target_entities = sorted({entity for entity, _ in target_rows})
    totals = {"source_rows": 0, "rows_read": 0, "rows_rejected": 0}
    per_target: dict[str, dict[str, int]] = {}
    for source_entity, counts in sorted(planned.items()):
        for partition in partitions:
            g = by_key.get((source_entity, partition), {})
            source_rows = counts.get(partition, 0)
            totals["source_rows"] += source_rows
            totals["rows_read"] += g.get("rows_read", 0)
            totals["rows_rejected"] += g.get("rows_rejected", 0)
            # A migration whose target entities are its source entities (one collection per table)
            # pairs each with itself; otherwise every target entity is derived from the source one.
            targets = [source_entity] if source_entity in target_entities or set(planned) <= set(target_entities) \
                else target_entities
            for target in targets:
                writes = {**WriteCounts.zero(), **g.get("writes", {}).get(target, {})}
                acc = per_target.setdefault(target, {**WriteCounts.zero(), "target_rows": 0})
                for k in WriteCounts.zero():
                    acc[k] += writes[k]
                acc["target_rows"] += target_rows.get((target, partition), 0)
                rows.append({
                    "entity": target, "source_entity": source_entity, "partition": partition,
                    "source_rows": source_rows, "rows_read": g.get("rows_read", 0),
                    "rows_written": writes["inserted"] + writes["updated"] + writes["deleted"],
                    "rows_inserted": writes["inserted"],
                    "rows_updated": writes["updated"], "rows_unchanged": writes["unchanged"],
                    "rows_deleted": writes["deleted"],
                    "rows_rejected": g.get("rows_rejected", 0),
                    "target_rows": target_rows.get((target, partition), 0),
                })
    written = sum(t["inserted"] + t["updated"] + t["deleted"] for t in per_target.values())
    verdict, reason = _verdict(run, progress.chunks, finished, totals, checks, written)
    timing = ledger.run_timing(run.run_id)
    wall = timing.get("wall_seconds") or 0
    timing["rows_per_second"] = round(totals["rows_read"] / wall) if wall else None
    timing["redeliveries"] = max(0, timing["attempts"] - progress.chunks.get("done", 0) - progress.chunks.get("failed", 0))
    timing["healed"] = ledger.event_counts(run.run_id)  # stale chunks and lost messages sent again, coordinators started
    return {  # run id, status and verdict first: what a script or a reader looks for
        "run_id": run.run_id,
        "status": run.status,
        "verdict": verdict,
        "verdict_reason": reason,
        "migration": run.migration,
        "source": mask(run.source_url or ""),
        "target": mask(run.target_url or ""),
        "selection": run.selection,
        "chunks": {"total": progress.chunk_count, **progress.chunks},
        "totals": {**totals, "rows_written": written,
                   "rows_unchanged": sum(t["unchanged"] for t in per_target.values()),
                   "rows_deleted": sum(t["deleted"] for t in per_target.values()),
                   "targets": per_target},
        "partitions": rows,
        "checks": [c.as_dict() for c in checks],
        "rejects": {"total": totals["rows_rejected"], "sample": ledger.rejects_of(run.run_id, REJECT_SAMPLE)},
        "failed_chunks": ledger.failed_chunks(run.run_id),
        "timing": timing,
        "storage": migration.storage_sizes() if finished else {},
        "actions": [],
        "max_rejects": run.max_rejects,
    }


READING_ORDER = ("run_id", "status", "verdict", "verdict_reason", "migration", "source", "target", "selection",
                 "chunks", "totals", "failed_chunks", "rejects", "timing", "storage", "actions", "max_rejects",
                 "partitions", "checks")


def in_reading_order(report: dict[str, Any]) -> dict[str, Any]:
    """The report with run id, status and verdict first, per-partition detail last. The ledger stores it
    as JSONB, which keeps no key order, so `--json` puts it back in this order."""
    known = {key: report[key] for key in READING_ORDER if key in report}
    return {**known, **{key: value for key, value in report.items() if key not in known}}


def _verdict(run: RunRecord, chunks: dict[str, int], finished: bool, totals: dict[str, int],
             checks: list, written: int) -> tuple[str, str]:
    if not finished:
        open_chunks = sum(n for s, n in chunks.items() if s not in TERMINAL_CHUNK_STATES)
        return RUNNING, f"{open_chunks} chunks still queued or running"
    if chunks.get("cancelled"):
        return CANCELLED, f"cancelled with {chunks['cancelled']} chunks not run; `shuttle resume {run.run_id}` finishes it"
    if chunks.get("failed"):
        return FAILED, f"{chunks['failed']} chunks failed; see `shuttle status {run.run_id}`, then `shuttle resume`"
    rejected = totals["rows_rejected"]
    if run.max_rejects is not None and rejected > run.max_rejects:
        return FAILED, f"{rejected} rows rejected, more than --max-rejects {run.max_rejects}"
    bad = [c for c in checks if not c.ok]
    if bad:
        return FAILED, f"source and target disagree in {len(bad)} partitions (first: {bad[0].partition}: {bad[0].detail})"
    applied = totals["rows_read"] - rejected
    # "applied", not "migrated": a derived target (hourly buckets, latest metrics) folds many source rows
    # into few target rows, which the clause after says.
    text = f"all {totals['source_rows']:,} source rows accounted for: {applied:,} read and applied to the target"
    text += f", {rejected:,} rejected (see rejects)" if rejected else ", none rejected"
    text += f"; {written:,} target rows written" if written else "; target already up to date, nothing changed"
    return CLEAN, text


def close_run(ledger: Ledger, run: RunRecord, migration: Migration, report: dict[str, Any]) -> dict[str, Any]:
    """Follow-up actions of a clean run, the run's final status, and the stored report."""
    if report["verdict"] == CLEAN:
        partitions = sorted({row["partition"] for row in report["partitions"]})
        report["actions"] = migration.after_run(partitions)
    if report["verdict"] == RUNNING:
        ledger.save_report(run.run_id, report["verdict"], report)
        return report
    status = {CLEAN: "completed", CANCELLED: "cancelled"}.get(report["verdict"], "failed")
    built_on = {state: n for state, n in report["chunks"].items() if state != "total"}
    closed = ledger.close_run(run.run_id, status, report["verdict"], {**report, "status": status}, built_on)
    if closed:
        report["status"] = status
    else:  # resumed while this report was built: the run goes on, and its own last chunk will close it
        log.info("run %s was reopened while its report was built; not closing it", run.run_id)
    return report
