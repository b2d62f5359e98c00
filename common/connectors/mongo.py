"""MongoDB sink (pymongo, imported only when a mongodb:// URL is used).

Documents, not rows: the `Sink` ABC is shaped for tables (a TableSpec and tuples); a MongoDB target
holds documents with sub-documents and no fixed columns, so this sink adds `upsert_documents`, keyed
on `_id` only. Every write is an unordered `bulk_write` of `ReplaceOne(upsert=True)` by `_id` in
batches of at least 1,000 documents (DESIGN §5/§6: the only upsert form that is fast on every server
we test with). Before writing, the documents already present with the same `_id`s are read back, and
identical ones are not rewritten: a re-run writes nothing and counts them as unchanged, whatever the
server reports as "modified" (nx-27017 reports every matched replacement as modified).

A document that cannot be stored (over 16 MB, a key starting with `$`, containing `.` or NUL, or one
the server refuses) becomes a `Reject` with its reason; the rest of the batch is written.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

import bson
import pymongo
from pymongo import ReplaceOne
from pymongo.errors import (AutoReconnect, BulkWriteError, ConnectionFailure, NetworkTimeout, PyMongoError,
                            ServerSelectionTimeoutError)

from common.connectors.base import Row, TableSpec
from common.connectors.base import Sink as BaseSink
from common.errors import DataError, ServiceUnavailable, TransientError
from common.model import Reject, WriteCounts
from common.urls import mask

MIN_BATCH = 1_000
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
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


def invalid_key(document: Mapping[str, Any], path: str = "") -> str | None:
    """The first key MongoDB cannot store (`$…`, containing `.` or NUL), or None."""
    for key, value in document.items():
        where = f"{path}.{key}" if path else str(key)
        if not isinstance(key, str):
            return f"key {where!r} is not a string"
        if key.startswith("$") or "." in key or "\x00" in key:
            return f"invalid key name {where!r} (keys may not start with '$' or contain '.' or NUL)"
        nested = _nested_documents(value)
        for item in nested:
            found = invalid_key(item, where)
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

    def upsert_documents(self, collection: str, documents: Sequence[dict[str, Any]], entity: str | None = None
                         ) -> DocumentWrite:
        """Replace-or-insert each document by `_id`; identical documents are left alone and counted
        unchanged. Raises TransientError when the server cannot be reached (the chunk is retried)."""
        result = DocumentWrite()
        entity = entity or collection
        for start in range(0, len(documents), self.batch_size):
            self._write_batch(collection, documents[start:start + self.batch_size], entity, result)
        return result

    def _write_batch(self, collection: str, documents: Sequence[dict[str, Any]], entity: str,
                     result: DocumentWrite) -> None:
        storable = []
        for doc in documents:
            reason = invalid_key(doc)
            if reason is None:
                size = len(bson.encode(doc))
                if size > MAX_DOCUMENT_BYTES:
                    reason = f"document is {size:,} bytes, over MongoDB's 16 MB limit"
            if reason is not None:
                result.rejects.append(Reject(entity, _key_text(doc), reason, _excerpt(doc)))
            else:
                storable.append(doc)
        if not storable:
            return
        target = self.db[collection]
        with translate_errors(f"target {self.public_url}"):
            existing = {_hashable(d["_id"]): d for d in target.find({"_id": {"$in": [d["_id"] for d in storable]}})}
            changed = [d for d in storable if _hashable(d["_id"]) not in existing
                       or not same(existing[_hashable(d["_id"])], d)]
            result.counts.unchanged += len(storable) - len(changed)
            if not changed:
                return
            failed: dict[int, str] = {}
            try:
                target.bulk_write([ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in changed], ordered=False)
            except BulkWriteError as exc:
                for error in exc.details.get("writeErrors", []):
                    failed[error["index"]] = f"MongoDB refused the document: {error.get('errmsg', '')} " \
                                             f"(code {error.get('code')})"
        for index, doc in enumerate(changed):
            if index in failed:
                result.rejects.append(Reject(entity, _key_text(doc), failed[index], _excerpt(doc)))
            elif _hashable(doc["_id"]) in existing:
                result.counts.updated += 1
            else:
                result.counts.inserted += 1

    def ensure_indexes(self, collection: str, indexes: Sequence[Index]) -> None:
        """Create the collection's indexes if missing; creating an existing index is a no-op."""
        with translate_errors(f"target {self.public_url}"):
            if collection not in self.db.list_collection_names():
                try:
                    self.db.create_collection(collection)
                except pymongo.errors.CollectionInvalid:
                    pass  # another worker created it first
            for index in indexes:
                self.db[collection].create_index(list(index.keys), unique=index.unique)

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
        self.ensure_indexes(table.name, [Index(tuple((k, 1) for k in table.key), unique=True)])


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


def _hashable(value: Any) -> Any:
    # Migrations use scalar or string ids (nx-27017 cannot query sub-document equality, DESIGN §5);
    # other callers may still pass a sub-document.
    return repr(sorted(value.items())) if isinstance(value, Mapping) else value


def _key_text(doc: Mapping[str, Any]) -> str:
    return str(doc.get("_id"))[:200]


def _excerpt(doc: Mapping[str, Any]) -> str:
    return repr({k: (v if len(repr(v)) < 100 else f"<{type(v).__name__}>") for k, v in doc.items()})[:500]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return mask(text.splitlines()[0] if text else type(exc).__name__)[:300]
