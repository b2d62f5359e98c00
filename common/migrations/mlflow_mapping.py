"""How each MLflow table becomes documents: the whiteboard mapping of `mlflow-to-mongo`.

    every table              → collection `<prefix><table>`, one document per row, `_id` from the primary key
                               (its value when single; for a composite key a 22-character digest of the values,
                               whose fields the document holds under a unique index), `_partition` for verify
    bigint (epoch ms, steps) → int64, always (never int32 for small values)
    numeric / bytea / uuid   → Decimal128 / binary / string
    json, jsonb              → sub-document as stored
    JSON held in text        → sub-document (JSON_TEXT below); text that does not parse (or parses to a
                               scalar, or has keys MongoDB cannot store) is kept as the original string and
                               counted as a warning, never a reject
    status as integer        → MLflow's string (STATUS_STRINGS); string statuses are kept as MLflow wrote them
    metrics.value / is_nan   → as MLflow stores them: NaN is value 0 with is_nan true, ±Inf is ±1.797…e308
    unknown tables           → generic rules above, with a warning naming them

Indexes: a unique index on every primary key, one on every foreign key, and the query paths the
reference tool indexed (QUERY_INDEXES). The primary-key index lists first the fields of the longest
such index made of key fields only (metrics: run_uuid, key, step), and a non-unique index that a longer
one starts with gets none of its own (metrics' run_uuid, and run/key/step itself).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from datetime import date, datetime, time
from decimal import Decimal
from functools import lru_cache
from typing import Any
from uuid import UUID

from bson.decimal128 import Decimal128
from bson.int64 import Int64

from common.connectors.mongo import invalid_key

REGISTRY_ROOT = "registered_models"
PARTITION_FIELD = "_partition"

# Tables of MLflow 2.x–3.x this mapping was written against; any other table migrates generically.
KNOWN_TABLES = frozenset({
    "alembic_version", "assessments", "budget_policies", "datasets", "endpoint_bindings", "endpoint_model_mappings",
    "endpoint_tags", "endpoints", "entity_associations", "evaluation_dataset_records", "evaluation_dataset_tags",
    "evaluation_datasets", "experiment_tags", "experiments", "guardrail_configs", "guardrails", "input_tags",
    "inputs", "issues", "job_locks", "jobs", "label_schemas", "latest_metrics", "logged_model_metrics",
    "logged_model_params", "logged_model_tags", "logged_models", "mcp_access_endpoints", "mcp_server_aliases",
    "mcp_server_tags", "mcp_server_version_tags", "mcp_server_versions", "mcp_servers", "metrics",
    "model_definitions", "model_version_tags", "model_versions", "online_scoring_configs", "params",
    "registered_model_aliases", "registered_model_tags", "registered_models", "review_queue_items",
    "review_queue_label_schemas", "review_queue_users", "review_queues", "runs", "scheduler_leases", "scorer_versions",
    "scorers", "secrets", "span_metrics", "spans", "sql_assessment_daily_rollups", "sql_span_cost_daily_rollups",
    "sql_trace_metric_daily_rollups", "sql_trace_rollup_rebuild_queue", "tags", "trace_info", "trace_metrics",
    "trace_request_metadata", "trace_tags", "webhook_events", "webhooks", "workspaces",
})

#  table                 text columns holding JSON
JSON_TEXT: dict[str, tuple[str, ...]] = {
    "datasets":          ("dataset_source", "dataset_schema", "dataset_profile"),
    "spans":             ("content",),
    "assessments":       ("value", "error", "assessment_metadata"),
    "jobs":              ("params", "result"),
    "scorer_versions":   ("serialized_scorer",),
}

#  table           column    integer → MLflow's string
STATUS_STRINGS: dict[tuple[str, str], dict[int, str]] = {
    ("runs", "status"): {1: "RUNNING", 2: "SCHEDULED", 3: "FINISHED", 4: "FAILED", 5: "KILLED"},
    ("logged_models", "status"): {0: "LOGGED_MODEL_STATUS_UNSPECIFIED", 1: "LOGGED_MODEL_PENDING",
                                  2: "LOGGED_MODEL_READY", 3: "LOGGED_MODEL_UPLOAD_FAILED"},
    ("jobs", "status"): {0: "PENDING", 1: "RUNNING", 2: "SUCCEEDED", 3: "FAILED", 4: "TIMEOUT", 5: "CANCELED",
                         6: "NEEDS_RECOVERY"},
}

#  table              query paths (beyond primary and foreign keys), as the reference tool indexed them
QUERY_INDEXES: dict[str, tuple[tuple[tuple[str, int], ...], ...]] = {
    "experiments":       ((("name", 1),), (("creation_time", 1),)),
    "runs":              ((("experiment_id", 1), ("start_time", -1)), (("status", 1),)),
    "metrics":           ((("run_uuid", 1), ("key", 1), ("step", 1)), (("timestamp", 1),)),
    "params":            ((("run_uuid", 1), ("key", 1)),),
    "tags":              ((("run_uuid", 1), ("key", 1)),),
    "registered_models": ((("name", 1),), (("creation_time", 1),)),
    "model_versions":    ((("name", 1), ("version", 1)), (("current_stage", 1),)),
}

#  table          references MLflow keeps without a constraint: (columns, table, referenced columns)
EXTRA_REFERENCES: dict[str, tuple[tuple[tuple[str, ...], str, tuple[str, ...]], ...]] = {
    "inputs":     ((("destination_id",), "runs", ("run_uuid",)),),
    "input_tags": ((("input_uuid",), "inputs", ("input_uuid",)),),
}


_JSON_NATIVE = frozenset({str, int, bool, type(None)})
# Values stored as they come, whatever the column (the other types go through convert_value).
_AS_IS = frozenset({str, int, float, bool, datetime, dict, list})


def document_id(values: tuple[Any, ...]) -> Any:
    """The `_id` of a row: its key value when single; for a composite key, `key_digest` of the values.

    Not a sub-document `_id` (nx-27017 cannot query one, DESIGN §5), and not the key's JSON text either:
    MongoDB stores `_id` in every document and in its index, and metrics' six-part key as text is ~90
    bytes where the digest is 22. The key's own fields stay in the document, under the unique
    primary-key index, for lookups by key."""
    if len(values) == 1:
        value = values[0]
        return value if isinstance(value, (str, int)) and not isinstance(value, bool) else id_text(values)
    return key_digest(values)


def key_digest(values: tuple[Any, ...]) -> str:
    """128 bits of BLAKE2b over the key's JSON text, base64url without padding: the same key always gives
    the same `_id` (so writes stay idempotent), and two keys share one with odds of about 2⁻¹²⁸ per pair,
    which the report's counts would catch."""
    digest = hashlib.blake2b(id_text(values).encode(), digest_size=16).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def id_text(values: tuple[Any, ...]) -> str:
    """The key as compact JSON text; strings, integers and finite floats (every value of a metric's key)
    go to one encoder made once, the rest through `_jsonable`. Runs once per row of the largest tables."""
    return _ID_ENCODER([v if type(v) in _JSON_NATIVE or type(v) is float and math.isfinite(v) else _jsonable(v)
                        for v in values])


