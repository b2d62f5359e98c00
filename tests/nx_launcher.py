"""Starts the nx-27017 MongoDB stand-in with two of its gaps worked around (DESIGN §5), for the tests only.

The first gap: nx-27017 keeps documents in SQLite and names a single-field index `idx_<collection>_<field>`, which
for a field called `id` is the name of its hidden `_id` index. `CREATE INDEX IF NOT EXISTS` then builds
nothing and the listing shows nothing, where a real MongoDB builds the index. MLflow has tables keyed on `id`,
whose unique index `mlflow-to-mongo` builds and checks. Here such an index gets a name of its own, so the
stand-in builds it as MongoDB would; nothing else changes.

The second gap: a range on `_id` (`$gt`, `$gte`, `$lt`, `$lte`) is never translated to SQL. nx-27017 answers it by
decoding every document of the collection in Python, so a query for the `_id` range of a chunk costs a scan of the
whole collection (measured: 20,000 documents of `user_data` took 2.5 s to answer a query returning 1,310), and a
chunked migration of N documents costs N²: the 200,000-document benchmark of `userdata-split` could not finish.
MongoDB answers such a query from its `_id` index. Here a range whose bound is an ObjectId is translated to SQL on
the `_id` column, where nx-27017 keeps an ObjectId as its 24 lowercase hex digits (ordered as the 12 bytes are)
under a unique index, and restricted to documents whose `_id` is an ObjectId (BSON compares within one type only:
a string `_id` of 24 hex digits, stored the same way, must not match). Other ranges keep nx-27017's own way.

The third gap: `{"a.0": {"$exists": true}}` (MongoDB's way of asking for a non-empty array) finds nothing, since
nx-27017 reads `a.0` as the key "0" of an object, never as the first element of an array; and `$exists` skips
fields holding null. The `userdata-split` report counts documents with a transformation history this way (the
runbook's own check); the other forms that answer right (`$size` in a `$group`, `$isArray`) run in Python over every
document, 40 s per 20,000 `user_data` documents, longer than the split itself. Here `$exists` on a path ending in
a number asks SQLite for both meanings, the array position and the key, as MongoDB does, null included.

Run as `python -m tests.nx_launcher ARGS…` with nx-27017's own arguments.
"""

from __future__ import annotations

import threading

from neosqlite.collection import index_manager
from neosqlite.collection.query_helper._sql_query_builder import SqlQueryBuilderMixin
from neosqlite.objectid import ObjectId
from neosqlite.sql_utils import quote_table_name

_inside = threading.local()
_create_index = index_manager.IndexManager.create_index
_quote_identifier = index_manager.quote_identifier


def _is_id_field(key) -> bool:
    if isinstance(key, str):
        return key == "id"
    return isinstance(key, list) and len(key) == 1 and (key[0] == "id" or (isinstance(key[0], tuple)
                                                                           and key[0][0] == "id"))


def create_index(self, key, *args, **kwargs):
    _inside.collection = self.collection.name if _is_id_field(key) else None
    try:
        return _create_index(self, key, *args, **kwargs)
    finally:
        _inside.collection = None


def quote_identifier(name: str) -> str:
    collection = getattr(_inside, "collection", None)
    if collection is not None and name == f"idx_{collection}_id":
        name = f"idx_{collection}_id_field"
    return _quote_identifier(name)


index_manager.IndexManager.create_index = create_index
index_manager.quote_identifier = quote_identifier

_RANGES = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_build_id_operator_clause = SqlQueryBuilderMixin._build_id_operator_clause


def build_id_operator_clause(self, value: dict):
    """ObjectId ranges on `_id` in SQL (the module's second gap); everything else as nx-27017 does it."""
    if not value or not all(op in _RANGES and isinstance(bound, ObjectId) for op, bound in value.items()):
        return _build_id_operator_clause(self, value)
    column = self._id_column_ref()
    data = f"{quote_table_name(self.collection.name)}.data"
    clauses = [f"{column} {_RANGES[op]} ?" for op in value]
    clauses.append(f"json_extract({data}, '$._id.__neosqlite_objectid__') = 1")
    return " AND ".join(clauses), [str(bound) for bound in value.values()]


SqlQueryBuilderMixin._build_id_operator_clause = build_id_operator_clause

_build_field_clause = SqlQueryBuilderMixin._build_field_clause


def build_field_clause(self, field: str, value):
    """`$exists` on `a.b.N` as MongoDB reads it (the module's third gap); everything else as nx-27017 does it."""
    parent, _, last = field.rpartition(".")
    if not (parent and last.isdigit() and isinstance(value, dict) and list(value) == ["$exists"]
            and isinstance(value["$exists"], bool) and all(name.isidentifier() for name in parent.split("."))):
        return _build_field_clause(self, field, value)
    data = f"{quote_table_name(self.collection.name)}.data"
    either = (f"(json_type({data}, '$.{parent}[{int(last)}]') IS NOT NULL "
              f"OR json_type({data}, '$.{parent}.\"{last}\"') IS NOT NULL)")
    return (either if value["$exists"] else f"NOT {either}"), []


SqlQueryBuilderMixin._build_field_clause = build_field_clause

if __name__ == "__main__":
    from nx_27017.nx_27017 import main

    main()
