"""The MongoDB sink's contract, run against mongomock (in-process) and a server (nx-27017, or the real
MongoDB of SHUTTLE_TEST_MONGO_URI): idempotent `_id` upserts with exact counts, int64 and sub-documents
kept, per-document rejects with the rest written, inserts for absent documents and replaces for changed
ones (insert first on a fresh load, read first on a re-run), duplicate-key collisions (a concurrent
writer) retried as replaces with exact counts, idempotent indexes, refused indexes reported, transient
errors, masked URLs."""

from __future__ import annotations

import threading

import pytest
from bson.int64 import Int64
from pymongo import InsertOne, ReplaceOne

from common.connectors import open_sink
from common.connectors.base import Column, TableSpec
from common.connectors.mongo import MIN_BATCH, Index, Sink
from common.errors import ServiceUnavailable, TransientError
from common.urls import mask
from tests.mongo_server import mongomock_client


class SinkContract:
    """Mixed into one class per backend; `sink` is a fresh database on that backend."""

    def test_upsert_counts_inserted_updated_unchanged(self, sink):
        docs = [{"_id": i, "run_uuid": f"r{i % 7}", "ts": Int64(1_700_000_000_000 + i), "step": i,
                 "tags": {"a": i}} for i in range(2_500)]
        first = sink.upsert_documents("metrics", docs)
        assert first.counts.as_dict() == {"inserted": 2_500, "updated": 0, "unchanged": 0, "deleted": 0} and not first.rejects
        again = sink.upsert_documents("metrics", docs)
        assert again.counts.as_dict() == {"inserted": 0, "updated": 0, "unchanged": 2_500, "deleted": 0}
        changed = [dict(docs[0], step=-1), {"_id": 99_999, "step": 0}]
        assert sink.upsert_documents("metrics", changed).counts.as_dict() == \
            {"inserted": 1, "updated": 1, "unchanged": 0, "deleted": 0}
        assert sink.count("metrics") == 2_501
        stored = sink.find("metrics", {"_id": 3})[0]
        assert stored == docs[3] and isinstance(stored["ts"], int) and stored["ts"] == 1_700_000_000_003

    def test_composite_ids_and_extreme_floats_round_trip(self, sink):
        docs = [{"_id": '["r1","loss",3]', "value": 1.7976931348623157e308,
                 "is_nan": False},
                {"_id": '["r1","acc",3]', "value": 0.0, "is_nan": True},
                {"_id": "json", "payload": {"nested": [1, {"x": None}], "text": "ü"}}]
        assert sink.upsert_documents("t", docs).counts.inserted == 3
        for doc in docs:
            assert sink.find("t", {"_id": doc["_id"]}) == [doc]
        assert sink.upsert_documents("t", docs).counts.unchanged == 3

    def test_unstorable_documents_are_rejects_and_the_rest_is_written(self, sink):
        docs = [{"_id": i, "v": i} for i in range(10)]
        docs[2] = {"_id": 2, "bad.key": 1}
        docs[5] = {"_id": 5, "sub": {"$where": 1}}
        docs[7] = {"_id": 7, "blob": "x" * (17 * 1024 * 1024)}
        result = sink.upsert_documents("t", docs, entity="runs")
        assert sorted(r.key for r in result.rejects) == ["2", "5", "7"]
        reasons = {r.key: r.reason for r in result.rejects}
        assert "invalid key name 'bad.key'" in reasons["2"] and "'sub.$where'" in reasons["5"]
        assert "over MongoDB's 16 MB limit" in reasons["7"]
        assert all(r.entity == "runs" for r in result.rejects)
        assert result.counts.inserted == 7 and sink.count("t") == 7

    def test_indexes_are_created_once_whatever_the_calls(self, sink):
        indexes = [Index((("name", 1), ("version", 1)), unique=True), Index((("current_stage", 1),))]
        sink.ensure_indexes("model_versions", indexes)
        sink.ensure_indexes("model_versions", indexes)
        keys = sorted(tuple(spec["key"]) for spec in sink.db["model_versions"].index_information().values())
        assert keys == sorted([(("_id", 1),), (("current_stage", 1),), (("name", 1), ("version", 1))])
        sink.upsert_documents("model_versions", [{"_id": "m/1", "name": "m", "version": 1}])
        result = sink.upsert_documents("model_versions", [{"_id": "m/1b", "name": "m", "version": 1}],
                                       key=("name", "version"))
        assert len(result.rejects) == 1 and "refused" in result.rejects[0].reason
        assert result.rejects[0].key == '["m", "1"]'  # the key's values, whatever `_id` is made of
        assert result.counts.as_dict() == {"inserted": 0, "updated": 0, "unchanged": 0, "deleted": 0}
        assert sink.count("model_versions") == 1

    def test_a_fresh_load_inserts_without_reading_and_a_rerun_reads_first(self, sink, monkeypatch):
        sent: list[list[type]] = []
        reads: list[int] = []
        bulk, existing = sink._bulk, sink._existing

        def spy_bulk(target, requests):
            sent.append([type(r) for r in requests])
            return bulk(target, requests)

        def spy_read(target, documents):
            reads.append(len(documents))
            return existing(target, documents)

        monkeypatch.setattr(sink, "_bulk", spy_bulk)
        monkeypatch.setattr(sink, "_existing", spy_read)
        docs = [{"_id": i, "v": i} for i in range(2_000)]
        assert sink.upsert_documents("t", docs[:1_500]).counts.as_dict() == \
            {"inserted": 1_500, "updated": 0, "unchanged": 0, "deleted": 0}
        assert [set(batch) for batch in sent] == [{InsertOne}, {InsertOne}] and reads == []
        sent.clear()
        # A re-run: the first batch's inserts collide, so it reads them back (identical: unchanged) ...
        again = sink.upsert_documents("t", [dict(docs[0], v=-1), *docs[1:1_000]])
        assert again.counts.as_dict() == {"inserted": 0, "updated": 1, "unchanged": 999, "deleted": 0}
        assert sent == [[InsertOne] * 1_000, [ReplaceOne]] and reads == [1_000]
        sent.clear()
        reads.clear()
        # ... and the next batch reads first: only the absent are inserted, only the changed replaced.
        result = sink.upsert_documents("t", [dict(docs[1], v=-1), docs[2], docs[1_999]])
        assert reads == [3] and sent == [[InsertOne, ReplaceOne]]
        assert result.counts.as_dict() == {"inserted": 1, "updated": 1, "unchanged": 1, "deleted": 0}
        assert sink.find("t", {"_id": 0}) == [{"_id": 0, "v": -1}] and sink.count("t") == 1_501

    def test_a_document_written_between_the_read_and_the_write_is_replaced_not_refused(self, sink, monkeypatch):
        """Another writer stores three of the batch's documents after the sink read: their inserts hit
        duplicate keys and are redone as replaces; the counts say what this call changed."""
        docs = [{"_id": i, "v": i} for i in range(1_200)]
        sink.upsert_documents("t", docs[1_000:])
        sink.upsert_documents("t", docs[1_000:])  # all collide: the next batch reads first
        existing = sink._existing
        other = sink.db["t"]

        def read_then_someone_writes(target, documents):
            found = existing(target, documents)
            if not hasattr(read_then_someone_writes, "done"):
                read_then_someone_writes.done = True
                other.insert_many([{"_id": 5, "v": 5}, {"_id": 6, "v": "theirs"}, {"_id": 7, "v": "theirs", "x": 1}])
            return found

        monkeypatch.setattr(sink, "_existing", read_then_someone_writes)
        result = sink.upsert_documents("t", docs[:1_000])
        assert not result.rejects
        assert result.counts.as_dict() == {"inserted": 997, "updated": 2, "unchanged": 1, "deleted": 0}
        assert sink.count("t") == 1_200
        assert sink.find("t", {"_id": 6}) == [{"_id": 6, "v": 6}] and sink.find("t", {"_id": 7}) == [{"_id": 7, "v": 7}]

    def test_a_unique_index_over_duplicates_is_refused_and_the_others_built(self, sink):
        sink.upsert_documents("runs", [{"_id": i, "run_uuid": f"r{i // 2}", "x": i} for i in range(4)])
        unique, plain = Index((("run_uuid", 1),), unique=True), Index((("x", 1),))
        refused = sink.ensure_indexes("runs", [unique, plain])
        assert list(refused) == [unique] and refused[unique]
        listed = {(i.keys[0][0], i.unique) for i in sink.indexes("runs")}
        assert ("x", False) in listed and ("run_uuid", True) not in listed

    def test_table_shaped_upsert_keys_documents_on_the_table_key(self, sink):
        table = TableSpec("kv", (Column("k", "text"), Column("n", "int8")), key=("k",))
        sink.ensure_table(table)
        assert sink.upsert(table, [("a", 1), ("b", 2)]).as_dict() == {"inserted": 2, "updated": 0, "unchanged": 0, "deleted": 0}
        assert sink.upsert(table, [("a", 1), ("b", 3)]).as_dict() == {"inserted": 0, "updated": 1, "unchanged": 1, "deleted": 0}
        assert sink.find("kv", {"_id": "b"}) == [{"_id": "b", "k": "b", "n": 3}]

    def test_batches_are_at_least_a_thousand(self, sink):
        assert Sink("mongodb://h/db", batch_size=10).batch_size == MIN_BATCH


