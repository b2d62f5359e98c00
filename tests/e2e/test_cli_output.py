"""The CLI in any terminal: 80 columns, piped to a file, no worker listening, Ctrl-C, a finished run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading

import pytest
import redis

from tests.harness import PROJECT_ROOT, SHUTTLE, wait_for

pytestmark = pytest.mark.e2e
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def lines_of(text: str) -> list[str]:
    return [ANSI.sub("", line) for line in text.replace("\r", "\n").splitlines()]


class Reader:
    """Collects a process's output as it comes, so a test can wait for a line."""

    def __init__(self, stream) -> None:
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.text += line

    def join(self) -> None:
        self._thread.join(timeout=30)


def test_no_worker_is_said_within_seconds_and_ctrl_c_says_the_run_goes_on(e2e):
    queue = f"shuttle-nobody-{os.getpid()}"
    process = subprocess.Popen([*SHUTTLE, "run", "modmon", "--target-schema", "nobody", "--wait"],
                               env=e2e.environ(SHUTTLE_QUEUE=queue, COLUMNS="80"), cwd=PROJECT_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    out = Reader(process.stdout)
    try:
        wait_for(lambda: "no worker consumes queue" in out.text, timeout=45, interval=0.2)
        assert f"--queues {queue}" in out.text, "says how to start a worker on the run's queue"
        run_id = re.search(r"run (\S+): ", out.text).group(1)
        assert re.search(rf"^{re.escape(run_id)}: +0% 0/[\d,]+ rows .*queued", out.text, re.M), \
            "a non-terminal gets plain progress lines"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
        out.join()
        assert f"run {run_id} goes on in the workers" in out.text
        assert f"`shuttle cancel {run_id}`" in out.text and f"`shuttle watch {run_id}`" in out.text
        assert "\x1b[" not in out.text and "\r" not in out.text
        # Cancelling needs the ledger alone: the source and target are not reachable from here.
        cancelled = e2e.shuttle("cancel", run_id, SHUTTLE_QUEUE=queue,
                                SHUTTLE_SOURCE_URL="postgresql://postgres:pw@127.0.0.1:1/none",
                                SHUTTLE_TARGET_URL="postgresql://postgres:pw@127.0.0.1:1/none")
        assert cancelled.returncode == 0, cancelled.stderr
        assert "FAILED" not in cancelled.stdout + cancelled.stderr and "cancelled" in cancelled.stdout
    finally:
        if process.poll() is None:
            process.kill()
        redis.Redis.from_url(e2e.broker_url).delete(queue)


def test_piped_run_prints_plain_progress_lines_and_a_whole_report(e2e):
    result = e2e.shuttle("run", "modmon", "--target-schema", "piped", "--chunk-rows", "3000", "--wait",
                         COLUMNS="80")
    assert result.returncode == 0, result.stderr
    run_id = re.search(r"run (\S+): ", result.stderr).group(1)
    progress = [line for line in result.stdout.splitlines() if line.startswith(f"{run_id}: ")]
    assert progress and "100%" in progress[-1] and "chunks" in progress[-1]
    assert "\x1b[" not in result.stdout + result.stderr and "\r" not in result.stdout
    assert "verdict: clean" in result.stdout

    # An ended run: `watch` shows its report, not a bar at 0 rows/s.
    watched = e2e.shuttle("watch", run_id, COLUMNS="80")
    assert watched.returncode == 0 and "verdict: clean" in watched.stdout
    assert " 0/s " not in watched.stdout and "ETA" not in watched.stdout
    assert not any(line.startswith(f"{run_id}: ") for line in watched.stdout.splitlines())


def test_80_columns_never_cut_an_id(e2e):
    runs = [e2e.start("modmon", "--target-schema", "narrow", "--deployment-ids", e2e.data.deployments[0])]
    status = e2e.shuttle("status", COLUMNS="80")
    assert status.returncode == 0, status.stderr
    for line in lines_of(status.stdout):
        assert len(line) <= 80, line
    assert runs[0] in status.stdout, "the run id is whole, so it can be copied"

    wait_for(lambda: e2e.chunk_states(runs[0]).keys() <= {"done", "failed", "cancelled"}, timeout=120, interval=0.2)
    shown = wait_for(lambda: (r := e2e.shuttle("report", runs[0], COLUMNS="80")).returncode == 0 and r, timeout=120,
                     interval=0.5)
    for line in lines_of(shown.stdout):
        assert len(line) <= 80, line
    assert re.search(rf"│ {e2e.data.deployments[0]} +│", shown.stdout), "partition ids are whole"

    listed = e2e.shuttle("migrations", COLUMNS="80")
    catalogue = json.loads(e2e.shuttle("migrations", "--json").stdout)
    assert {"modmon", "mlflow-latest-metrics", "mlflow-to-mongo"} <= {m["name"] for m in catalogue}
    for line in lines_of(listed.stdout):
        assert len(line) <= 80, line
    for migration in catalogue:
        assert re.search(rf"[│ ]{re.escape(migration['name'])}[│ ]", listed.stdout), migration["name"]

    # On an 80-column terminal the live display keeps its bar, percentage and ETA within the width.
    # Throttled so that the run lasts long enough for the display to learn the live workers on a busy machine.
    fresh = e2e.start("modmon", "--target-schema", "narrow2", "--chunk-rows", "3000", "--max-rows-per-second", "12000")
    tty = subprocess.run(["script", "-qec", f"{' '.join(SHUTTLE)} watch {fresh}", "/dev/null"],
                         env=e2e.environ(COLUMNS="80"), cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=240, stdin=subprocess.DEVNULL)
    assert tty.returncode == 0, tty.stdout[-2000:]
    drawn = [line for line in lines_of(tty.stdout) if "rows" in line and "ETA" in line]
    assert drawn, tty.stdout[-2000:]
    for line in drawn:
        assert len(line) <= 80 and "%" in line and "━" in line, line
    assert any(line.startswith("chunks ") and "running" in line and "queued" in line and "worker" in line
               for line in lines_of(tty.stdout)), [line for line in lines_of(tty.stdout) if "chunks" in line][-3:]
