"""The MongoDB sink's contract, run against mongomock (in-process) and a server (nx-27017, or the real
MongoDB of SHUTTLE_TEST_MONGO_URI): idempotent `_id` upserts with exact counts, int64 and sub-documents
kept, per-document rejects with the rest written, idempotent indexes, transient errors, masked URLs."""

from __future__ import annotations

import pytest
from bson.int64 import Int64

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
        assert first.counts.as_dict() == {"inserted": 2_500, "updated": 0, "unchanged": 0} and not first.rejects
        again = sink.upsert_documents("metrics", docs)
        assert again.counts.as_dict() == {"inserted": 0, "updated": 0, "unchanged": 2_500}
        changed = [dict(docs[0], step=-1), {"_id": 99_999, "step": 0}]
        assert sink.upsert_documents("metrics", changed).counts.as_dict() == \
            {"inserted": 1, "updated": 1, "unchanged": 0}
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
        result = sink.upsert_documents("model_versions", [{"_id": "m/1b", "name": "m", "version": 1}])
        assert len(result.rejects) == 1 and "refused" in result.rejects[0].reason

    def test_table_shaped_upsert_keys_documents_on_the_table_key(self, sink):
        table = TableSpec("kv", (Column("k", "text"), Column("n", "int8")), key=("k",))
        sink.ensure_table(table)
        assert sink.upsert(table, [("a", 1), ("b", 2)]).as_dict() == {"inserted": 2, "updated": 0, "unchanged": 0}
        assert sink.upsert(table, [("a", 1), ("b", 3)]).as_dict() == {"inserted": 0, "updated": 1, "unchanged": 1}
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


def test_unreachable_server_is_named_with_the_password_masked():
    sink = Sink("mongodb://admin:s3cret@127.0.0.1:1/db", timeout_ms=300)
    with pytest.raises(ServiceUnavailable) as caught:
        sink.check_reachable()
    assert "mongodb://admin:***@127.0.0.1:1/db" in str(caught.value) and "s3cret" not in str(caught.value)
    assert mask("target mongodb+srv://u:pw@cluster.example/mlflow") == "target mongodb+srv://u:***@cluster.example/mlflow"
    with pytest.raises(TransientError):
        sink.upsert_documents("t", [{"_id": 1}])
