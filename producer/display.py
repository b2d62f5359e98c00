"""How the CLI shows plans, runs, reports and checks (rich tables; --json where scripts read).

Everything fits the console's width, 80 columns included: wide columns fold rather than cut, and ids
(runs, chunks, migrations) are never cut, so they can be copied.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.ledger import Progress, RunRecord
from common.migrations import BUILTIN_PACKAGE, catalogue
from common.migrations.base import Check
from common.run_controls import RunControls
from producer.planner import Plan

VERDICT_STYLE = {"clean": "bold green", "failed": "bold red", "cancelled": "yellow", "running": "cyan"}


def migrations_data(migrations_dir: Path | None = None) -> list[dict[str, str | None]]:
    """The catalogue as `shuttle migrations --json` prints it: the built-ins, the installed plugins
    (`package` names the distribution), then the files of the migrations folder (`file`). One that cannot
    be used has its `problem` (and status "broken" or "invalid")."""
    from common.declarative.catalogue import scan

    rows: list[dict[str, str | None]] = []
    for entry in catalogue():
        m = entry.cls
        rows.append({"name": entry.name, "source": m.source_kind if m else None, "target": m.target_kind if m else None,
                     "partition_by": m.partition_label if m else None, "status": m.status if m else "broken",
                     "summary": m.summary if m else None, "package": entry.package, "problem": entry.problem})
    for item in scan(migrations_dir):
        spec = item.spec
        rows.append({"name": spec.name if spec else item.path.name, "source": spec.source.kind if spec else None,
                     "target": spec.target.kind if spec else None,
                     "partition_by": (spec.source.partition or "(none)") if spec else None,
                     "status": "declared" if spec else "invalid", "summary": spec.summary if spec else item.error,
                     "package": f"file {item.path.name}", "file": str(item.path), "problem": item.error})
    return rows


def show_migrations(console: Console, migrations_dir: Path | None = None) -> None:
    """The catalogue; narrower than 120 columns, partition and status go (`--json` has them)."""
    table = Table(title="Shuttle migrations")
    names = migrations_data(migrations_dir)
    wide = console.width >= 120
    table.add_column("name", no_wrap=True, min_width=max((len(m["name"]) for m in names), default=4))
    table.add_column("source → target", no_wrap=True)
    if wide:
        table.add_column("partition by")
        table.add_column("status")
    table.add_column("what it does", ratio=1)
    # Where a migration comes from matters once plugins are installed; without any, it would only
    # take width from the summaries on a narrow terminal.
    with_package = wide or any(m["package"] != BUILTIN_PACKAGE for m in names)
    if with_package:
        table.add_column("package")
    for m in names:
        package = [escape(m["package"] or "")] if with_package else []
        if m["problem"]:  # a broken plugin or an invalid file: its error, whose `[source]` is not markup
            extra = ["", f"[red]{m['status']}[/]"] if wide else []
            problem = m["problem"] if wide else f"{m['status']}: {m['problem']}"
            table.add_row(escape(m["name"]), "—", *extra, f"[red]{escape(problem)}[/]", *package)
            continue
        extra = [m["partition_by"], m["status"]] if wide else []
        table.add_row(escape(m["name"]), f"{m['source']} → {m['target']}", *extra, escape(m["summary"] or ""), *package)
    console.print(table)


def show_plan(console: Console, plan: Plan, workers: int, measured: tuple[float, int] | None = None) -> None:
    """The plan, and an estimate from the rate past runs of this migration measured (or none, said so)."""
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
    console.print(f"{plan.total_rows:,} rows in {len(plan.chunks)} chunks")
    if measured is None:
        console.print(f"no estimate: no completed run of {plan.migration} in the ledger to measure a rate from "
                      "(the first run's report gives one)")
        return
    rate, runs = measured
    console.print(f"estimated {_duration(plan.total_rows / (rate * max(1, workers)))} with {workers} worker "
                  f"process(es), at the {rate:,.0f} rows/s per process measured over the last {runs} completed "
                  f"run(s) of {plan.migration}")


def show_runs(console: Console, runs: list[RunRecord], verdicts: dict[str, str],
              controls: dict[str, RunControls] | None = None) -> None:
    """Recent runs; on a narrow console the creation time goes and the target folds, the run id stays whole."""
    table = Table(title="Recent runs")
    wide = console.width >= 140
    table.add_column("run", no_wrap=True, min_width=max((len(r.run_id) for r in runs), default=3))
    # The verdict wraps at its commas (`running, paused, ≤500/s`) before the target gets too narrow to read.
    table.add_column("verdict" if not wide else "status / verdict", min_width=8)
    table.add_column("rows", justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("target", overflow="fold", ratio=1, min_width=14)
    if wide:
        table.add_column("created", no_wrap=True)
    for r in runs:
        verdict = verdicts.get(r.run_id, "")
        style = VERDICT_STYLE.get(verdict, "")
        shown = f"[{style}]{verdict}[/]" if verdict and style else r.status
        if wide and verdict:
            shown = f"{r.status} / {shown}"
        live = (controls or {}).get(r.run_id)
        if live is not None and live.brief() and r.finished_at is None:
            shown += f", {live.brief()}"
        took = _elapsed(r)
        target = r.target_url or ""
        cells = [r.run_id, shown, f"{r.total_rows:,}", took, escape(target if wide else _short_url(target))]
        if wide:
            cells.append(f"{r.created_at:%Y-%m-%d %H:%M}" if r.created_at else "")
        table.add_row(*cells)
    console.print(table)


def show_progress(console: Console, run: RunRecord, progress: Progress, verdict: str | None = None,
                  controls: RunControls | None = None) -> None:
    """Where one run stands: rows (in flight included), chunk states, verdict, duration and target, and
    whether it is paused or throttled."""
    rows = min(progress.total_rows, progress.rows_done + progress.rows_in_flight)
    pct = 100 * rows / progress.total_rows if progress.total_rows else 100.0
    states = ", ".join(f"{n} {s}" for s, n in sorted(progress.chunks.items()))
    took = ""
    if run.created_at:
        end = run.finished_at or datetime.now(timezone.utc)
        took = f"; {'took' if run.finished_at else 'running for'} {_duration((end - run.created_at).total_seconds())}"
    shown = f"[{VERDICT_STYLE.get(verdict, 'bold')}]{verdict}[/]" if verdict else run.status
    console.print(f"[bold]{run.run_id}[/] ({run.migration}) {shown}: {rows:,} of {progress.total_rows:,} rows "
                  f"({pct:.1f}%){took}; chunks: {states or 'none'}", soft_wrap=True)
    console.print(f"target {escape(run.target_url or '')}", soft_wrap=True)
    if controls is not None and controls.describe() and run.finished_at is None:
        hint = f" (`shuttle continue {run.run_id}` goes on)" if controls.paused else ""
        console.print(f"[bold yellow]{controls.describe()}[/]{hint}", soft_wrap=True)
    for retrying in progress.retrying:
        console.print(f"  retrying {retrying.chunk_id} (attempt {retrying.attempt})"
                      + (f": {escape(retrying.error)}" if retrying.error else ""), soft_wrap=True)


def show_report(console: Console, report: dict[str, Any]) -> None:
    verdict = report["verdict"]
    console.print(f"\n[bold]Run {report['run_id']}[/] ({report['migration']}), status {report['status']}")
    console.print(f"source {report['source']}\ntarget {report['target']}")
    table = Table(title="Per partition (all target entities; `--json` has each entity)")
    wide = console.width >= 100  # narrower: shorter headers, no "unchanged" column; partition ids stay whole
    longest = max((len(row["partition"]) for row in report["partitions"]), default=9)
    table.add_column("partition", no_wrap=True, min_width=longest)
    for col in (("source rows", "rejected", "written", "unchanged", "target rows") if wide
                else ("source", "rejected", "written", "target")):
        table.add_column(col, justify="right", no_wrap=True)
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
        unchanged = [f"{m['unchanged']:,}"] if wide else []
        table.add_row(partition, f"{m['source']:,}", f"{m['rejected']:,}", f"{m['written']:,}", *unchanged,
                      f"{m['target']:,}")
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
        rejects.add_column("entity", overflow="fold")
        rejects.add_column("partition", no_wrap=True)
        rejects.add_column("key", overflow="fold")
        rejects.add_column("reason", overflow="fold", ratio=1)
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
    for chunk in report.get("failed_chunks", []):
        console.print(f"[red]failed[/] {escape(chunk['chunk_id'])} (attempt {chunk['attempts']}, "
                      f"{escape(chunk['worker'] or 'no worker')}): {escape(chunk['error'] or 'no error recorded')}",
                      overflow="fold")
    for action in report.get("actions", []):
        console.print(f"action: {action}")
    console.print(f"verdict: [{VERDICT_STYLE.get(verdict, 'bold')}]{verdict}[/] — {escape(report['verdict_reason'])}")


def show_check_summary(console: Console, checks: list[dict[str, Any]]) -> None:
    """One line per checked entity (table, reference, sample): ✅ when every partition of it holds."""
    by_entity: dict[str, dict[str, Any]] = {}
    for c in checks:
        e = by_entity.setdefault(c["entity"], {"source": 0, "target": 0, "rejected": 0, "ok": True, "detail": "",
                                               "failing": [], "partitions": 0})
        e["source"] += c["source_rows"]
        e["target"] += c["target_rows"]
        e["rejected"] += c["rejected_rows"]
        e["partitions"] += 1
        e["ok"] = e["ok"] and c["ok"]
        if not c["ok"]:
            e["failing"].append(c)
        e["detail"] = e["detail"] or ("" if c["ok"] and c["partition"] != "warning" else c["detail"])
    for e in by_entity.values():
        if len(e["failing"]) > 1:  # every failing partition counts, not only the first one's gap
            bad = e["failing"]
            e["detail"] = (f"{len(bad)} of {e['partitions']} partitions disagree: source "
                           f"{sum(c['source_rows'] for c in bad):,}, target {sum(c['target_rows'] for c in bad):,}, "
                           f"rejected {sum(c['rejected_rows'] for c in bad):,} in them; first: {bad[0]['detail']}")
    table = Table(title="Verification per table")
    for col, justify in (("", "left"), ("table / check", "left"), ("source", "right"), ("target", "right"),
                         ("rejected", "right"), ("detail", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for entity, e in by_entity.items():
        table.add_row("✅" if e["ok"] else "❌", entity, f"{e['source']:,}", f"{e['target']:,}", f"{e['rejected']:,}",
                      escape(e["detail"]))
    console.print(table)


def show_checks(console: Console, checks: list[Check]) -> None:
    table = Table(title="Verification (recounted now)")
    for col, justify in (("entity", "left"), ("partition", "left"), ("source", "right"), ("target", "right"),
                         ("rejected", "right"), ("", "left"), ("detail", "left")):
        table.add_column(col, justify=justify, no_wrap=col == "partition", overflow="fold")
    for c in checks:
        table.add_row(c.entity, c.partition, f"{c.source_rows:,}", f"{c.target_rows:,}", f"{c.rejected_rows:,}",
                      "✅" if c.ok else "❌", escape(c.detail))
    console.print(table)


def _short_url(url: str) -> str:
    """`host:port/database` of a URL (its scheme and user dropped), for narrow tables."""
    rest = url.split("://", 1)[-1]
    return rest.rpartition("@")[2]


def _elapsed(run: RunRecord) -> str:
    """How long a finished run took, or how long a running one has run so far."""
    if not run.created_at:
        return ""
    if run.finished_at:
        return _duration((run.finished_at - run.created_at).total_seconds())
    if run.status == "running":  # so far
        return _duration((datetime.now(timezone.utc) - run.created_at).total_seconds())
    return ""


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
