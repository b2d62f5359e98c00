"""The throttle's schedule rule (`worker.throttle.next_slot`), which the Redis script and the ledger's
bucket both follow, and how progress shows a paused or throttled run."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from common.ledger import Progress
from common.run_controls import RunControls
from producer.progress import summary_line
from worker.throttle import next_slot


def test_an_idle_schedule_lets_rows_go_at_once_and_books_their_time():
    assert next_slot(100.0, None, None, 50, 100.0) == (0.0, 100.5)
    assert next_slot(100.0, 90.0, 100.0, 50, 100.0) == (0.0, 100.5), "idle time is not saved up as a burst"


def test_a_busy_schedule_makes_the_next_rows_wait_their_turn():
    assert next_slot(100.0, 102.0, 100.0, 50, 100.0) == (2.0, 102.5)


@pytest.mark.parametrize("new_rate, wait", [(200.0, 1.0), (50.0, 4.0)])
def test_a_new_rate_re_times_the_backlog(new_rate, wait):
    waited, _ = next_slot(100.0, 102.0, 100.0, 50, new_rate)
    assert waited == pytest.approx(wait)


def test_progress_says_paused_and_throttled():
    progress = Progress(total_rows=100, rows_done=40, chunks={"done": 2, "queued": 3})
    paused = RunControls(max_rows_per_second=500.0, paused_at=datetime.now(timezone.utc))
    assert summary_line(progress, ["w1"], paused).endswith("1 worker · paused · throttled to 500 rows/s")
    assert "paused" not in summary_line(progress, ["w1"], RunControls(None, None))
