"""How one `user_data` document becomes a `dataset_metadata` and a `transformation_configs` document, and back.

The two tables below are the runbook's field mapping, row for row (`DATASET_METADATA`, `TRANSFORMATION_CONFIG`):
each row is (target field, source field or fields, how). `how` is one of the small rules after the tables;
every rule has an inverse, which is how `userdata-rollback` rebuilds the original document.

    a field absent at the source   → absent in the target (never an invented null), except the rows that
                                     compute a value (`file_type` defaults to "csv", counts, flags)
    `_id`                          → `dataset_metadata._id` unchanged (its BSON type kept: an ObjectId stays one);
                                     `dataset_id` is its text; `config_id` = "{dataset_id}_config" is the
                                     `_id` of the configuration, so both writes are upserts by a deterministic `_id`
    every other source field       → `dataset_metadata.legacy`, with the original value of any mapped field
                                     whose inverse does not give it back exactly (a legacy spelling in
                                     `data_schema`, a date held as text, `num_rows` beside `row_count`, …),
                                     and `legacy_absent` naming fields the mapping adds that the source did
                                     not have. So the split loses nothing and the rollback is exact.

Bad documents are `BadDocument` errors, which the migration turns into rejects with the key and reason: no
`user_id`, a field of the wrong type (`SOURCE_TYPES`), a history entry that is not an object, an
unparseable date.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from bson.int64 import Int64
from bson.objectid import ObjectId

LEGACY = "legacy"
LEGACY_ABSENT = "legacy_absent"
CONFIG_SUFFIX = "_config"

# how
COPY = "copy"                       # the value as it is
FIRST_PRESENT = "first present"     # the first source field present and not null
DEFAULT_CSV = "default csv"         # the value, or "csv" when absent or null
ID_TEXT = "id text"                 # str(_id)
CONFIG_ID = "config id"             # f"{str(_id)}_config"
SCHEMA_FIELDS = "schema fields"     # data_schema entries → SchemaField objects (SCHEMA_FIELD_NAMES)
STEPS = "steps"                     # transformation_history entries → TransformationStep objects (STEP_NAMES)
NOT_EMPTY = "not empty"             # len(list) > 0
COUNT = "count"                     # len(list)
WHEN_APPLIED = "when applied"       # the date (parsed when text) if the history is not empty, else null

DATASET_METADATA: tuple[tuple[str, str | tuple[str, ...], str], ...] = (
    #  target                         source                      how
    ("_id",                           "_id",                      COPY),
    ("dataset_id",                    "_id",                      ID_TEXT),
    ("user_id",                       "user_id",                  COPY),
    ("filename",                      "filename",                 COPY),
    ("original_filename",             "original_filename",        COPY),
    ("s3_url",                        "s3_url",                   COPY),
    ("num_rows",                      ("row_count", "num_rows"),  FIRST_PRESENT),
    ("num_columns",                   "num_columns",              COPY),
    ("data_schema",                   "data_schema",              SCHEMA_FIELDS),
    ("pii_report.contains_pii",       "contains_pii",             COPY),
    ("pii_report.detection_details",  "pii_report",               COPY),
    ("pii_report.risk_level",         "pii_risk_level",           COPY),
    ("pii_report.masked",             "pii_masked",               COPY),
    ("is_processed",                  "is_processed",             COPY),
    ("processed_at",                  "processed_at",             COPY),
    ("inferred_schema",               "schema",                   COPY),
    ("statistics",                    "statistics",               COPY),
    ("quality_report",                "quality_report",           COPY),
    ("data_preview",                  "data_preview",             COPY),
    ("ai_summary",                    "aiSummary",                COPY),
    ("file_type",                     "file_type",                DEFAULT_CSV),
    ("onboarding_progress",           "onboarding_progress",      COPY),
    ("created_at",                    "created_at",               COPY),
    ("updated_at",                    "updated_at",               COPY),
)

TRANSFORMATION_CONFIG: tuple[tuple[str, str | tuple[str, ...], str], ...] = (
    #  target                         source                      how
    ("_id",                           "_id",                      CONFIG_ID),
    ("user_id",                       "user_id",                  COPY),
    ("dataset_id",                    "_id",                      ID_TEXT),
    ("config_id",                     "_id",                      CONFIG_ID),
    ("transformation_steps",          "transformation_history",   STEPS),
    ("current_file_path",             "file_path",                COPY),
    ("is_applied",                    "transformation_history",   NOT_EMPTY),
    ("applied_at",                    "updated_at",               WHEN_APPLIED),
    ("total_transformations",         "transformation_history",   COUNT),
    ("created_at",                    "created_at",               COPY),
    ("updated_at",                    "updated_at",               COPY),
)

#  data_schema entry (old spelling, legacy spelling)  → SchemaField
SCHEMA_FIELD_NAMES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("name", "column_name"),       "name"),
    (("type", "data_type"),         "data_type"),
    (("nullable", "is_nullable"),   "nullable"),
    (("sample_values", "examples"), "sample_values"),
)

#  transformation_history entry (spellings)  → TransformationStep; `order` is the entry's position
STEP_NAMES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("operation", "type"),         "transformation_type"),
    (("params", "parameters"),      "parameters"),
    (("timestamp", "applied_at"),   "applied_at"),
)

#  source field            types it may hold (None is allowed for every field but user_id)
SOURCE_TYPES: dict[str, tuple[type, ...]] = {
    "user_id":                (str,),
    "filename":               (str,),
    "original_filename":      (str,),
    "s3_url":                 (str,),
    "row_count":              (int,),
    "num_rows":               (int,),
    "num_columns":            (int,),
    "data_schema":            (list,),
    "contains_pii":           (bool,),
    "pii_report":             (dict,),
    "pii_risk_level":         (str,),
    "pii_masked":             (bool,),
    "is_processed":           (bool,),
    "processed_at":           (datetime,),
    "schema":                 (dict, list),
    "statistics":             (dict,),
    "quality_report":         (dict,),
    "data_preview":           (list, dict),
    "aiSummary":              (str, dict),
    "file_type":              (str,),
    "onboarding_progress":    (dict,),
    "created_at":             (datetime,),
    "updated_at":             (datetime, str),
    "transformation_history": (list,),
    "file_path":              (str,),
}


class BadDocument(ValueError):
    """A source document the mapping cannot convert; the message is the reject's reason."""


