"""The error hierarchy: every failure says whether retrying can help.

Workers retry only `TransientError`, reject rows on `DataError` and stop on `ConfigError`, so retry
logic never has to guess from an exception's type. Every class pickles across processes (Celery sends
exceptions back through the result backend), which is why each keeps its one message argument.
"""

from __future__ import annotations


class ShuttleError(Exception):
    """Root of every error Shuttle raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # noqa: D105 - keeps subclasses picklable with one argument
        return (type(self), (self.message,))

    def __str__(self) -> str:
        return self.message


class TransientError(ShuttleError):
    """A failure that may pass by itself (connection lost, deadlock, timeout): retry with backoff."""


class DataError(ShuttleError):
    """A row that cannot be migrated: it becomes a reject with its key and this reason."""


class ConfigError(ShuttleError):
    """Wrong settings or input: stop before anything is written, name the setting and the fix."""


class ServiceUnavailable(ConfigError):
    """A service (broker, ledger, source, target) cannot be reached when a command starts."""


class ChunkFailed(ShuttleError):
    """A chunk that failed for good, raised by its task once the ledger has recorded the failure, so
    Celery (and Flower) show the task as FAILURE with this message."""