_ID_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _jsonable(value: Any) -> Any:
    if type(value) in _JSON_NATIVE:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (datetime, date, time, Decimal, UUID)):
        return str(value)
    if isinstance(value, (bytes, memoryview)):
        return bytes(value).hex()
    return value


def convert_value(table: str, column: str, type_name: str, value: Any) -> tuple[Any, bool]:
    """(BSON-ready value, True when a JSON text column had to be kept as text)."""
    if value is None:
        return None, False
    if (table, column) in STATUS_STRINGS and isinstance(value, int):
        return STATUS_STRINGS[(table, column)].get(value, str(value)), False
    if type_name == "bigint":
        return Int64(value), False
    if isinstance(value, str) and column in JSON_TEXT.get(table, ()):
        return parse_json_text(value)
    if isinstance(value, Decimal):
        return Decimal128(value), False
    if isinstance(value, UUID):
        return str(value), False
    if isinstance(value, memoryview):
        return bytes(value), False
    if isinstance(value, (date, time)) and not isinstance(value, datetime):
        return value.isoformat(), False
    return value, False


def parse_json_text(text: str) -> tuple[Any, bool]:
    """A sub-document (or array) when `text` is a JSON object or array MongoDB can store; else the text."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return text, True
    if isinstance(parsed, dict) and invalid_key(parsed) is None:
        return parsed, False
    if isinstance(parsed, list) and all(not isinstance(i, dict) or invalid_key(i) is None for i in parsed):
        return parsed, False
    return text, not isinstance(parsed, (int, float, str, bool)) and parsed is not None


def to_document(table: str, columns: dict[str, str], key: tuple[str, ...], row: dict[str, Any],
                partition: str) -> tuple[dict[str, Any], int]:
    """The document of one source row, and how many JSON text values were kept as text."""
    doc: dict[str, Any] = {"_id": document_id(tuple(row[k] for k in key))}
    kept_as_text = 0
    plain, bigint = _column_kinds(table, tuple(columns.items()))
    for column, value in row.items():
        if value is None:
            doc[column] = None
        elif column in bigint:
            doc[column] = Int64(value)
        elif column in plain and type(value) in _AS_IS:
            doc[column] = value
        else:
            doc[column], as_text = convert_value(table, column, columns[column], value)
            kept_as_text += as_text
    doc[PARTITION_FIELD] = partition
    return doc, kept_as_text


@lru_cache(maxsize=256)
def _column_kinds(table: str, columns: tuple[tuple[str, str], ...]) -> tuple[frozenset[str], frozenset[str]]:
    """(columns whose str/int/float/… values are stored as they come, bigint columns): worked out once per
    table, so a row of a large table costs a dict lookup per value rather than convert_value's tests."""
    special = {c for (t, c) in STATUS_STRINGS if t == table} | set(JSON_TEXT.get(table, ()))
    bigint = frozenset(c for c, type_name in columns if type_name == "bigint" and c not in special)
    plain = frozenset(c for c, _ in columns if c not in special and c not in bigint)
    return plain, bigint


