"""Overlap a chunk's reading with its writing: one write in flight in a background thread.

A worker that reads a batch, converts it, then waits for the target to store it leaves the target idle
while it reads and itself idle while the target writes. With the write handed to one background thread,
the next batch is read and converted while the target stores the previous one. At most one write is in
flight, so a worker holds two batches at most (memory stays flat), writes happen in the chunk's order, and
a chunk never ends, successfully or not, while one of its writes is still running.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any


class WriteBehind:
    """`submit` a write; it runs once the previous one has finished, whose error it raises first."""

    def __init__(self, name: str = "shuttle-write") -> None:
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def submit(self, write: Callable[..., Any], *args: Any) -> None:
        self.finish()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        self._pending = self._pool.submit(write, *args)

    def finish(self) -> None:
        """Wait for the write in flight; raise its error, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def abandon(self) -> None:
        """Wait for the write in flight without raising: the caller is already raising its own error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            wait([pending])

    def close(self) -> None:
        self.abandon()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
