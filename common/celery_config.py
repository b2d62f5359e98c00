"""Celery configuration shared by the producer (which only sends) and the workers (which run).

Settings for long, idempotent tasks (DESIGN §1): late acks, requeue when a worker dies, one message
prefetched per process, and a visibility timeout far above the longest chunk, set everywhere Redis
reads it, so an unacknowledged chunk is not handed to a second worker while the first still runs.
"""

from __future__ import annotations

from typing import Any

from common.settings import Settings

COPY_CHUNK = "shuttle.copy_chunk"
FINALIZE_RUN = "shuttle.finalize_run"


def celery_config(settings: Settings) -> dict[str, Any]:
    transport = {"visibility_timeout": settings.visibility_timeout}
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.effective_result_backend,
        "broker_transport_options": dict(transport),
        "result_backend_transport_options": dict(transport),
        "visibility_timeout": settings.visibility_timeout,
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue,
        "task_routes": {COPY_CHUNK: {"queue": settings.queue}, FINALIZE_RUN: {"queue": settings.queue}},
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_track_started": True,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "result_expires": 7 * 24 * 3600,
        "worker_hijack_root_logger": False,
    }
