"""MongoDB source: one collection read by partition (a field such as `user_id`) and `_id` range.

    count      documents per partition, in one `$group` over the collection (partitions = the field's
               non-empty string values; every other value, null or missing falls in `NO_PARTITION`);
               without a partition field (`partition_field=None`), the whole collection is one, `WHOLE`
    cut        a partition over `chunk_rows` documents is cut at every `chunk_rows`-th `_id` of the
               partition in `_id` order, read with a projection on `_id` only: boundaries come from the
               data, so a user holding half the collection gets as many chunks as their documents need
    read       one chunk = {partition field: value, _id: [lo, hi)}, streamed through a cursor in batches
               (a worker holds one batch, whatever the chunk's size), in the order the server finds them

Boundaries are text (the ledger stores chunk bounds as strings): `encode_id` tags the `_id`'s BSON type
(`oid:`, `str:`, `int:`), and `decode_id` gives the value back. A partition whose `_id`s are not all of one
type is not cut (MongoDB compares values of one type only inside a range): it is one chunk.

Only query forms that every server we test against answers rightly are used (DESIGN §5): `find` with
equality, `$in` and ranges on `_id`, `$group` with `$sum`; no `$exists: false`, no `$not`, no `count` on
ObjectIds. What a stand-in cannot do is the tests' business, not this module's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import pymongo
from bson.objectid import ObjectId
from pymongo.errors import PyMongoError

from common.connectors.base import Source as BaseSource
from common.connectors.mongo import translate_errors
from common.errors import ConfigError, ServiceUnavailable
from common.urls import mask

NO_PARTITION = "(no user_id)"
# The one partition of a source read without a partition field (`partition_field=None`): the whole collection.
WHOLE = "(all)"
# The partition of documents whose field is missing, null, empty or not a string; its chunk finds them with
# this filter (in place of `$not: {$type: "string"}`, which not every server implements).
_NOT_A_NAME: list[dict[str, Any]] = [{"$in": [None, ""]}, {"$type": "number"}, {"$type": "bool"},
                                     {"$type": "objectId"}, {"$type": "date"}]
READ_BATCH = 1_000
_TAGS = {ObjectId: "oid", str: "str", int: "int"}


def encode_id(value: Any) -> str:
    """A chunk boundary as text: the `_id`'s type, a colon, its value."""
    tag = _TAGS.get(type(value))
    if tag is None:
        raise ConfigError(f"cannot cut chunks at an _id of type {type(value).__name__}")
    return f"{tag}:{value}"


def decode_id(text: str) -> Any:
    tag, _, value = text.partition(":")
    return {"oid": ObjectId, "str": str, "int": int}[tag](value)


