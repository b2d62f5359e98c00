"""`userdata-split` and its rollback in-process, against mongomock and a server (nx-27017, or the real MongoDB of
SHUTTLE_TEST_MONGO_URI): chunks cut from the data, a clean verification, rejects with key and reason, re-runs
that write nothing, deletes that follow the source, selection by user, and a rollback that gives back every
original document, every field and every type."""

from __future__ import annotations

from typing import Any

import pymongo
import pytest

from common.connectors.mongo_source import NO_PARTITION, decode_id, encode_id
from common.migrations.base import Migration, Selection
from common.migrations.userdata_fixtures import NO_USER, build_source
from common.migrations.userdata_mapping import differences
from common.migrations.userdata_rollback import UserdataRollback
from common.migrations.userdata_split import CONFIGS, METADATA, UserdataSplit
from common.model import ChunkOutcome
from tests.mongo_server import mongomock_client

DOCS = 1_500
CHUNK_ROWS = 120


class Backend:
    """Where source and target live: one database each, on one server (or one mongomock client)."""

    def __init__(self, client: pymongo.MongoClient, url: str, prefix: str, in_process: bool, docs: int) -> None:
        self.client, self.url, self.prefix, self.in_process, self.docs = client, url, prefix, in_process, docs

    def db(self, name: str):
        return self.client[f"{self.prefix}{name}"]

    def open(self, cls: type[Migration], source: str, target: str, **flags: Any) -> Migration:
        migration = cls(f"{self.url}/{self.prefix}{source}", f"{self.url}/{self.prefix}{target}",
                        cls.plan_options(**flags))
        if self.in_process:  # mongomock lives in this process: hand its client to both ends
            migration.source._client = self.client
            migration.sink._client = self.client
        return migration


def migrate(migration: Migration, selection: Selection = Selection(), chunk_rows: int = CHUNK_ROWS,
            rejected: dict[str, int] | None = None) -> tuple[list[ChunkOutcome], list]:
    """What a run does, in this process: count, cut, prepare, every chunk, finish, verify."""
    counts = migration.count_partitions(selection)
    chunks = list(migration.plan_chunks(selection, chunk_rows))
    migration.prepare_target()
    outcomes = [migration.run_chunk(spec, lambda rows: None) for spec in chunks]
    migration.finish_target()
    per_partition: dict[str, int] = {}
    for spec, outcome in zip(chunks, outcomes):
        per_partition[spec.partition] = per_partition.get(spec.partition, 0) + len(outcome.rejects)
    checks = migration.verify(selection, sorted({c.partition for c in counts}), per_partition)
    return outcomes, checks


def totals(outcomes: list[ChunkOutcome], collection: str) -> dict[str, int]:
    out = {"inserted": 0, "updated": 0, "unchanged": 0, "deleted": 0}
    for outcome in outcomes:
        for k, v in outcome.writes.get(collection, None).as_dict().items() if collection in outcome.writes else ():
            out[k] += v
    return out