# -- the split ------------------------------------------------------------------------------------


def split(source: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(dataset_metadata document, transformation_configs document) of one `user_data` document.

    Raises BadDocument for a document that cannot be migrated."""
    check_types(source)
    metadata = _apply(DATASET_METADATA, source)
    config = _apply(TRANSFORMATION_CONFIG, source)
    rebuilt = join(metadata, config, with_legacy=False)
    # A copied value is the source's own object (`is`): only converted values need comparing.
    legacy = {k: v for k, v in source.items()
              if k not in rebuilt or (rebuilt[k] is not v and not identical(rebuilt[k], v))}
    absent = sorted(k for k in rebuilt if k not in source)
    if legacy:
        metadata[LEGACY] = legacy
    if absent:
        metadata[LEGACY_ABSENT] = absent
    return metadata, config


def check_types(source: Mapping[str, Any]) -> None:
    if "_id" not in source:
        raise BadDocument("document has no _id")
    user = source.get("user_id")
    if not isinstance(user, str) or not user:
        raise BadDocument("no user_id" if user in (None, "") else f"user_id is {type(user).__name__}, expected str")
    for name, types in SOURCE_TYPES.items():
        value = source.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise BadDocument(f"field '{name}' is {type(value).__name__}, expected "
                              f"{' or '.join(t.__name__ for t in types)}")


def _apply(table: tuple[tuple[str, str | tuple[str, ...], str], ...], source: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for target, names, how in table:
        present, value = _FORWARD[how](source, (names,) if isinstance(names, str) else names)
        if present:
            _put(out, target, value)
    return out


def _put(doc: dict[str, Any], path: str, value: Any) -> None:
    head, _, rest = path.partition(".")
    if rest:
        _put(doc.setdefault(head, {}), rest, value)
    else:
        doc[head] = value


def _get(doc: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    head, _, rest = path.partition(".")
    if head not in doc:
        return False, None
    return _get(doc[head], rest) if rest else (True, doc[head])


def _copy(source: Mapping[str, Any], names: tuple[str, ...]) -> tuple[bool, Any]:
    return (names[0] in source), source.get(names[0])


def _first_present(source: Mapping[str, Any], names: tuple[str, ...]) -> tuple[bool, Any]:
    for name in names:
        if source.get(name) is not None:
            return True, source[name]
    return _copy(source, names[-1:])


def _default_csv(source: Mapping[str, Any], names: tuple[str, ...]) -> tuple[bool, Any]:
    value = source.get(names[0])
    return True, "csv" if value is None else value


def _id_text(source: Mapping[str, Any], names: tuple[str, ...]) -> tuple[bool, Any]:
    return True, id_text(source["_id"])


def _config_id(source: Mapping[str, Any], names: tuple[str, ...]) -> tuple[bool, Any]:
    return True, config_id(source["_id"])


def _schema_fields(source: Mapping[str, Any], names: tuple[str, ...]) -> tuple[bool, Any]:
    if names[0] not in source:
        return False, None
    entries = source[names[0]]
    if entries is None:
        return True, None
    fields = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise BadDocument(f"data_schema[{i}] is {type(entry).__name__}, not an object")
        fields.append(_renamed(entry, SCHEMA_FIELD_NAMES))
    return True, fields


def _steps(source: Mapping[str, Any], names: tuple[str, ...]) -> tuple[bool, Any]:
    history = _history(source)
    steps = []
    for i, entry in enumerate(history):
        step = {"order": i + 1, **_renamed(entry, STEP_NAMES)}
        if "applied_at" in step:
            step["applied_at"] = parse_date(step["applied_at"], f"transformation_history[{i}].applied_at")
        steps.append(step)
    return True, steps


def _not_empty(source: Mapping[str, Any], names: tuple[str, ...]) -> tuple[bool, Any]:
    return True, bool(_history(source))


def _count(source: Mapping[str, Any], names: tuple[str, ...]) -> tuple[bool, Any]:
    return True, len(_history(source))


def _when_applied(source: Mapping[str, Any], names: tuple[str, ...]) -> tuple[bool, Any]:
    if not _history(source):
        return True, None
    return True, parse_date(source.get(names[0]), "applied_at (updated_at)")


def _history(source: Mapping[str, Any]) -> list[dict[str, Any]]:
    history = source.get("transformation_history") or []
    for i, entry in enumerate(history):
        if not isinstance(entry, dict):
            raise BadDocument(f"transformation_history[{i}] is {type(entry).__name__}, not an object")
    return history


def _renamed(entry: Mapping[str, Any], names: tuple[tuple[tuple[str, ...], str], ...]) -> dict[str, Any]:
    """The entry with its first present spelling of each named field renamed; other keys kept as they are."""
    out = dict(entry)
    for spellings, new in names:
        for old in spellings:
            if old in out:
                out[new] = out.pop(old)
                break
    return out


_FORWARD: dict[str, Callable[[Mapping[str, Any], tuple[str, ...]], tuple[bool, Any]]] = {
    COPY: _copy, FIRST_PRESENT: _first_present, DEFAULT_CSV: _default_csv, ID_TEXT: _id_text,
    CONFIG_ID: _config_id, SCHEMA_FIELDS: _schema_fields, STEPS: _steps, NOT_EMPTY: _not_empty, COUNT: _count,
    WHEN_APPLIED: _when_applied,
}


def id_text(value: Any) -> str:
    """`dataset_id`: the source `_id` as text (an ObjectId's 24 hex digits)."""
    return str(value)


def config_id(value: Any) -> str:
    return f"{id_text(value)}{CONFIG_SUFFIX}"


def parse_date(value: Any, what: str) -> datetime | None:
    """A date from a datetime or ISO 8601 text (UTC, naive, as BSON gives it back); null stays null."""
    if value is None or isinstance(value, datetime):
        return _naive_utc(value) if value is not None else None
    if isinstance(value, str):
        try:
            return _naive_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            pass
    raise BadDocument(f"unparseable {what}: {str(value)[:60]!r}")


def _naive_utc(value: datetime) -> datetime:
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


# -- the rollback ---------------------------------------------------------------------------------


def join(metadata: Mapping[str, Any], config: Mapping[str, Any] | None, with_legacy: bool = True) -> dict[str, Any]:
    """The `user_data` document the two target documents came from (the inverse of `split`).

    `with_legacy` applies `legacy` and `legacy_absent`, which makes it exact; without them it is what the
    tables alone give back (what `split` compares with the source to decide what `legacy` must keep)."""
    out: dict[str, Any] = {}
    for target, names, how in DATASET_METADATA:
        _INVERSE[how](out, _get(metadata, target), (names,) if isinstance(names, str) else names)
    if config is not None:
        for target, names, how in TRANSFORMATION_CONFIG:
            if how in (STEPS, COPY) and (names if isinstance(names, str) else names[0]) not in out:
                _INVERSE[how](out, _get(config, target), (names,) if isinstance(names, str) else names)
    if with_legacy:
        out.update(metadata.get(LEGACY) or {})
        for name in metadata.get(LEGACY_ABSENT) or ():
            out.pop(name, None)
    return out


def _back_copy(out: dict[str, Any], got: tuple[bool, Any], names: tuple[str, ...]) -> None:
    if got[0]:
        out[names[0]] = got[1]


def _back_last(out: dict[str, Any], got: tuple[bool, Any], names: tuple[str, ...]) -> None:
    """`num_rows` ← num_rows: a source that had `row_count` has it (and its own `num_rows`) in `legacy`."""
    if got[0]:
        out[names[-1]] = got[1]


def _back_nothing(out: dict[str, Any], got: tuple[bool, Any], names: tuple[str, ...]) -> None:
    """Computed from another field (`dataset_id`, counts, flags): nothing of the source to give back."""


def _back_schema(out: dict[str, Any], got: tuple[bool, Any], names: tuple[str, ...]) -> None:
    if got[0]:
        out[names[0]] = None if got[1] is None else [_renamed_back(f, SCHEMA_FIELD_NAMES) for f in got[1]]


def _back_steps(out: dict[str, Any], got: tuple[bool, Any], names: tuple[str, ...]) -> None:
    if got[0]:
        out[names[0]] = [_renamed_back({k: v for k, v in step.items() if k != "order"}, STEP_NAMES)
                         for step in got[1]]


def _renamed_back(entry: Mapping[str, Any], names: tuple[tuple[tuple[str, ...], str], ...]) -> dict[str, Any]:
    out = dict(entry)
    for spellings, new in names:
        if new in out:
            out[spellings[0]] = out.pop(new)
    return out


_INVERSE: dict[str, Callable[[dict[str, Any], tuple[bool, Any], tuple[str, ...]], None]] = {
    COPY: _back_copy, FIRST_PRESENT: _back_last, DEFAULT_CSV: _back_copy, ID_TEXT: _back_nothing,
    CONFIG_ID: _back_nothing, SCHEMA_FIELDS: _back_schema, STEPS: _back_steps, NOT_EMPTY: _back_nothing,
    COUNT: _back_nothing, WHEN_APPLIED: _back_nothing,
}


# -- equality, type by type -----------------------------------------------------------------------


def identical(a: Any, b: Any) -> bool:
    """Equal value and equal BSON type, all the way down: 1 is not 1.0 nor True, "1" is not 1, an
    ObjectId is not its hex text; key order inside a document does not matter; NaN equals NaN.

    The fast form of `not differences(a, b)`, for every document of a split."""
    ta, tb = type(a), type(b)
    if ta is not tb and not (ta in _INTS and tb in _INTS):
        return False
    if ta is dict:
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if ta is list or ta is tuple:
        return len(a) == len(b) and all(map(identical, a, b))
    if ta is float and a != a:
        return b != b
    return a == b


_INTS = (int, Int64)


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two values differ, field by field and type by type (paths like `data_schema[2].type`)."""
    ta, tb = _bson_type(a), _bson_type(b)
    if ta != tb:
        return [f"{path or '(document)'}: {ta} vs {tb}"]
    if isinstance(a, Mapping):
        found = []
        for key in sorted(set(a) | set(b), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                found.append(f"{where}: {'absent' if key not in a else 'present'} vs "
                             f"{'absent' if key not in b else 'present'}")
            else:
                found += differences(a[key], b[key], where)
        return found
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{path or '(value)'}: {_short(a)} vs {_short(b)}"]


def _bson_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, Int64)):
        return "int"  # int32 and int64 are one type to a reader: nx-27017 and drivers give either back
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, ObjectId):
        return "objectId"
    return type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
