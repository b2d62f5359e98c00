"""MongoDB sink (pymongo, imported only when a mongodb:// URL is used).

Documents, not rows: the `Sink` ABC is shaped for tables (a TableSpec and tuples); a MongoDB target
holds documents with sub-documents and no fixed columns, so this sink adds `upsert_documents`, keyed
on `_id` only. Every write is an unordered `bulk_write` in batches of at least 1,000 documents (DESIGN
§5/§6). Whatever the path, the outcome is the same:

  - identical documents are not rewritten: a re-run writes nothing and counts them as unchanged, whatever
    the server reports as "modified" (nx-27017 reports every matched replacement as modified);
  - absent ones are inserted (`InsertOne`): an insert is the cheapest write a server has, where an upsert
    first looks the `_id` up (measured +27% on nx-27017, ops/bench/RESULTS.md);
  - present but changed ones are replaced whole by `_id` (`ReplaceOne(upsert=True)`).

Two paths get there, chosen per collection from what the previous batch found:

  - insert first (a fresh load: the previous batch found nothing there): every document is inserted
    without a read, and those that collide on a duplicate `_id` (code 11000) are read back and compared,
    then replaced unless identical;
  - read first (a re-run or a resume: the previous batch collided): the documents present with the same
    `_id`s are read in one query, then only the absent are inserted and the changed replaced.

A read before every insert costs the server about a tenth of a fresh load, and an insert of documents
that are all present costs a re-run a failed write per document; switching on what the last batch saw
gives each case its cheap path. An insert that collides on the read-first path means the document
appeared between the read and the write (a redelivered copy of the same chunk running concurrently,
another writer); it takes the same read-compare-replace step, so the target ends exact and the counts
say what this call really changed.

A document that cannot be stored (over 16 MB, a key starting with `$`, containing `.` or NUL, or one
the server refuses) becomes a `Reject` with its reason; the rest of the batch is written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, NamedTuple
from urllib.parse import urlsplit

import bson
import bson.int64
import bson.objectid
import pymongo
from pymongo import InsertOne, ReplaceOne
from pymongo.errors import (AutoReconnect, BulkWriteError, ConnectionFailure, NetworkTimeout, OperationFailure,
                            PyMongoError, ServerSelectionTimeoutError)

from common.connectors.base import Row, TableSpec
from common.connectors.base import Sink as BaseSink
from common.errors import DataError, ServiceUnavailable, TransientError
from common.model import Reject, WriteCounts
from common.urls import mask

MIN_BATCH = 1_000
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
DUPLICATE_KEY = 11000
_TRANSIENT = (AutoReconnect, NetworkTimeout, ServerSelectionTimeoutError, ConnectionFailure)


@dataclass
class DocumentWrite:
    """What `upsert_documents` did: the counts, and the documents it could not store."""

    counts: WriteCounts = field(default_factory=WriteCounts)
    rejects: list[Reject] = field(default_factory=list)


@dataclass(frozen=True)
class Index:
    """An index to ensure: its keys in order, and whether it is unique."""

    keys: tuple[tuple[str, int], ...]
    unique: bool = False


# Values that hold no keys: the common case, told apart by exact type before any ABC check.
_FLAT = frozenset({str, int, float, bool, type(None), bytes, bson.int64.Int64, bson.objectid.ObjectId, datetime})


def invalid_key(document: Mapping[str, Any], path: str = "") -> str | None:
    """The first key MongoDB cannot store (`$…`, containing `.` or NUL), or None."""
    for key, value in document.items():
        if not isinstance(key, str):
            return f"key {(f'{path}.{key}' if path else str(key))!r} is not a string"
        if key.startswith("$") or "." in key or "\x00" in key:
            where = f"{path}.{key}" if path else key
            return f"invalid key name {where!r} (keys may not start with '$' or contain '.' or NUL)"
        if type(value) in _FLAT:
            continue
        for item in _nested_documents(value):
            found = invalid_key(item, f"{path}.{key}" if path else key)
            if found:
                return found
    return None


def _nested_documents(value: Any) -> Iterable[Mapping[str, Any]]:
    if isinstance(value, Mapping):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _nested_documents(item)


def same(a: Any, b: Any) -> bool:
    """Equal as stored documents: NaN equals NaN, key order does not matter, int64 equals int."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


