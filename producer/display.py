"""How the CLI shows plans, runs, reports and checks (rich tables; --json where scripts read)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.ledger import Progress, RunRecord
from common.migrations import all_migrations
from common.migrations.base import Check
from producer.planner import Plan

VERDICT_STYLE = {"clean": "bold green", "failed": "bold red", "cancelled": "yellow", "running": "cyan"}


def show_migrations(console: Console) -> None:
    table = Table(title="Shuttle migrations")
    for col in ("name", "source → target", "partition by", "status", "what it does"):
        table.add_column(col)
    for m in all_migrations():
        table.add_row(m.name, f"{m.source_kind} → {m.target_kind}", m.partition_label, m.status, m.summary)
    console.print(table)


def show_plan(console: Console, plan: Plan, workers: int) -> None:
    table = Table(title=f"Plan for {plan.migration} (dry run: nothing written)")
    table.add_column("partition")
    table.add_column("entity")
    table.add_column("source rows", justify="right")
    table.add_column("chunks", justify="right")
    per_partition: dict[str, int] = {}
    for chunk in plan.chunks:
        per_partition[chunk.partition] = per_partition.get(chunk.partition, 0) + 1
    for p in plan.partitions:
        table.add_row(p.partition, p.entity, f"{p.rows:,}", str(per_partition.get(p.partition, 0)))
    console.print(table)
    console.print(f"{plan.total_rows:,} rows in {len(plan.chunks)} chunks; estimated "
                  f"{_duration(plan.estimated_seconds(workers))} with {workers} worker process(es)")


def show_runs(console: Console, runs: list[RunRecord]) -> None:
    table = Table(title="Recent runs")
    for col in ("run", "migration", "status", "rows", "chunks", "created"):
        table.add_column(col)
    for r in runs:
        table.add_row(r.run_id, r.migration, r.status, f"{r.total_rows:,}", str(r.chunk_count),
                      f"{r.created_at:%Y-%m-%d %H:%M:%S}" if r.created_at else "")
    console.print(table)


def show_progress(console: Console, run: RunRecord, progress: Progress) -> None:
    pct = 100 * progress.rows_done / progress.total_rows if progress.total_rows else 100.0
    states = ", ".join(f"{n} {s}" for s, n in sorted(progress.chunks.items()))
    console.print(f"[bold]{run.run_id}[/] ({run.migration}) {run.status}: {progress.rows_done:,} of "
                  f"{progress.total_rows:,} rows ({pct:.1f}%); chunks: {states or 'none'}")


def show_report(console: Console, report: dict[str, Any]) -> None:
    verdict = report["verdict"]
    console.print(f"\n[bold]Run {report['run_id']}[/] ({report['migration']}), status {report['status']}")
    console.print(f"source {report['source']}\ntarget {report['target']}")
    table = Table(title="Per partition (all target entities; `--json` has each entity)")
    for col in ("partition", "source rows", "rejected", "written", "unchanged", "target rows"):
        table.add_column(col, justify="left" if col == "partition" else "right")
    merged: dict[str, dict[str, int]] = {}
    counted: set[tuple[str, str]] = set()
    for row in report["partitions"]:
        m = merged.setdefault(row["partition"], {"source": 0, "rejected": 0, "written": 0, "unchanged": 0, "target": 0})
        # Source rows and rejects belong to the source entity; count each once however many targets it feeds.
        if (row["source_entity"], row["partition"]) not in counted:
            counted.add((row["source_entity"], row["partition"]))
            m["source"] += row["source_rows"]
            m["rejected"] += row["rows_rejected"]
        m["written"] += row["rows_written"]
        m["unchanged"] += row["rows_unchanged"]
        m["target"] += row["target_rows"]
    for partition, m in merged.items():
        table.add_row(partition, f"{m['source']:,}", f"{m['rejected']:,}", f"{m['written']:,}",
                      f"{m['unchanged']:,}", f"{m['target']:,}")
    if len(merged) <= 100:
        console.print(table)
    totals = report["totals"]
    console.print(f"source rows {totals['source_rows']:,} · read {totals['rows_read']:,} · written "
                  f"{totals['rows_written']:,} · unchanged {totals['rows_unchanged']:,} · deleted {totals['rows_deleted']:,}"
                  f" · rejected {totals['rows_rejected']:,}")
    for target, t in sorted(totals["targets"].items()):
        console.print(f"  {target}: {t['target_rows']:,} rows (inserted {t['inserted']:,}, updated "
                      f"{t['updated']:,}, unchanged {t['unchanged']:,}, deleted {t['deleted']:,})")
    bad = [c for c in report["checks"] if not c["ok"]]
    if report["checks"]:
        show_check_summary(console, report["checks"])
        console.print(f"checks: {len(report['checks']) - len(bad)} of {len(report['checks'])} partitions reconcile"
                      + ("" if not bad else f"; failing: {', '.join(c['partition'] for c in bad[:10])}"))
    if report["rejects"]["sample"]:
        rejects = Table(title=f"Rejects ({report['rejects']['total']:,}; first {len(report['rejects']['sample'])})")
        for col in ("entity", "partition", "key", "reason"):
            rejects.add_column(col)
        for r in report["rejects"]["sample"]:
            rejects.add_row(r["entity"], r["partition"], escape(r["key"]), escape(r["reason"]))
        console.print(rejects)
    timing = report["timing"]
    if timing.get("wall_seconds"):
        console.print(f"time {_duration(timing['wall_seconds'])}, {timing['rows_per_second']:,} rows/s, "
                      f"{timing['redeliveries']} redelivered or retried chunks")
    storage = report.get("storage") or {}
    if storage.get("source_bytes"):
        console.print(f"storage: target {_size(storage['target_bytes'])} vs source {_size(storage['source_bytes'])} "
                      f"({100 * storage['target_bytes'] / storage['source_bytes']:.1f}%)")
    for action in report.get("actions", []):
        console.print(f"action: {action}")
    console.print(f"verdict: [{VERDICT_STYLE.get(verdict, 'bold')}]{verdict}[/] — {escape(report['verdict_reason'])}")


def show_check_summary(console: Console, checks: list[dict[str, Any]]) -> None:
    """One line per checked entity (table, reference, sample): ✅ when every partition of it holds."""
    by_entity: dict[str, dict[str, Any]] = {}
    for c in checks:
        e = by_entity.setdefault(c["entity"], {"source": 0, "target": 0, "rejected": 0, "ok": True, "detail": ""})
        e["source"] += c["source_rows"]
        e["target"] += c["target_rows"]
        e["rejected"] += c["rejected_rows"]
        e["ok"] = e["ok"] and c["ok"]
        e["detail"] = e["detail"] or ("" if c["ok"] and c["partition"] != "warning" else c["detail"])
    table = Table(title="Verification per table")
    for col, justify in (("", "left"), ("table / check", "left"), ("source", "right"), ("target", "right"),
                         ("rejected", "right"), ("detail", "left")):
        table.add_column(col, justify=justify)
    for entity, e in by_entity.items():
        table.add_row("✅" if e["ok"] else "❌", entity, f"{e['source']:,}", f"{e['target']:,}", f"{e['rejected']:,}",
                      e["detail"][:80])
    console.print(table)


def show_checks(console: Console, checks: list[Check]) -> None:
    table = Table(title="Verification (recounted now)")
    for col, justify in (("entity", "left"), ("partition", "left"), ("source", "right"), ("target", "right"),
                         ("rejected", "right"), ("", "left"), ("detail", "left")):
        table.add_column(col, justify=justify)
    for c in checks:
        table.add_row(c.entity, c.partition, f"{c.source_rows:,}", f"{c.target_rows:,}", f"{c.rejected_rows:,}",
                      "✅" if c.ok else "❌", escape(c.detail))
    console.print(table)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def show_versions(console: Console, versions: list, title: str) -> None:
    """Versions of the `models` table (common.model_store.Version), one row each."""
    table = Table(title=title)
    for col, justify in (("name", "left"), ("event", "left"), ("model type", "left"), ("version", "right"),
                         ("active", "left"), ("bytes", "right"), ("created", "left"), ("sha256", "left"),
                         ("source", "left")):
        table.add_column(col, justify=justify)
    for v in versions:
        table.add_row(escape(v.name), escape(v.event), escape(v.model_type), str(v.version), "yes" if v.is_active else "no",
                      f"{v.size:,}", f"{v.created_at:%Y-%m-%d %H:%M:%S}", v.content_hash[:12] if v.content_hash else "",
                      escape(v.source_path or ""))
    console.print(table)
    console.print(f"{len(versions)} versions")
