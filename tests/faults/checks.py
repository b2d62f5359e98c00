"""What the fault tests check and how they wait, shared by every file of tests/faults.

Waits are on conditions with bounds generous enough for a loaded machine, never on fixed short sleeps.
"""

from __future__ import annotations

import time

import psycopg

from tests.faults.cases import Case, database_of
from tests.harness import wait_for

def assert_exact(case: Case, run_id: str, name: str, baseline: object, report: dict) -> None:
    """The promises every fault test checks: same target, exact counts, no duplicates, nothing left running."""
    env, expected = case.env, case.expected()
    assert report["verdict"] == "clean", report["verdict_reason"]
    assert case.checksum(name) == baseline
    assert env.chunk_states(run_id) == {"done": report["chunks"]["total"]}
    totals = report["totals"]
    assert totals["source_rows"] == totals["rows_read"] == expected.source_rows
    assert totals["rows_rejected"] == len(expected.rejected_keys)
    listed = env.ledger_sql("SELECT key FROM shuttle.rejects WHERE run_id = %s", (run_id,))
    assert sorted(key for (key,) in listed) == sorted(expected.rejected_keys), "each reject listed once"
    assert nonzero(case.target_rows(name)) == expected.target_rows, "no duplicates, nothing missing"
    counted = {entity: t["target_rows"] for entity, t in totals["targets"].items()}
    written = {entity: t["inserted"] + t["updated"] + t["unchanged"] for entity, t in totals["targets"].items()}
    assert nonzero(counted) == nonzero(written) == expected.target_rows, "every target row counted once"


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {key: n for key, n in counts.items() if n}


def running_chunk(case: Case, run_id: str, skip_workers: tuple[str, ...] = ()) -> tuple[str, str] | None:
    rows = case.env.ledger_sql("SELECT chunk_id, worker FROM shuttle.chunks WHERE run_id = %s AND state = 'running'"
                               " AND NOT worker = ANY(%s) ORDER BY started_at", (run_id, list(skip_workers)))
    return rows[0] if rows else None


def blocked_chunk(case: Case, run_id: str, skip_workers: tuple[str, ...] = ()) -> tuple[str, str]:
    """A chunk that is running and, the writes being held, cannot finish: (chunk id, worker host:pid)."""
    return wait_for(lambda: running_chunk(case, run_id, skip_workers), timeout=60, interval=0.05)


def pid_of(worker: str) -> int:
    return int(worker.rsplit(":", 1)[1])


def done_count(case: Case, run_id: str) -> int:
    return case.env.chunk_states(run_id).get("done", 0)


def retried(case: Case, run_id: str) -> int:
    return case.env.ledger_sql("SELECT count(*) FROM shuttle.chunks WHERE run_id = %s AND attempts > 1",
                               (run_id,))[0][0]


def healed(case: Case, run_id: str, timeout: float = 120) -> dict:
    """Wait, with no `resume` and no `watch` (whose sweeping would help), until the run is closed by the
    workers alone; then its report. The bound is generous: on an idle machine it takes seconds."""
    wait_for(lambda: case.env.ledger_sql("SELECT status FROM shuttle.runs WHERE run_id = %s", (run_id,))[0][0]
             != "running", timeout=timeout, interval=0.5)
    code, report = case.env.run_json("report", run_id)
    assert code == (0 if report["verdict"] == "clean" else 1)
    return report


def assert_counted_once(report: dict) -> None:
    """A fresh target: every row was inserted by exactly one recorded attempt, none counted as unchanged."""
    for entity, t in report["totals"]["targets"].items():
        assert (t["updated"], t["unchanged"]) == (0, 0) and t["inserted"] == t["target_rows"], (entity, t)


def settled(case: Case, run_id: str) -> bool:
    """No chunk is queued or running any more (done, failed or cancelled)."""
    states = case.env.chunk_states(run_id)
    return states.get("running", 0) == 0 and states.get("queued", 0) == 0


def cut_ledger_connections(case: Case, admin: psycopg.Connection, seconds: float) -> int:
    """Terminate every `shuttle-ledger` connection to the case's ledger every 0.3 s for `seconds`."""
    cut, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        cut += admin.execute("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE application_name = 'shuttle-ledger' AND datname = %s) t",
                             (database_of(case.env.ledger_url),)).fetchone()[0]
        time.sleep(0.3)
    return cut


def log_sizes(case: Case) -> dict[str, int]:
    return {log.name: log.stat().st_size for log in case.env.log_dir.glob("*.log")}


def logged_since(case: Case, mark: dict[str, int]) -> str:
    """What the workers logged after `mark` (every worker of the session logs into the same files)."""
    text = []
    for log in case.env.log_dir.glob("*.log"):
        with open(log, "rb") as f:
            f.seek(mark.get(log.name, 0))
            text.append(f.read().decode(errors="replace"))
    return "".join(text)


def assert_cancelled(case: Case, run_id: str) -> None:
    wait_for(lambda: settled(case, run_id), timeout=60, interval=0.1)
    code, report = case.env.run_json("report", run_id, "--refresh")
    assert code == 1 and report["verdict"] == "cancelled" and report["chunks"]["cancelled"] > 0
