"""Retake docs/flower-tasks.png: Flower's task list during a real demo run, in headless Chromium.

Builds a small demo source, starts Flower with the shipped config (basic auth on, a random password
that appears in no URL shown, no log and no picture), two local workers and a `modmon` run, and takes
the picture while chunks are running. Needs Debian's `chromium` and the services of `ops/services.sh`.
Run it with `ops/screenshot-flower.sh`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from base64 import b64encode
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.migrations.base import Selection  # noqa: E402
from common.migrations.modmon_fixtures import build_source, drop_target  # noqa: E402
from common.settings import load_settings  # noqa: E402
from producer import commands  # noqa: E402
from producer.local_workers import LocalWorkers, start_flower  # noqa: E402

OUT = ROOT / "docs" / "flower-tasks.png"
SOURCE = os.environ.get("SHUTTLE_SCREENSHOT_SOURCE_URL", "postgresql://postgres@127.0.0.1:5432/shuttle_screenshot")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1920,1000", "--virtual-time-budget=8000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise SystemExit(f"screenshot: {what} not reached within {timeout:.0f}s")


def main() -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("screenshot: needs chromium (apt-get install -y chromium)")
    password = secrets.token_urlsafe(12)
    queue = f"shuttle-screenshot-{os.getpid()}"
    settings = load_settings(source_url=SOURCE, target_url=SOURCE, queue=queue)
    print(f"building the demo source ({SOURCE}) …")
    build_source(SOURCE, rows=600_000, deployments=6)
    drop_target(SOURCE)
    port = free_port()
    flower = start_flower(settings, port=port, extra_env={"FLOWER_BASIC_AUTH": f"shuttle:{password}",
                                                         "FLOWER_DB": str(Path(tempfile.gettempdir()) / f"flower-shot-{port}.db")})
    auth = {"Authorization": "Basic " + b64encode(f"shuttle:{password}".encode()).decode()}

    def flower_up() -> bool:
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/workers", headers=auth)
            with urllib.request.urlopen(request, timeout=3) as response:
                return response.status == 200
        except OSError:
            return False

    def in_progress() -> bool:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/tasks?state=PROGRESS", headers=auth)
        with urllib.request.urlopen(request, timeout=3) as response:
            return response.read().strip() not in (b"{}", b"")

    try:
        wait(flower_up, 60, "Flower answering")
        with LocalWorkers(settings, 2, name="demo"):
            run = commands.start_run(settings, "modmon", Selection(), 50_000, None)
            print(f"run {run.run_id}: {run.total_rows:,} rows in {run.chunk_count} chunks")
            with commands.open_ledger(settings) as ledger:
                wait(lambda: ledger.progress(run.run_id).chunks.get("done", 0) >= 2 and in_progress(), 300,
                     "two chunks done and one reporting its rows")
                with tempfile.TemporaryDirectory() as profile:
                    url = f"http://shuttle:{password}@127.0.0.1:{port}/tasks"
                    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                    f"--screenshot={OUT}", url], check=True, capture_output=True, timeout=120)
                wait(lambda: ledger.progress(run.run_id).finished, 600, "the run's end")
        print(f"saved {OUT.relative_to(ROOT)}")
    finally:
        if flower is not None:
            os.killpg(flower.pid, signal.SIGTERM)


if __name__ == "__main__":
    main()
