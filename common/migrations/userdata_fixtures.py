"""Realistic `user_data` documents for tests, `shuttle demo --migration userdata-split` and the benchmark.

What a monolithic dataset collection looks like after a few years of an application's life: ObjectId
`_id`s; users of very different sizes (a few hold most documents); PII found in about a third of the
datasets; a transformation history on about half; optional fields missing here and there; older documents
with legacy spellings (`column_name`/`data_type` in `data_schema`, `type`/`parameters`/`applied_at` in the
history, `row_count` beside `num_rows`, `updated_at` kept as ISO text) and leftovers no mapping names
(`legacy`, `tags`); nested inferred schemas; and data previews from a few hundred bytes to tens of KB.
`bad=True` adds one document of each kind the migration must reject. Generation is seeded: the same
arguments give the same documents.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from bson.objectid import ObjectId

COLLECTION = "user_data"
NO_USER = "(no user_id)"  # the source's partition of documents without a user (mongo_source.NO_PARTITION)
EPOCH = datetime(2024, 1, 1)
_TYPES = ("integer", "float", "string", "boolean", "datetime", "category")
_OPERATIONS = ("drop_missing", "fill_missing", "normalize", "one_hot_encode", "rename_column", "filter_rows",
               "log_transform", "bin_values")
_PII = ("email", "phone", "ssn", "name", "address")


@dataclass
class Fixture:
    """What was built: document count per user and the `_id`s of the documents that must be rejected."""

    per_user: dict[str, int] = field(default_factory=dict)  # documents without a user under NO_USER
    rejected: dict[str, str] = field(default_factory=dict)  # str(_id) → what is wrong with it
    with_history: int = 0  # documents with a non-empty history, rejected ones excluded

    @property
    def total(self) -> int:
        return sum(self.per_user.values())


def user_names(users: int) -> list[str]:
    return [f"user_{i:04d}" for i in range(users)]


def documents(count: int, users: int = 20, seed: int = 13, preview_kb: float = 2.0) -> Iterator[dict[str, Any]]:
    """`count` user_data documents over `users` users of skewed sizes (user_0000 the largest)."""
    rng = random.Random(seed)
    names = user_names(users)
    weights = [1.0 / (i + 1) ** 1.1 for i in range(users)]
    base = int(EPOCH.timestamp())
    for n in range(count):
        created = EPOCH + timedelta(seconds=n * 37 + rng.randint(0, 30))
        oid = ObjectId.from_datetime(created)
        oid = ObjectId(oid.binary[:4] + n.to_bytes(8, "big"))  # unique, and ordered like creation
        yield _document(rng, oid, rng.choices(names, weights)[0], created, base, preview_kb, legacy=n % 7 == 3)


def _document(rng: random.Random, oid: ObjectId, user: str, created: datetime, base: int, preview_kb: float,
              legacy: bool) -> dict[str, Any]:
    columns = rng.randint(3, 14)
    rows = rng.randint(10, 2_000_000)
    updated = created + timedelta(hours=rng.randint(0, 2_000))
    doc: dict[str, Any] = {
        "_id": oid,
        "user_id": user,
        "filename": f"{oid}_{rng.choice(('sales', 'churn', 'survey', 'sensors', 'claims'))}.csv",
        "original_filename": f"{rng.choice(('Q3 sales', 'export', 'data', 'customers'))} {rng.randint(1, 99)}.csv",
        "s3_url": f"s3://datasets/{user}/{oid}.csv",
        "num_rows": rows,
        "num_columns": columns,
        "data_schema": [_schema_field(rng, i, legacy) for i in range(columns)],
        "is_processed": rng.random() < 0.9,
        "created_at": created,
        "updated_at": updated.isoformat() if legacy and rng.random() < 0.5 else updated,
        "file_path": f"/data/uploads/{user}/{oid}.csv",
    }
    if rng.random() < 0.35:
        kinds = rng.sample(_PII, rng.randint(1, 3))
        doc.update(contains_pii=True, pii_report={k: {"columns": [f"col_{rng.randint(0, columns - 1)}"],
                                                      "confidence": round(rng.random(), 3)} for k in kinds},
                   pii_risk_level=rng.choice(("low", "medium", "high")), pii_masked=rng.random() < 0.5)
    elif rng.random() < 0.7:
        doc["contains_pii"] = False
    if doc["is_processed"]:
        doc["processed_at"] = created + timedelta(minutes=rng.randint(1, 90))
        doc["schema"] = {"columns": {f"col_{i}": {"type": rng.choice(_TYPES),
                                                  "stats": {"min": rng.randint(0, 9), "max": rng.randint(10, 99)}}
                                     for i in range(columns)},
                         "inferred_by": {"tool": "pandas", "version": "2.2"}}
        doc["statistics"] = {"row_count": rows, "missing": {f"col_{i}": rng.randint(0, 50) for i in range(columns)}}
        doc["quality_report"] = {"score": round(rng.random() * 100, 2), "issues": rng.randint(0, 12)}
    if rng.random() < 0.8:
        width = max(1, int(preview_kb * 1024 / (columns * 12)))
        doc["data_preview"] = [{f"col_{c}": rng.choice((rng.randint(0, 10_000), round(rng.random(), 6), "text",
                                                        None)) for c in range(columns)} for _ in range(width)]
    if rng.random() < 0.6:
        doc["aiSummary"] = f"Dataset of {rows} rows about {rng.choice(('sales', 'customers', 'devices'))}."
    if rng.random() < 0.75:
        doc["file_type"] = rng.choice(("csv", "csv", "xlsx", "parquet"))
    if rng.random() < 0.5:
        doc["onboarding_progress"] = {"step": rng.randint(1, 6), "completed": rng.random() < 0.4}
    if rng.random() < 0.5:
        doc["transformation_history"] = [_history_entry(rng, created, i, legacy) for i in range(rng.randint(1, 6))]
    elif rng.random() < 0.5:
        doc["transformation_history"] = []
    if legacy:
        if rng.random() < 0.6:
            doc["row_count"] = rows if rng.random() < 0.5 else rows - rng.randint(1, 9)
        doc["legacy"] = {"uploaded_via": "v1-api", "bucket": "old-datasets", "flags": [1, 2.5, True, None]}
    if rng.random() < 0.1:
        doc["tags"] = rng.sample(("finance", "q3", "raw", "cleaned", "shared"), 2)
    for optional in ("original_filename", "s3_url", "num_columns"):
        if rng.random() < 0.05:
            del doc[optional]
    return doc


def _schema_field(rng: random.Random, i: int, legacy: bool) -> dict[str, Any]:
    name_key, type_key = ("column_name", "data_type") if legacy else ("name", "type")
    entry: dict[str, Any] = {name_key: f"col_{i}", type_key: rng.choice(_TYPES), "nullable": rng.random() < 0.3}
    if rng.random() < 0.5:
        entry["sample_values"] = [rng.randint(0, 99) for _ in range(3)]
    return entry


def _history_entry(rng: random.Random, created: datetime, i: int, legacy: bool) -> dict[str, Any]:
    when = created + timedelta(minutes=10 * (i + 1))
    entry: dict[str, Any] = {"operation": rng.choice(_OPERATIONS), "column": f"col_{rng.randint(0, 5)}",
                             "params": {"strategy": rng.choice(("mean", "median", "zero")), "threshold": rng.random()},
                             "timestamp": when}
    if legacy:
        entry = {"type": entry["operation"], "parameters": entry["params"], "applied_at": when.isoformat() + "Z",
                 "column": entry["column"]}
    return entry


def bad_documents(user: str = "user_0000") -> list[tuple[dict[str, Any], str]]:
    """One document of each kind the migration rejects, with what is wrong with it."""
    at = datetime(2025, 6, 1)
    def oid(n: int) -> ObjectId:
        return ObjectId(ObjectId.from_datetime(at).binary[:4] + (10**9 + n).to_bytes(8, "big"))
    return [
        ({"_id": oid(1), "user_id": user, "filename": "a.csv", "created_at": at, "updated_at": at,
          "transformation_history": ["dropped nulls"]}, "transformation_history[0] is str, not an object"),
        ({"_id": oid(2), "user_id": user, "filename": "b.csv", "created_at": at, "updated_at": "last tuesday",
          "transformation_history": [{"operation": "normalize"}]}, "unparseable applied_at"),
        ({"_id": oid(3), "user_id": user, "filename": "c.csv", "num_rows": "many", "created_at": at},
         "field 'num_rows' is str"),
        ({"_id": oid(4), "filename": "d.csv", "created_at": at}, "no user_id"),
    ]


def build_source(db, count: int, users: int = 20, seed: int = 13, bad: bool = False, preview_kb: float = 2.0,
                 collection: str = COLLECTION, batch: int = 1_000) -> Fixture:
    """Drop and fill `collection` of pymongo database `db`; returns what was built."""
    db.drop_collection(collection)
    fixture = Fixture()
    buffer: list[dict[str, Any]] = []
    for doc in documents(count, users, seed, preview_kb):
        fixture.per_user[doc["user_id"]] = fixture.per_user.get(doc["user_id"], 0) + 1
        fixture.with_history += bool(doc.get("transformation_history"))
        buffer.append(doc)
        if len(buffer) >= batch:
            db[collection].insert_many(buffer, ordered=False)
            buffer = []
    if bad:
        for doc, reason in bad_documents():
            buffer.append(doc)
            fixture.rejected[str(doc["_id"])] = reason
            user = doc.get("user_id") or NO_USER
            fixture.per_user[user] = fixture.per_user.get(user, 0) + 1
    if buffer:
        db[collection].insert_many(buffer, ordered=False)
    return fixture