class TestMongomock(SinkContract):
    @pytest.fixture
    def sink(self):
        sink = Sink("mongodb://mongomock/shuttle_m2m_mock", client=mongomock_client())
        yield sink
        sink.close()


class TestServer(SinkContract):
    """nx-27017 (or the real server of SHUTTLE_TEST_MONGO_URI)."""

    @pytest.fixture
    def sink(self, mongo_uri, mongo_db_name):
        sink = open_sink(f"{mongo_uri}/{mongo_db_name}")
        yield sink
        sink.close()

    @pytest.fixture
    def twin(self, mongo_uri, mongo_db_name):
        """A second sink with its own connection to the same database, as another worker has."""
        twin = open_sink(f"{mongo_uri}/{mongo_db_name}")
        yield twin
        twin.close()

    def test_two_sinks_writing_the_same_batch_at_once_store_it_once(self, sink, twin, monkeypatch):
        """A redelivered chunk running alongside the first delivery: both send their inserts at the same
        moment; every document is stored once, inserted by one and unchanged for the other. Server only:
        mongomock is not safe for two threads (its duplicate check and insert are not atomic)."""
        docs = [{"_id": i, "run_uuid": f"r{i % 7}", "step": Int64(i)} for i in range(1_000)]
        both_ready = threading.Barrier(2, timeout=30)

        def wait_before_first_write(s):
            bulk, waited = s._bulk, []

            def write(target, requests):
                if not waited:
                    waited.append(True)
                    both_ready.wait()
                return bulk(target, requests)
            return write

        for s in (sink, twin):
            monkeypatch.setattr(s, "_bulk", wait_before_first_write(s))
        results = {}
        threads = [threading.Thread(target=lambda s=s: results.setdefault(id(s), s.upsert_documents("t", docs)))
                   for s in (sink, twin)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(results) == 2 and not any(r.rejects for r in results.values())
        totals = [sum(r.counts.as_dict()[k] for r in results.values()) for k in ("inserted", "updated", "unchanged")]
        assert totals == [1_000, 0, 1_000]
        assert sink.count("t") == 1_000 and sink.find("t", {"_id": 999}) == [docs[999]]


def test_unreachable_server_is_named_with_the_password_masked():
    sink = Sink("mongodb://admin:s3cret@127.0.0.1:1/db", timeout_ms=300)
    with pytest.raises(ServiceUnavailable) as caught:
        sink.check_reachable()
    assert "mongodb://admin:***@127.0.0.1:1/db" in str(caught.value) and "s3cret" not in str(caught.value)
    assert mask("target mongodb+srv://u:pw@cluster.example/mlflow") == "target mongodb+srv://u:***@cluster.example/mlflow"
    with pytest.raises(TransientError):
        sink.upsert_documents("t", [{"_id": 1}])
