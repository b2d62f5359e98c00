"""WriteBehind: writes run in order, one at a time, and a failed write surfaces in the chunk."""

from __future__ import annotations

import threading
import time

import pytest

from common.write_behind import WriteBehind


def test_writes_run_in_order_one_at_a_time_and_finish_waits_for_the_last():
    done: list[int] = []
    running = threading.Semaphore(1)

    def write(n: int) -> None:
        assert running.acquire(blocking=False), "two writes in flight"
        time.sleep(0.01)
        done.append(n)
        running.release()

    writes = WriteBehind()
    for n in range(5):
        writes.submit(write, n)
    writes.finish()
    assert done == [0, 1, 2, 3, 4]
    writes.close()


def test_a_failed_write_is_raised_by_the_next_submit_and_nothing_after_it_runs():
    done: list[int] = []

    def write(n: int) -> None:
        if n == 1:
            raise ValueError("target refused batch 1")
        done.append(n)

    writes = WriteBehind()
    writes.submit(write, 0)
    writes.submit(write, 1)
    with pytest.raises(ValueError, match="batch 1"):
        writes.submit(write, 2)
    writes.close()
    assert done == [0]


def test_abandon_waits_for_the_write_in_flight_without_raising():
    started, release, done = threading.Event(), threading.Event(), []

    def slow() -> None:
        started.set()
        release.wait(5)
        done.append(True)
        raise RuntimeError("ignored: the caller is raising its own error")

    writes = WriteBehind()
    writes.submit(slow)
    started.wait(5)
    threading.Timer(0.05, release.set).start()
    writes.abandon()
    assert done == [True]
    writes.close()
