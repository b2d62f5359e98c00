"""Shuttle workers: `celery -A worker worker --events` finds the app here."""

from worker.app import app

__all__ = ["app"]
