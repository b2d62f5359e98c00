"""The column mapping of a declared migration: a source row (a dict) → a target row (a dict).

    rule                                 value
    ───────────────────────────────────  ────────────────────────────────────────────────────────
    new = { from = "old" }               the source value, renamed
    new = { from = "doc", path = "$.a.b[0]" }  a value inside a JSON column / sub-document
    new = { from = "x", cast = "float" } converted; one that cannot be is a reject
    new = { from = "x", transform = "lower" }  one of TRANSFORMS, then the cast if any
    new = { constant = "eu" }            the same value on every row
    optional = true                      a missing field or path gives NULL instead of a reject

Order: from → path → transform → cast. Unnamed source columns are copied as they are (keep_unmapped),
less `drop` and the sources of derived columns; from MongoDB into PostgreSQL they go to one JSONB
column (rest_column). A row that breaks a rule raises `MappingError`, which the migration turns into
a reject with its key and the reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.declarative.spec import MigrationSpec

INT8 = (-(2 ** 63), 2 ** 63 - 1)
_PATH = re.compile(r"^\$((\.[A-Za-z_][A-Za-z0-9_-]*)|(\[\d+\])|(\[\"[^\"]+\"\]))+$")
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+)\]|\[\"([^\"]+)\"\]")
_MISSING = object()


class MappingError(ValueError):
    """A row that breaks the mapping: the reason names the column and the value."""


# cast name → PostgreSQL type of a created target column
CASTS: dict[str, str] = {"text": "text", "int": "int8", "float": "float8", "bool": "bool",
                         "timestamp": "timestamptz", "json": "jsonb"}
# transform name → PostgreSQL type of its result
TRANSFORMS: dict[str, str] = {"lower": "text", "upper": "text", "trim": "text",
                              "epoch_ms_to_timestamp": "timestamptz", "epoch_s_to_timestamp": "timestamptz"}


def check_path(path: str) -> str | None:
    """What is wrong with a JSON path, or None: `$` then `.name`, `[index]` or `["any key"]` steps."""
    return None if _PATH.match(path) else 'use $ followed by .name, [0] or ["key"] steps, e.g. $.scores[0].value'


def follow(value: Any, path: str) -> Any:
    """The value at `path` inside a sub-document, list, or JSON text; `_MISSING` when absent."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise MappingError(f"not valid JSON ({exc})") from None
    for name, index, quoted in _STEP.findall(path):
        if index:
            if not isinstance(value, list) or int(index) >= len(value):
                return _MISSING
            value = value[int(index)]
        else:
            if not isinstance(value, Mapping) or (name or quoted) not in value:
                return _MISSING
            value = value[name or quoted]
    return value