def indexes_for(table: str, columns: dict[str, str], primary_key: tuple[str, ...],
                foreign_keys: list[tuple[str, ...]]) -> list[tuple[tuple[tuple[str, int], ...], bool]]:
    """(keys, unique) for every index of a collection, without duplicates, and without a non-unique index
    that a longer one starts with (`_served_by_another`)."""
    secondary = [tuple((c, 1) for c in fk) for fk in foreign_keys]
    secondary += [keys for keys in QUERY_INDEXES.get(table, ()) if all(c in columns for c, _ in keys)]
    wanted: list[tuple[tuple[tuple[str, int], ...], bool]] = [((( PARTITION_FIELD, 1),), False)]
    if primary_key:
        wanted.append((_primary_key_index(primary_key, secondary), True))
    wanted += [(keys, False) for keys in secondary]
    seen, result = set(), []
    for keys, unique in wanted:
        if keys not in seen and (unique or not _served_by_another(keys, wanted)):
            seen.add(keys)
            result.append((keys, unique))
    return result


def _primary_key_index(primary_key: tuple[str, ...], secondary: list[tuple[tuple[str, int], ...]]
                       ) -> tuple[tuple[str, int], ...]:
    """The unique primary-key index, led by the longest secondary index made of key fields only.

    The order of a unique index's fields does not change what it enforces, and so ordered it also serves
    that secondary index's queries: metrics (run_uuid, key, step, timestamp, value, is_nan) is both the
    primary key and the run/key/step path, and tags (run_uuid, key) both the key and the run_uuid foreign
    key. One index instead of two is one pass fewer over the largest collections after the load."""
    key = set(primary_key)
    lead = max((keys for keys in secondary if {c for c, _ in keys} <= key), key=len, default=())
    led = {c for c, _ in lead}
    return lead + tuple((c, 1) for c in primary_key if c not in led)


def _served_by_another(keys: tuple[tuple[str, int], ...],
                       wanted: list[tuple[tuple[tuple[str, int], ...], bool]]) -> bool:
    """True when a longer index starts with these fields: a compound index serves every query on its
    prefix, so e.g. metrics' (run_uuid, key, step) is also its index on the run_uuid foreign key, and
    building run_uuid alone would cost the server a second pass over the collection for nothing."""
    fields = [f for f, _ in keys]
    return any(len(other) > len(keys) and [f for f, _ in other[:len(keys)]] == fields for other, _ in wanted)
