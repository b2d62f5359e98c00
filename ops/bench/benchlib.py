"""What every benchmark script shares: logging, connections, machine facts, waiting for a report, memory."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg

from common.ledger import Ledger

ADMIN_DB = "postgresql://postgres@127.0.0.1:5432/postgres"


def log(message: str) -> None:
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {message}", flush=True)


def db(url: str) -> psycopg.Connection:
    """An autocommit connection in UTC, for set-up statements and reference queries."""
    conn = psycopg.connect(url, autocommit=True)
    conn.execute("SET timezone = 'UTC'")
    return conn


def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def wait_report(ledger: Ledger, run_id: str, timeout: float = 1800, interval: float = 0.05) -> dict[str, Any]:
    """The run's report once the coordinator has written it; the end of a timed Shuttle run."""
    deadline = time.monotonic() + timeout
    while (report := ledger.get_report(run_id)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} has no report after {timeout:.0f}s")
        time.sleep(interval)
    return report


def machine(admin_url: str = ADMIN_DB) -> dict[str, str]:
    """The facts RESULTS.md records about where a figure was measured."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    with db(admin_url) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        pg_settings = dict(conn.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name IN"
            " ('shared_buffers', 'work_mem', 'max_parallel_workers_per_gather', 'synchronous_commit', 'jit')"
            " ORDER BY name").fetchall())
    return {"nproc": str(os.cpu_count()), "memory": f"{mem_kb / 1024 / 1024:.1f} GiB", "cpu": cpu,
            "postgres": f"PostgreSQL {version} ({', '.join(f'{k}={v}' for k, v in pg_settings.items())})",
            "python": f"Python {platform.python_version()}, {platform.system()} {platform.release()}"}


def process_group_memory(pgid: int) -> list[dict[str, Any]]:
    """VmHWM (peak RSS) of every live process in a process group, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) != pgid:
                continue
            status = Path(f"/proc/{entry}/status").read_text()
        except (OSError, ValueError):
            continue
        hwm = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        found.append({"pid": int(entry), "ppid": int(fields[1]), "hwm_kb": int(hwm.group(1)) if hwm else 0})
    return found