def _epoch(scale: float) -> Callable[[Any], datetime]:
    def convert(value: Any) -> datetime:
        if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, str)):
            raise MappingError(f"expected a number of {'milliseconds' if scale == 1000 else 'seconds'}, "
                               f"got {type(value).__name__}")
        try:
            number = float(value)
            return datetime.fromtimestamp(number / scale, tz=timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise MappingError(f"{value!r} is not a time in epoch {'ms' if scale == 1000 else 's'}") from None
    return convert


def _text_only(name: str, function: Callable[[str], str]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str):
            raise MappingError(f"{name} needs text, got {type(value).__name__}")
        return function(value)
    return convert


_TRANSFORM_FUNCTIONS: dict[str, Callable[[Any], Any]] = {
    "lower": _text_only("lower", str.lower), "upper": _text_only("upper", str.upper),
    "trim": _text_only("trim", str.strip),
    "epoch_ms_to_timestamp": _epoch(1000.0), "epoch_s_to_timestamp": _epoch(1.0),
}


def jsonable(value: Any) -> Any:
    """A value JSON can hold: ObjectIds and other ids as text, times as ISO text, Decimals as numbers."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value) if value.is_finite() else str(value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)  # ObjectId, Decimal128, UUID …


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise MappingError("a boolean is not an integer")
    if isinstance(value, int):
        result = value
    elif isinstance(value, (float, Decimal)) and math.isfinite(value) and value == int(value):
        result = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        result = int(value)
    else:
        raise MappingError(f"{_shown(value)} is not an integer")
    if not INT8[0] <= result <= INT8[1]:
        raise MappingError(f"{result} is out of the 64-bit integer range")
    return result


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise MappingError("a boolean is not a number")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise MappingError(f"{_shown(value)} is not a number") from None


_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise MappingError(f"{_shown(value)} is not a boolean")


def _to_timestamp(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise MappingError(f"{_shown(value)} is not an ISO 8601 time") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    raise MappingError(f"{_shown(value)} is not a time (for epoch numbers use transform = "
                       "\"epoch_ms_to_timestamp\")")


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (Mapping, list)):
        return json.dumps(jsonable(value), sort_keys=True)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


_CAST_FUNCTIONS: dict[str, Callable[[Any], Any]] = {
    "text": _to_text, "int": _to_int, "float": _to_float, "bool": _to_bool, "timestamp": _to_timestamp,
    "json": jsonable,
}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Mapper:
    """Applies a spec's rules to rows; built once per chunk runner from the spec and the source's columns."""

    def __init__(self, spec: MigrationSpec, rest_column: str | None = None, promoted: tuple[str, ...] = ()) -> None:
        self.rules = spec.columns
        consumed = {r.source for r in spec.columns if r.source is not None}
        self._skip = consumed | set(spec.drop) | {r.target for r in spec.columns}
        self.keep_unmapped = spec.keep_unmapped
        # Into PostgreSQL from MongoDB: the unmapped fields of each document go into one JSONB column, except
        # the `promoted` ones (key, partition, chunking field), which keep a column of their own.
        self.rest_column = rest_column
        self.promoted = tuple(p for p in promoted if p not in self._skip)

    def unmapped(self, source_columns: list[str]) -> list[str]:
        """The source columns copied as they are, in source order."""
        if not self.keep_unmapped:
            return []
        return [c for c in source_columns if c not in self._skip]

    def apply(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The target row of `row`; raises MappingError naming the column when a rule cannot be applied."""
        out: dict[str, Any] = {}
        for rule in self.rules:
            out[rule.target] = self._value(rule, row)
        if self.keep_unmapped:
            rest = {k: v for k, v in row.items() if k not in self._skip}
            if self.rest_column is not None:
                for name in self.promoted:
                    value = rest.pop(name, None)
                    out[name] = value if value is None or isinstance(value, (str, int, float)) else str(value)
                out[self.rest_column] = jsonable(rest) if rest else None
            else:
                out.update(rest)
        return out

    @staticmethod
    def _value(rule: Any, row: Mapping[str, Any]) -> Any:
        if rule.has_constant:
            value = rule.constant
        else:
            value = row.get(rule.source, _MISSING)
            if value is not _MISSING and value is not None and rule.path is not None:
                try:
                    value = follow(value, rule.path)
                except MappingError as exc:
                    raise MappingError(f"{rule.target}: {rule.source} is {exc}") from None
            if value is _MISSING:
                if rule.optional:
                    return None
                where = f"path {rule.path} in {rule.source!r}" if rule.path else f"field {rule.source!r}"
                raise MappingError(f"{rule.target}: {where} is missing")
        if value is None:
            return None
        try:
            if rule.transform is not None:
                value = _TRANSFORM_FUNCTIONS[rule.transform](value)
            if rule.cast is not None:
                value = _CAST_FUNCTIONS[rule.cast](value)
        except MappingError as exc:
            how = f"{rule.transform} then {rule.cast}" if rule.transform and rule.cast else rule.transform or rule.cast
            raise MappingError(f"{rule.target}: {how} of {rule.source or 'constant'}: {exc}") from None
        return value
