"""The users' API to the `models` table: what training and prediction code calls.

    from common.models_api import save_model, load_model, latest_version, deactivate_model, list_versions

    version = save_model(DB, model, "churn", "signup", "classifier_binary")   # next version, the active one
    model, version = load_model(DB, "churn", "signup", "classifier_binary")   # latest active version
    model, _ = load_model(DB, "churn", "signup", "classifier_binary", version=2)
    deactivate_model(DB, "churn", "signup", "classifier_binary", version=1)

`DB` is a PostgreSQL URL or an open psycopg connection; `table=` names another table (`schema.models`).
Versions follow the rules of `common.model_store`, the same the `model-files` migration applies, so
saving the content a model already has returns that version instead of storing it twice.

**`load_model` unpickles** (joblib), and unpickling runs whatever code the bytes say: use it only on
a table that only trusted writers can write. It is the one function of Shuttle that unpickles; the
migration itself never does.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

from common.connectors.postgres import identifier
from common.errors import ShuttleError
from common.model_store import DEFAULT_TABLE, Version, column_limits, ensure_table, versioning
from common.model_store import list_versions as _list_versions
from common.urls import libpq_url

Database = str | psycopg.Connection


class ModelNotFound(ShuttleError, LookupError):
    """No stored version matches (name, event, model_type[, version])."""


@contextmanager
def _connected(db: Database) -> Iterator[psycopg.Connection]:
    """Use the caller's connection as it is, or open (and close) one for a URL."""
    if isinstance(db, psycopg.Connection):
        yield db
        return
    with psycopg.connect(libpq_url(db), connect_timeout=10, application_name="shuttle-models") as conn:
        yield conn


def save_model(db: Database, model: Any, name: str, event: str, model_type: str, *,
               table: str = DEFAULT_TABLE, compress: int = 0) -> int:
    """Store `model` (joblib-serialised) as the next version of (name, event, model_type) and make it the
    only active one; returns its version. Identical content already stored returns that version."""
    import joblib

    buffer = io.BytesIO()
    joblib.dump(model, buffer, compress=compress)
    data = buffer.getvalue()
    with _connected(db) as conn:
        ensure_table(conn, table)
        with versioning(conn, name, table, column_limits(conn, table)) as writer:
            return writer.add(event, model_type, hashlib.sha256(data).hexdigest(), len(data), [data], None)


def load_model(db: Database, name: str, event: str, model_type: str, version: int | None = None, *,
               table: str = DEFAULT_TABLE) -> tuple[Any, int]:
    """(model, version): the latest active version, or exactly `version` (active or not).

    Unpickles: only for tables that only trusted writers can write (see the module docstring)."""
    import joblib

    condition = sql.SQL("is_active IS NOT false") if version is None else sql.SQL("version = %s")
    params: list[Any] = [name, event, model_type] + ([] if version is None else [version])
    with _connected(db) as conn:
        row = conn.execute(sql.SQL(
            "SELECT model_binary, version FROM {} WHERE name = %s AND event = %s AND model_type = %s AND {}"
            " ORDER BY version DESC LIMIT 1").format(identifier(table), condition), params).fetchone()
    if row is None:
        which = f"version {version}" if version is not None else "active version"
        raise ModelNotFound(f"model {name!r} (event {event!r}, type {model_type!r}) has no {which} in {table}")
    return joblib.load(io.BytesIO(row[0])), row[1]


def latest_version(db: Database, name: str, event: str, model_type: str, *, active_only: bool = False,
                   table: str = DEFAULT_TABLE) -> int | None:
    """The greatest version of the model (only active ones with `active_only`), or None."""
    condition = sql.SQL("is_active IS NOT false") if active_only else sql.SQL("TRUE")
    with _connected(db) as conn:
        return conn.execute(sql.SQL(
            "SELECT max(version) FROM {} WHERE name = %s AND event = %s AND model_type = %s AND {}").format(
            identifier(table), condition), (name, event, model_type)).fetchone()[0]


def deactivate_model(db: Database, name: str, event: str, model_type: str, version: int, *,
                     table: str = DEFAULT_TABLE) -> bool:
    """Deactivate one version (it is kept); True when it was active. An unknown version is ModelNotFound."""
    with _connected(db) as conn, conn.transaction():
        row = conn.execute(sql.SQL(
            "UPDATE {t} SET is_active = false FROM (SELECT id, is_active IS NOT false AS was FROM {t}"
            " WHERE name = %s AND event = %s AND model_type = %s AND version = %s FOR UPDATE) old"
            " WHERE {t}.id = old.id RETURNING old.was").format(t=identifier(table)),
            (name, event, model_type, version)).fetchone()
    if row is None:
        raise ModelNotFound(f"model {name!r} (event {event!r}, type {model_type!r}) has no version {version} in {table}")
    return bool(row[0])


def list_versions(db: Database, name: str | None = None, event: str | None = None, model_type: str | None = None,
                  *, table: str = DEFAULT_TABLE) -> list[Version]:
    """Stored versions (without their binaries), by name then version."""
    with _connected(db) as conn:
        return _list_versions(conn, table, name, event, model_type)
