"""Starts the nx-27017 MongoDB stand-in with one of its gaps worked around (DESIGN §5), for the tests only.

The gap: nx-27017 keeps documents in SQLite and names a single-field index `idx_<collection>_<field>`, which
for a field called `id` is the name of its hidden `_id` index. `CREATE INDEX IF NOT EXISTS` then builds
nothing and the listing shows nothing, where a real MongoDB builds the index. MLflow has tables keyed on `id`,
whose unique index `mlflow-to-mongo` builds and checks. Here such an index gets a name of its own, so the
stand-in builds it as MongoDB would; nothing else changes.

Run as `python -m tests.nx_launcher ARGS…` with nx-27017's own arguments.
"""

from __future__ import annotations

import threading

from neosqlite.collection import index_manager

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

if __name__ == "__main__":
    from nx_27017.nx_27017 import main

    main()