class SplitContract:
    """Mixed into one class per backend."""

    @pytest.fixture
    def source(self, backend):
        return build_source(backend.db("src"), backend.docs, users=8, bad=True)

    def test_split_is_clean_exact_and_checked(self, backend, source):
        migration = backend.open(UserdataSplit, "src", "dst", sample=40)
        outcomes, checks = migrate(migration)
        assert [c for c in checks if not c.ok] == []
        assert {c.entity for c in checks} >= {METADATA, CONFIGS, "history = configs applied", "user_data (sample)",
                                              f"{METADATA} (indexes)", f"{CONFIGS} (indexes)"}
        rejects = {r.key: r.reason for o in outcomes for r in o.rejects}
        assert set(rejects) == set(source.rejected)
        for key, reason in source.rejected.items():
            assert reason in rejects[key]
        good = source.total - len(source.rejected)
        assert sum(o.rows_read for o in outcomes) == source.total
        assert totals(outcomes, METADATA)["inserted"] == totals(outcomes, CONFIGS)["inserted"] == good
        dst = backend.db("dst")
        assert dst[METADATA].count_documents({}) == dst[CONFIGS].count_documents({}) == good
        history = next(c for c in checks if c.entity == "history = configs applied")
        assert history.target_rows == source.with_history
        for doc in backend.db("src")["user_data"].find({"user_id": "user_0003"}):
            stored = dst[METADATA].find_one({"_id": doc["_id"]})
            assert stored["dataset_id"] == str(doc["_id"]) and stored["user_id"] == "user_0003"
            config = dst[CONFIGS].find_one({"_id": f"{doc['_id']}_config"})
            assert config["config_id"] == config["_id"] and config["dataset_id"] == str(doc["_id"])
            assert config["total_transformations"] == len(doc.get("transformation_history") or [])
        # the biggest user is cut into several chunks at its own _ids; the others fit one chunk
        chunks = list(migration.plan_chunks(Selection(), CHUNK_ROWS))
        per_user = {u: sum(1 for c in chunks if c.partition == u) for u in source.per_user}
        assert per_user["user_0000"] == -(-source.per_user["user_0000"] // CHUNK_ROWS) > 1
        assert all(n == 1 for u, n in per_user.items() if source.per_user[u] <= CHUNK_ROWS)
        assert all(c.est_rows <= CHUNK_ROWS for c in chunks)
        assert per_user[NO_USER] == 1 and NO_USER == NO_PARTITION
        migration.close()

    def test_rerun_writes_nothing_and_deletes_follow_the_source(self, backend, source):
        migrate(backend.open(UserdataSplit, "src", "dst"))
        again, checks = migrate(backend.open(UserdataSplit, "src", "dst"))
        assert all(c.ok for c in checks)
        for collection in (METADATA, CONFIGS):
            counts = totals(again, collection)
            assert counts["inserted"] == counts["updated"] == counts["deleted"] == 0
            assert counts["unchanged"] == source.total - len(source.rejected)
        src = backend.db("src")["user_data"]
        gone = [d["_id"] for d in src.find({"user_id": "user_0000"}, {"_id": 1}).limit(3)]
        src.delete_many({"_id": {"$in": gone}})
        changed = src.find_one({"user_id": "user_0001"})
        src.replace_one({"_id": changed["_id"]}, {**changed, "filename": "renamed.csv"})
        third, checks = migrate(backend.open(UserdataSplit, "src", "dst"))
        assert all(c.ok for c in checks), [c for c in checks if not c.ok]
        assert totals(third, METADATA)["deleted"] == totals(third, CONFIGS)["deleted"] == 3
        assert totals(third, METADATA)["updated"] == 1 and totals(third, CONFIGS)["updated"] == 0
        dst = backend.db("dst")
        assert dst[METADATA].count_documents({"_id": {"$in": gone}}) == 0
        assert not list(dst[CONFIGS].find({"_id": {"$in": [f"{i}_config" for i in gone]}}))
        # a user whose every document is gone: the plan still gives them a chunk, which empties their range
        src.delete_many({"user_id": "user_0007"})
        fourth, checks = migrate(backend.open(UserdataSplit, "src", "dst"))
        assert all(c.ok for c in checks)
        assert dst[METADATA].count_documents({"user_id": "user_0007"}) == 0
        assert dst[CONFIGS].count_documents({"user_id": "user_0007"}) == 0
        assert totals(fourth, METADATA)["deleted"] == source.per_user["user_0007"]

    def test_keep_deleted_leaves_the_target_alone(self, backend, source):
        migrate(backend.open(UserdataSplit, "src", "dst"))
        src = backend.db("src")["user_data"]
        gone = src.find_one({"user_id": "user_0002"})["_id"]
        src.delete_one({"_id": gone})
        outcomes, _ = migrate(backend.open(UserdataSplit, "src", "dst", options={"keep_deleted": "true"}))
        assert totals(outcomes, METADATA)["deleted"] == 0
        assert len(list(backend.db("dst")[METADATA].find({"_id": gone}))) == 1

    def test_selection_by_user_touches_only_those_users(self, backend, source):
        users = ("user_0002", "user_0005")
        outcomes, checks = migrate(backend.open(UserdataSplit, "src", "sel"), Selection(partitions=users))
        assert all(c.ok for c in checks)
        dst = backend.db("sel")
        for collection in (METADATA, CONFIGS):
            assert {d["user_id"] for d in dst[collection].find({}, {"user_id": 1})} == set(users)
        assert dst[METADATA].count_documents({}) == sum(source.per_user[u] for u in users)
        with pytest.raises(Exception, match="unknown user ids: nobody"):
            backend.open(UserdataSplit, "src", "sel").count_partitions(Selection(partitions=("nobody",)))

    def test_rollback_rebuilds_every_original_field_and_type(self, backend, source):
        migrate(backend.open(UserdataSplit, "src", "dst"))
        rollback = backend.open(UserdataRollback, "dst", "src", into="restored", verify=True)
        outcomes, checks = migrate(rollback)
        assert all(c.ok for c in checks), [c for c in checks if not c.ok]
        assert not [r for o in outcomes for r in o.rejects]
        src = backend.db("src")
        restored = {d["_id"]: d for d in src["restored"].find()}
        assert len(restored) == source.total - len(source.rejected)
        for original in src["user_data"].find():
            if str(original["_id"]) in source.rejected:
                assert original["_id"] not in restored
                continue
            assert differences(original, restored[original["_id"]]) == [], original["_id"]
        # into user_data itself, over the originals: everything identical, nothing written
        over, checks = migrate(backend.open(UserdataRollback, "dst", "src", verify=True))
        assert all(c.ok for c in checks)
        assert totals(over, "user_data") == {"inserted": 0, "updated": 0, "unchanged": len(restored), "deleted": 0}
        # a tampered dataset fails the verification and is not written over its original
        dst = backend.db("dst")
        victim = dst[METADATA].find_one({"user_id": "user_0001"})
        dst[METADATA].update_one({"_id": victim["_id"]}, {"$set": {"num_columns": "13"}})
        tampered, checks = migrate(backend.open(UserdataRollback, "dst", "src", verify=True))
        bad = [c for c in checks if not c.ok]
        assert bad and any("differ" in c.detail for c in bad)
        [reject] = [r for o in tampered for r in o.rejects]
        assert reject.key == str(victim["_id"]) and "num_columns" in reject.reason
        assert src["user_data"].find_one({"_id": victim["_id"]}) == src["restored"].find_one({"_id": victim["_id"]})

    def test_boundaries_round_trip(self, backend, source):
        oid = backend.db("src")["user_data"].find_one({})["_id"]
        for value in (oid, "abc:def", 42):
            assert decode_id(encode_id(value)) == value and type(decode_id(encode_id(value))) is type(value)


class TestMongomock(SplitContract):
    @pytest.fixture
    def backend(self):
        client = mongomock_client()
        return Backend(client, "mongodb://mongomock.invalid:27017", "ud_", in_process=True,
                       docs=600)  # mongomock slows down beyond a few thousand documents


class TestServer(SplitContract):
    @pytest.fixture
    def backend(self, mongo_uri, mongo_db_name):
        client = pymongo.MongoClient(mongo_uri)
        prefix = f"{mongo_db_name}_"
        yield Backend(client, mongo_uri, prefix, in_process=False, docs=DOCS)
        for name in client.list_database_names():
            if name.startswith(prefix):
                client.drop_database(name)
        client.close()