class Sink(BaseSink):
    """A MongoDB database (the URL's path, or `database=` given) written by `_id`-keyed bulk upserts."""

    kind: ClassVar[str] = "mongo"

    def __init__(self, url: str, database: str | None = None, batch_size: int = MIN_BATCH,
                 timeout_ms: int = 10_000, client: pymongo.MongoClient | None = None) -> None:
        self._url = url
        self.public_url = mask(url)
        self.database_name = database or urlsplit(url).path.lstrip("/") or "mlflow"
        self.batch_size = max(MIN_BATCH, batch_size)
        self._timeout_ms = timeout_ms
        # A ready client may be handed in (the tests' in-process mongomock); otherwise opened on first use.
        self._client: pymongo.MongoClient | None = client
        self._read_first: dict[str, bool] = {}  # per collection: what the previous batch found (module doc)

    # -- connection ------------------------------------------------------------------------------

    @property
    def client(self) -> pymongo.MongoClient:
        if self._client is None:
            self._client = pymongo.MongoClient(self._url, serverSelectionTimeoutMS=self._timeout_ms,
                                               connectTimeoutMS=self._timeout_ms, appname="shuttle-target")
        return self._client

    @property
    def db(self):
        return self.client[self.database_name]

    def check_reachable(self) -> None:
        try:
            self.client.admin.command("ping")
        except PyMongoError as exc:
            raise ServiceUnavailable(f"target MongoDB {self.public_url} is unreachable: {_first_line(exc)}; "
                                     "check the target URL and that the server is running") from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    # -- writes ----------------------------------------------------------------------------------

    def upsert_documents(self, collection: str, documents: Sequence[dict[str, Any]], entity: str | None = None,
                         key: Sequence[str] = ()) -> DocumentWrite:
        """Replace-or-insert each document by `_id`; identical documents are left alone and counted
        unchanged. Raises TransientError when the server cannot be reached (the chunk is retried).

        `entity` names the source table in rejects (default: the collection); `key`, the fields whose
        values a reject lists as its key (default: `_id`, which may be a digest of them)."""
        result = DocumentWrite()
        origin = _Origin(entity or collection, tuple(key))
        for start in range(0, len(documents), self.batch_size):
            self._write_batch(collection, documents[start:start + self.batch_size], origin, result)
        return result

    def _write_batch(self, collection: str, documents: Sequence[dict[str, Any]], origin: _Origin,
                     result: DocumentWrite) -> None:
        storable = self._storable(documents, origin, result)
        if not storable:
            return
        target = self.db[collection]
        with translate_errors(f"target {self.public_url}"):
            if self._read_first.get(collection, False):
                existing = self._existing(target, storable)
                changed = self._changed(storable, existing, result)
                inserts = [d for d in changed if _hashable(d["_id"]) not in existing]
                replaces = [d for d in changed if _hashable(d["_id"]) in existing]
            else:
                existing, inserts, replaces = {}, storable, []
            errors = self._bulk(target, [InsertOne(d) for d in inserts] + [_replace(d) for d in replaces])
            collided = []
            for index, doc in enumerate(inserts):
                error = errors.get(index)
                if error is None:
                    result.counts.inserted += 1
                elif error.get("code") == DUPLICATE_KEY:
                    collided.append(doc)
                else:
                    result.rejects.append(_refused(origin, doc, error))
            for index, doc in enumerate(replaces, start=len(inserts)):
                self._count_replace(doc, errors.get(index), origin, result)
            if collided:
                self._write_collided(target, collided, origin, result)
            # Read first while batches keep finding their documents there; insert first once they do not.
            self._read_first[collection] = bool(existing) or len(collided) * 2 > len(inserts)

    def _write_collided(self, target, documents: list[dict[str, Any]], origin: _Origin,
                        result: DocumentWrite) -> None:
        """Documents whose insert hit a duplicate key: read again, then replaced by `_id` unless identical.

        Once only: a replace by `_id` cannot collide on `_id`, so a second duplicate-key error comes from
        another unique index and the document is a reject with the server's reason."""
        existing = self._existing(target, documents)
        changed = self._changed(documents, existing, result)
        errors = self._bulk(target, [_replace(d) for d in changed])
        for index, doc in enumerate(changed):
            if errors.get(index) is None and _hashable(doc["_id"]) not in existing:
                result.counts.inserted += 1  # gone again since the insert collided: the upsert inserted it
            else:
                self._count_replace(doc, errors.get(index), origin, result)

    @staticmethod
    def _storable(documents: Sequence[dict[str, Any]], origin: _Origin,
                  result: DocumentWrite) -> list[dict[str, Any]]:
        """The documents MongoDB can store; the others become rejects with the reason."""
        storable = []
        for doc in documents:
            reason = invalid_key(doc)
            if reason is None:
                size = len(bson.encode(doc))
                if size > MAX_DOCUMENT_BYTES:
                    reason = f"document is {size:,} bytes, over MongoDB's 16 MB limit"
            if reason is not None:
                result.rejects.append(Reject(origin.entity, _key_text(doc, origin.key), reason, _excerpt(doc)))
            else:
                storable.append(doc)
        return storable

    @staticmethod
    def _existing(target, documents: Sequence[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
        """The stored documents with the same `_id`s, by `_id` (one query per batch)."""
        return {_hashable(d["_id"]): d for d in target.find({"_id": {"$in": [d["_id"] for d in documents]}})}

    @staticmethod
    def _changed(documents: Sequence[dict[str, Any]], existing: Mapping[Any, dict[str, Any]],
                 result: DocumentWrite) -> list[dict[str, Any]]:
        """The documents to write: absent or different from what is stored; identical ones counted unchanged."""
        changed = [d for d in documents if _hashable(d["_id"]) not in existing
                   or not same(existing[_hashable(d["_id"])], d)]
        result.counts.unchanged += len(documents) - len(changed)
        return changed

    @staticmethod
    def _bulk(target, requests: list) -> dict[int, dict[str, Any]]:
        """One unordered bulk write; the per-document errors by request index (the rest were written)."""
        if not requests:
            return {}
        try:
            target.bulk_write(requests, ordered=False)
        except BulkWriteError as exc:
            if exc.details.get("writeConcernErrors"):
                raise TransientError(f"write concern not satisfied: {exc.details['writeConcernErrors'][0]}") from None
            return {error["index"]: error for error in exc.details.get("writeErrors", [])}
        return {}

    @staticmethod
    def _count_replace(doc: dict[str, Any], error: dict[str, Any] | None, origin: _Origin,
                       result: DocumentWrite) -> None:
        if error is None:
            result.counts.updated += 1
        else:
            result.rejects.append(_refused(origin, doc, error))

    def ensure_collections(self, collections: Sequence[str]) -> None:
        """Create the missing collections (their `_id` index comes with them); idempotent across workers.

        The existing ones are listed once: a listing per collection cost a round trip each, 0.2 s of
        planning for MLflow's 65 tables."""
        with translate_errors(f"target {self.public_url}"):
            existing = set(self.db.list_collection_names())
            for collection in collections:
                if collection in existing:
                    continue
                try:
                    self.db.create_collection(collection)
                except pymongo.errors.CollectionInvalid:
                    pass  # another worker created it first

    def ensure_indexes(self, collection: str, indexes: Sequence[Index]) -> dict[Index, str]:
        """Create the missing indexes (and the collection, as `createIndexes` does); an existing index is a no-op.

        Returns the indexes the server refused to build, with its reason: a unique index over documents
        that hold duplicates, or an index that exists with other options. The caller decides what that
        means (a failed check, not an exception: every other index is still built). Connection failures
        raise TransientError."""
        refused: dict[Index, str] = {}
        with translate_errors(f"target {self.public_url}"):
            for index in indexes:
                try:
                    self.db[collection].create_index(list(index.keys), unique=index.unique)
                except OperationFailure as exc:
                    refused[index] = _first_line(exc)
        return refused

    def indexes(self, collection: str) -> list[Index]:
        """The collection's indexes as the server lists them (`_id` included)."""
        with translate_errors(f"target {self.public_url}"):
            info = self.db[collection].index_information()
        return [Index(tuple((field, int(direction)) for field, direction in spec["key"]), bool(spec.get("unique")))
                for spec in info.values()]

    def has_index_on(self, collection: str, field_name: str) -> bool:
        """Whether an index leads with `field_name` (so a query on it reads the index, not every document)."""
        return any(index.keys[0][0] == field_name for index in self.indexes(collection) if index.keys)

    def delete_ids(self, collection: str, ids: Sequence[Any]) -> int:
        """Delete the documents with these `_id`s, in batches; returns how many the server deleted."""
        deleted = 0
        with translate_errors(f"target {self.public_url}"):
            for start in range(0, len(ids), self.batch_size):
                deleted += self.db[collection].delete_many({"_id": {"$in": list(ids[start:start + self.batch_size])}}
                                                           ).deleted_count
        return deleted

    # -- reads for verification ------------------------------------------------------------------

    def count(self, collection: str, query: dict[str, Any] | None = None) -> int:
        with translate_errors(f"target {self.public_url}"):
            return self.db[collection].count_documents(query or {})

    def find(self, collection: str, query: dict[str, Any], projection: dict[str, Any] | None = None):
        with translate_errors(f"target {self.public_url}"):
            return list(self.db[collection].find(query, projection))

    # -- the table-shaped Sink ABC ---------------------------------------------------------------

    def upsert(self, table: TableSpec, rows: Sequence[Row]) -> WriteCounts:
        """Rows as documents whose `_id` is the key (one column: its value; several: a sub-document)."""
        docs = []
        for row in rows:
            doc = dict(zip(table.column_names, row))
            key = {k: doc[k] for k in table.key}
            docs.append({"_id": key[table.key[0]] if len(table.key) == 1 else key, **doc})
        written = self.upsert_documents(table.name, docs)
        if written.rejects:
            raise DataError(f"{len(written.rejects)} rows of {table.name} could not be stored: "
                              f"{written.rejects[0].reason}")
        return written.counts

    def ensure_table(self, table: TableSpec) -> None:
        refused = self.ensure_indexes(table.name, [Index(tuple((k, 1) for k in table.key), unique=True)])
        if refused:
            raise DataError(f"cannot build the unique key index of {table.name}: {next(iter(refused.values()))}")


class translate_errors:
    """Connection-level failures become TransientError (the chunk is retried), URL masked."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and isinstance(exc, _TRANSIENT):
            raise TransientError(f"{self.what}: {_first_line(exc)}") from None
        return False


def _replace(doc: dict[str, Any]) -> ReplaceOne:
    return ReplaceOne({"_id": doc["_id"]}, doc, upsert=True)


class _Origin(NamedTuple):
    """Where a batch's documents come from, for its rejects: the source entity and its key fields."""
    entity: str
    key: tuple[str, ...]


def _refused(origin: _Origin, doc: dict[str, Any], error: Mapping[str, Any]) -> Reject:
    reason = f"MongoDB refused the document: {error.get('errmsg', '')} (code {error.get('code')})"
    return Reject(origin.entity, _key_text(doc, origin.key), reason, _excerpt(doc))


def _hashable(value: Any) -> Any:
    # Migrations use scalar or string ids (nx-27017 cannot query sub-document equality, DESIGN §5);
    # other callers may still pass a sub-document.
    return repr(sorted(value.items())) if isinstance(value, Mapping) else value


def _key_text(doc: Mapping[str, Any], key: tuple[str, ...]) -> str:
    """The key values as a JSON list of strings (as a conversion reject lists them), else the `_id`."""
    if key:
        return json.dumps([str(doc.get(field)) for field in key])[:200]
    return str(doc.get("_id"))[:200]


def _excerpt(doc: Mapping[str, Any]) -> str:
    return repr({k: (v if len(repr(v)) < 100 else f"<{type(v).__name__}>") for k, v in doc.items()})[:500]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return mask(text.splitlines()[0] if text else type(exc).__name__)[:300]