class Source(BaseSource):
    """A collection of a MongoDB database, read by partition and `_id` range."""

    kind: ClassVar[str] = "mongo"

    def __init__(self, url: str, collection: str, partition_field: str | None = "user_id", database: str | None = None,
                 timeout_ms: int = 10_000, client: pymongo.MongoClient | None = None, role: str = "source") -> None:
        self._url = url
        self.public_url = mask(url)
        self.database_name = database or urlsplit(url).path.lstrip("/") or "test"
        self.collection_name = collection
        self.field = partition_field
        self.role = role
        self._timeout_ms = timeout_ms
        self._client = client  # a ready client may be handed in (the tests' in-process mongomock)

    @property
    def client(self) -> pymongo.MongoClient:
        if self._client is None:
            self._client = pymongo.MongoClient(self._url, serverSelectionTimeoutMS=self._timeout_ms,
                                               connectTimeoutMS=self._timeout_ms, appname="shuttle-source")
        return self._client

    @property
    def collection(self):
        return self.client[self.database_name][self.collection_name]

    def errors(self) -> translate_errors:
        return translate_errors(f"{self.role} {self.public_url}")

    def check_reachable(self) -> None:
        try:
            self.client.admin.command("ping")
        except PyMongoError as exc:
            raise ServiceUnavailable(f"{self.role} MongoDB {self.public_url} is unreachable: {str(exc)[:200]}; "
                                     "check the URL and that the server is running") from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    # -- planning --------------------------------------------------------------------------------

    def count_partitions(self, partitions: Sequence[str] | None = None) -> dict[str, int]:
        """Documents per partition (all of them, or those named), counted by the server in one `$group`.

        Over the whole collection, then kept for `partitions`: a `$match` on `$in` costs some servers more
        than the grouping itself, and the answer is one small document per user."""
        counts: dict[str, int] = {}
        if self.field is None:
            with self.errors():
                counts[WHOLE] = self.collection.count_documents({})
            return counts if partitions is None or WHOLE in partitions else {}
        with self.errors():
            for group in self.collection.aggregate([{"$group": {"_id": f"${self.field}", "n": {"$sum": 1}}}]):
                name = group["_id"] if isinstance(group["_id"], str) and group["_id"] else NO_PARTITION
                counts[name] = counts.get(name, 0) + int(group["n"])
        if partitions is not None:
            counts = {p: counts[p] for p in partitions if p in counts}
        return counts

    def boundaries(self, partition: str, chunk_rows: int) -> list[str]:
        """The `_id` starting every `chunk_rows`-th document of the partition, in `_id` order (encoded).

        Empty when the partition fits one chunk or its `_id`s are of several types (see module doc)."""
        if partition == NO_PARTITION:
            return []
        cuts: list[str] = []
        kinds: set[type] = set()
        with self.errors():
            within = {} if self.field is None else {self.field: partition}
            cursor = self.collection.find(within, {"_id": 1}).sort("_id", 1).batch_size(10_000)
            for n, doc in enumerate(cursor):
                kinds.add(type(doc["_id"]))
                if n and n % chunk_rows == 0:
                    cuts.append(doc["_id"])
        if len(kinds) > 1 or not kinds <= set(_TAGS):
            return []
        return [encode_id(c) for c in cuts]

    # -- reading ---------------------------------------------------------------------------------

    def query(self, partition: str, lo: str, hi: str) -> dict[str, Any]:
        """The filter of one chunk: its partition and `_id` range [lo, hi) ("" = unbounded)."""
        if partition == NO_PARTITION:
            return {"$or": [{self.field: cond} for cond in _NOT_A_NAME]}
        query: dict[str, Any] = {} if self.field is None else {self.field: partition}
        bounds = {op: decode_id(b) for op, b in (("$gte", lo), ("$lt", hi)) if b}
        if bounds:
            query["_id"] = bounds
        return query

    def read(self, partition: str, lo: str, hi: str, batch: int = READ_BATCH,
             projection: dict[str, Any] | None = None) -> Iterator[list[dict[str, Any]]]:
        """The chunk's documents in batches, streamed (one batch in memory); connection errors are transient."""
        with self.errors():
            cursor = self.collection.find(self.query(partition, lo, hi), projection).batch_size(batch)
            out: list[dict[str, Any]] = []
            for doc in cursor:
                out.append(doc)
                if len(out) >= batch:
                    yield out
                    out = []
            if out:
                yield out

    def ids(self, partition: str, lo: str, hi: str) -> list[Any]:
        """The `_id`s of a chunk's range (what the target's range must hold, for deletes)."""
        return [d["_id"] for batch in self.read(partition, lo, hi, 10_000, {"_id": 1}) for d in batch]

    def find_by_ids(self, ids: Sequence[Any], projection: dict[str, Any] | None = None) -> dict[Any, dict[str, Any]]:
        """Documents by `_id`, one `$in` query per thousand."""
        found: dict[Any, dict[str, Any]] = {}
        with self.errors():
            for start in range(0, len(ids), READ_BATCH):
                for doc in self.collection.find({"_id": {"$in": list(ids[start:start + READ_BATCH])}}, projection):
                    found[doc["_id"]] = doc
        return found

    def sample_ids(self, partitions: Sequence[str] | None, size: int) -> list[Any]:
        """About `size` random `_id`s of the partitions (all when None), picked by the server (`$sample`).

        Random rather than a fixed pick: a fixed one needs every `_id` read and ranked, a full scan that cost
        as much as the split's own reads on the test server; `$sample` of a few dozen costs nothing."""
        if size <= 0:
            return []
        stages: list[dict[str, Any]] = []
        if partitions is not None and self.field is not None:
            names = [p for p in partitions if p != NO_PARTITION]
            stages.append({"$match": {self.field: {"$in": names}}})
        stages += [{"$sample": {"size": size}}, {"$project": {"_id": 1}}]
        with self.errors():
            picked = [d["_id"] for d in self.collection.aggregate(stages)]
        return list(dict.fromkeys(picked))  # a server may return one document twice
