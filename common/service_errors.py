"""The one line a user reads when a service cannot be reached: which connection, why, and what to set.

"Unreachable, check that the server is running" is wrong advice for a refused password, so an
authentication failure is named as such, with the setting that holds the credentials.
"""

from __future__ import annotations

import re

from common.errors import ServiceUnavailable

# What PostgreSQL, Redis and RabbitMQ say when the credentials are the problem, lower-cased.
AUTH_MARKERS = ("password authentication failed", "no password supplied", "authentication failed",
                "wrongpass", "invalid password", "invalid username-password", "noauth", "access_refused",
                "auth <password> called without", "role \"")

SETTINGS = {
    "ledger": "SHUTTLE_LEDGER_URL (or --ledger-url, or ledger_url in the config file; PGPASSFILE may hold "
              "the password)",
    "broker": "SHUTTLE_BROKER_URL (or --broker-url, or broker_url in the config file)",
}


def is_auth_failure(detail: str) -> bool:
    text = detail.lower()
    return any(marker in text for marker in AUTH_MARKERS)


def service_unavailable(role: str, public_url: str, detail: str) -> ServiceUnavailable:
    """The error for `role` (ledger, broker) at `public_url` (masked) failing with `detail` (masked)."""
    setting = SETTINGS.get(role, f"the {role} URL")
    if is_auth_failure(detail):
        return ServiceUnavailable(f"{role} {public_url}: authentication failed ({detail}); check the user and "
                                  f"password in {setting}")
    return ServiceUnavailable(f"{role} {public_url} is unreachable ({detail}); check {setting} and that the "
                              "server is running")


_DATABASE_FAILURE = re.compile(r"^(source|target) (database|MongoDB) (\S+) is unreachable: (.*?)(; check .*)?$", re.S)


def database_settings(role: str, migration: str) -> str:
    """Where a source or target URL (and its password) is set."""
    return (f"--{role}-url, SHUTTLE_{role.upper()}_URL or {role}_url in [migrations.{migration}] of the config "
            "file (PGPASSFILE may hold a PostgreSQL password)")


def reword_database_failure(exc: ServiceUnavailable, migration: str) -> ServiceUnavailable:
    """A source or target that cannot be reached, named with the setting to fix; an authentication
    failure said as such. Other errors are returned as they are."""
    found = _DATABASE_FAILURE.match(str(exc))
    if found is None:
        return exc
    role, kind, url, detail, _ = found.groups()
    setting = database_settings(role, migration)
    if is_auth_failure(detail):
        return ServiceUnavailable(f"{role} {kind} {url}: authentication failed ({detail}); check the user and "
                                  f"password in {setting}")
    return ServiceUnavailable(f"{role} {kind} {url} is unreachable ({detail}); check {setting} and that the "
                              "server is running")


_WORKER_FAILURE = re.compile(r"^(source|target) (database|MongoDB) (\S+) is unreachable: (.*?)(; check .*)?$", re.S)


def on_worker(message: str, migration: str | None = None) -> str:
    """A worker's source or target failure, reworded with what to fix on that worker.

    A worker takes a URL's password from its own settings, not from the producer's, so the fix for a
    chunk that cannot connect is on the host that ran it. Other messages are returned as they are."""
    found = _WORKER_FAILURE.match(message)
    if found is None:
        return message
    role, kind, url, detail, _ = found.groups()
    own = f"[migrations.{migration}]" if migration else "its [migrations.NAME] table"
    if is_auth_failure(detail):
        return (f"{role} {kind} {url}: authentication failed on this worker ({detail}); check the password the "
                f"worker has in SHUTTLE_{role.upper()}_URL, {role}_url in {own} of the worker's config file, "
                "or PGPASSFILE on the worker's host")
    return (f"{role} {kind} {url} is unreachable from this worker ({detail}); check that the server is running "
            "and that this worker's host can reach it")
