"""A declared migration (one TOML file) on real servers, for every pair: PostgreSQL → PostgreSQL,
PostgreSQL → MongoDB, MongoDB → MongoDB, MongoDB → PostgreSQL (nx-27017, or the real MongoDB of
SHUTTLE_TEST_MONGO_URI). Each pair: a fresh run lands every row the mapping accepts and verifies clean,
a re-run writes nothing, a row deleted at the source disappears from the target, a selection by
partition touches only its partition, and rows that break the mapping are rejects with key and reason."""

from __future__ import annotations

import os
from datetime import datetime

import psycopg
import pymongo
import pytest

from common.migrations.base import Selection
from tests.conftest import create_db, drop_db
from tests.integration.declared_fixtures import (BAD_SCORE_IDS, DEPLOYMENTS, MISSING_SCORE_IDS, ROWS,
                                                 build_mongo_source, build_pg_source, migrate, migration_file,
                                                 open_declared, totals)

ACCEPTED = ROWS - len(BAD_SCORE_IDS) - len(MISSING_SCORE_IDS)
PAIRS = ["pg-pg", "pg-mongo", "mongo-mongo", "mongo-pg"]


class Pair:
    """One source and one target of the pair's kinds, with the file that maps between them."""

    def __init__(self, kinds: str, pg_url: str, mongo_url: str) -> None:
        self.source_kind, self.target_kind = kinds.split("-")
        self.pg_url, self.mongo_url = pg_url, mongo_url
        self.source_url = pg_url if self.source_kind == "pg" else mongo_url
        self.target_url = pg_url if self.target_kind == "pg" else mongo_url
        self.client = pymongo.MongoClient(mongo_url.rsplit("/", 1)[0])
        self.mongo = self.client[mongo_url.rsplit("/", 1)[1]]

    def build(self) -> None:
        if self.source_kind == "pg":
            build_pg_source(self.pg_url)
        else:
            build_mongo_source(self.mongo["archived_predictions"])

    def text(self, **kwargs) -> str:
        source = 'table = "archived_predictions"' if self.source_kind == "pg" else 'collection = "archived_predictions"'
        target = 'table = "predictions"' if self.target_kind == "pg" else 'collection = "predictions"'
        return migration_file(source, target, **kwargs)

    def open(self, text: str | None = None, **flags):
        return open_declared(text or self.text(), self.source_url, self.target_url, **flags)

    def source_key(self, i: int):
        return i if self.source_kind == "pg" else f"p{i:05d}"

    def delete_partition(self, partition: str) -> None:
        if self.source_kind == "pg":
            with psycopg.connect(self.pg_url) as conn:
                conn.execute("DELETE FROM archived_predictions WHERE deployment_id = %s", (partition,))
        else:
            self.mongo["archived_predictions"].delete_many({"deployment_id": partition})

    def delete_source(self, i: int) -> None:
        if self.source_kind == "pg":
            with psycopg.connect(self.pg_url) as conn:
                conn.execute("DELETE FROM archived_predictions WHERE id = %s", (i,))
        else:
            self.mongo["archived_predictions"].delete_one({"_id": self.source_key(i)})

    def target_keys(self) -> set:
        """The prediction ids in the target, as text."""
        if self.target_kind == "pg":
            with psycopg.connect(self.pg_url) as conn:
                return {str(k) for (k,) in conn.execute("SELECT prediction_id FROM predictions")}
        return {str(d["prediction_id"]) for d in self.mongo["predictions"].find({}, {"prediction_id": 1})}

    def target_row(self, i: int) -> dict:
        key = self.source_key(i)
        if self.target_kind == "pg":
            with psycopg.connect(self.pg_url) as conn:
                cur = conn.execute("SELECT * FROM predictions WHERE prediction_id = %s", (key if isinstance(key, int)
                                                                                         else key,))
                return dict(zip([d.name for d in cur.description], cur.fetchone()))
        return self.mongo["predictions"].find_one({"prediction_id": key})

    def index_columns(self) -> list[tuple[str, ...]]:
        """The target's indexes, each as its columns in order."""
        if self.target_kind == "pg":
            with psycopg.connect(self.pg_url) as conn:
                return [tuple(c) for (c,) in conn.execute(
                    "SELECT array_agg(a.attname::text ORDER BY k.ord) FROM pg_index i CROSS JOIN LATERAL"
                    " unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) JOIN pg_attribute a ON a.attrelid = i.indrelid"
                    " AND a.attnum = k.attnum WHERE i.indrelid = 'predictions'::regclass GROUP BY i.indexrelid")]
        return [tuple(k for k, _ in i["key"]) for i in self.mongo["predictions"].index_information().values()]

    def close(self) -> None:
        self.client.close()


@pytest.fixture(params=PAIRS)
def pair(request, mongo_uri):
    pg_name = f"shuttle_decl_{os.getpid()}_{request.param.replace('-', '_')}"
    mongo_name = f"shuttle_decl_{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**8}"
    pg_url = create_db(pg_name)
    with pymongo.MongoClient(mongo_uri) as client:
        client.drop_database(mongo_name)
    the_pair = Pair(request.param, pg_url, f"{mongo_uri}/{mongo_name}")
    the_pair.build()
    yield the_pair
    the_pair.close()
    with pymongo.MongoClient(mongo_uri) as client:
        client.drop_database(mongo_name)
    drop_db(pg_name)


def _key_text(pair: Pair, i: int) -> str:
    return f'["{pair.source_key(i)}"]'


def test_fresh_run_rerun_delete_and_rejects(pair):
    migration = pair.open()
    outcomes, checks = migrate(migration)
    migration.close()
    assert [c for c in checks if not c.ok] == []
    assert {c.partition for c in checks if c.partition} == set(DEPLOYMENTS)
    assert totals(outcomes).inserted == ACCEPTED
    rejects = {r.key: r.reason for o in outcomes for r in o.rejects}
    assert set(rejects) == {_key_text(pair, i) for i in (*BAD_SCORE_IDS, *MISSING_SCORE_IDS)}
    assert "'n/a' is not a number" in rejects[_key_text(pair, BAD_SCORE_IDS[0])]
    assert "path $.score in 'payload' is missing" in rejects[_key_text(pair, MISSING_SCORE_IDS[0])]
    assert len(pair.target_keys()) == ACCEPTED

    stored = pair.target_row(5)
    assert stored["email"] == "user5@example.com"
    assert stored["region"] == "eu"
    assert abs(stored["score"] - round(5 / ROWS, 4)) < 1e-9
    assert stored["created_at"].replace(tzinfo=None).isoformat() == "2024-03-01T00:05:00"
    assert "debug_blob" not in stored and "debug_blob" not in (stored.get("extra") or {})

    again = pair.open()
    outcomes, checks = migrate(again)
    again.close()
    assert [c for c in checks if not c.ok] == []
    assert totals(outcomes).written == 0
    assert totals(outcomes).unchanged == ACCEPTED

    pair.delete_source(10)
    after = pair.open()
    outcomes, checks = migrate(after)
    after.close()
    assert [c for c in checks if not c.ok] == []
    assert totals(outcomes).deleted == 1
    assert totals(outcomes).inserted == totals(outcomes).updated == 0
    assert str(pair.source_key(10)) not in pair.target_keys()
    assert len(pair.target_keys()) == ACCEPTED - 1


def test_selection_by_partition_touches_only_that_partition(pair):
    migration = pair.open()
    outcomes, checks = migrate(migration, Selection(partitions=("dep-b",)))
    migration.close()
    assert [c.partition for c in checks if c.entity == "predictions"] == ["dep-b"]
    assert all(c.ok for c in checks)
    expected = {str(pair.source_key(i)) for i in range(1, ROWS + 1)
                if DEPLOYMENTS[i % 3] == "dep-b" and i not in (*BAD_SCORE_IDS, *MISSING_SCORE_IDS)}
    assert pair.target_keys() == expected
    assert totals(outcomes).inserted == len(expected)

    pair.delete_source(11)  # in dep-c: a run of dep-b neither reads nor deletes there
    again = pair.open()
    outcomes, _ = migrate(again, Selection(partitions=("dep-b",)))
    again.close()
    assert totals(outcomes).written == 0
    assert pair.target_keys() == expected


def test_an_unknown_partition_is_refused(pair):
    migration = pair.open()
    with pytest.raises(Exception, match="unknown partitions of predictions-compact: dep-zzz"):
        migrate(migration, Selection(partitions=("dep-zzz",)))
    migration.close()


def test_an_emptied_partition_is_emptied_in_the_target_and_the_key_is_unique(pair):
    """Also: from MongoDB, `_id` renamed without a cast lands as text; into MongoDB, the key gets a unique index;
    copy_indexes copies the source's indexes whose columns reach the target unchanged."""
    text = pair.text(key_cast=False).replace("create = true", "create = true\ncopy_indexes = true")
    migration = pair.open(text)
    outcomes, checks = migrate(migration)
    migration.close()
    assert [c for c in checks if not c.ok] == []
    if pair.target_kind == "mongo":
        indexes = [[k for k, _ in i["key"]] for i in pair.mongo["predictions"].index_information().values()
                   if i.get("unique")]
        assert ["prediction_id"] in indexes
    if pair.source_kind == "pg":
        assert ("deployment_id", "prediction_id") in pair.index_columns()
        assert not any("created_at" in i and len(i) == 1 for i in pair.index_columns())
    pair.delete_partition("dep-c")
    again = pair.open(text)
    outcomes, checks = migrate(again)
    again.close()
    assert [c for c in checks if not c.ok] == []
    assert "dep-c" in {c.partition for c in checks}  # planned from the target alone
    in_dep_c = {i for i in range(1, ROWS + 1) if DEPLOYMENTS[i % 3] == "dep-c"
                and i not in (*BAD_SCORE_IDS, *MISSING_SCORE_IDS)}
    assert totals(outcomes).deleted == len(in_dep_c)
    assert pair.target_keys().isdisjoint({str(pair.source_key(i)) for i in in_dep_c})


def test_a_query_source_and_an_existing_target(fresh_db):
    """PostgreSQL → PostgreSQL from a SELECT into a table that exists: its columns and key are checked first."""
    build_pg_source(fresh_db)
    text = migration_file('query = "SELECT id, deployment_id, ts_ms, email, payload FROM archived_predictions'
                          ' WHERE id <= 100"', 'table = "predictions"').replace("create = true", "create = false")
    migration = open_declared(text, fresh_db, fresh_db)
    with pytest.raises(Exception, match="target table predictions does not exist .* create = false"):
        migrate(migration)
    with psycopg.connect(fresh_db) as conn:
        conn.execute("CREATE TABLE predictions (prediction_id bigint, deployment_id text, score float8, label jsonb,"
                     " created_at timestamptz, region text, email text)")
    with pytest.raises(Exception, match=r"has no primary key or unique index on \(prediction_id\)"):
        migrate(migration)
    with psycopg.connect(fresh_db) as conn:
        conn.execute("ALTER TABLE predictions ADD PRIMARY KEY (prediction_id)")
    outcomes, checks = migrate(migration)
    migration.close()
    assert [c for c in checks if not c.ok] == []
    assert totals(outcomes).inserted == 100 - len([i for i in (*BAD_SCORE_IDS, *MISSING_SCORE_IDS) if i <= 100])
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT email, region FROM predictions WHERE prediction_id = 9").fetchone() == (
            "user9@example.com", "eu")


COPY_ONLY = """
[migration]
name = "predictions-copy"
[source]
table = "archived_predictions"
key = ["id"]
partition = "deployment_id"
[target]
table = "copy.predictions"
[columns]
prediction_id = { from = "id" }
source = { constant = "archive" }
ts = { from = "ts_ms", cast = "float" }
[options]
drop = ["debug_blob"]
"""


def test_renames_and_constants_only_pass_the_copy_data_through(fresh_db):
    """PostgreSQL → PostgreSQL with nothing that can fail (renames, constants, a widening cast): one SELECT's
    binary COPY data goes through undecoded, with the same outcome as the row-by-row path (fresh, re-run, a
    deleted row, a selected partition)."""
    build_pg_source(fresh_db)
    migration = open_declared(COPY_ONLY, fresh_db, fresh_db)
    outcomes, checks = migrate(migration)
    assert migration._copy_select is not False, "renames and constants need no Python"
    migration.close()
    assert [c for c in checks if not c.ok] == [] and totals(outcomes).inserted == ROWS
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT count(*) FROM copy.predictions WHERE source = 'archive'").fetchone() == (ROWS,)
        source = conn.execute("SELECT md5(string_agg(row(id, deployment_id, ts_ms, email, payload, note)::text, ','"
                              " ORDER BY id)) FROM archived_predictions").fetchone()
        target = conn.execute("SELECT md5(string_agg(row(prediction_id, deployment_id, ts::int8, email, payload, note)"
                              "::text, ',' ORDER BY prediction_id)) FROM copy.predictions").fetchone()
        assert source == target
        conn.execute("DELETE FROM archived_predictions WHERE id = 30")
        conn.execute("UPDATE archived_predictions SET note = 'changed' WHERE id = 31")
    again = open_declared(COPY_ONLY, fresh_db, fresh_db)
    outcomes, checks = migrate(again)
    again.close()
    assert [c for c in checks if not c.ok] == []
    assert (totals(outcomes).deleted, totals(outcomes).updated, totals(outcomes).inserted) == (1, 1, 0)
    assert totals(outcomes).unchanged == ROWS - 2
    selected = open_declared(COPY_ONLY, fresh_db, fresh_db)
    outcomes, checks = migrate(selected, Selection(partitions=("dep-a",)))
    selected.close()
    assert [c.partition for c in checks if c.entity == "predictions"] == ["dep-a"]
    assert totals(outcomes).written == 0 and totals(outcomes).unchanged == ROWS // 3 - 1  # id 30 is gone


def test_without_a_partition_column_the_source_is_one_partition(pair):
    text = pair.text().replace('partition = "deployment_id"\n', "")
    if pair.source_kind == "mongo" and pair.target_kind == "pg":
        # Not a partition any more, deployment_id goes into the JSONB rest column: an index cannot name it.
        with pytest.raises(Exception, match="indexes: 'deployment_id' is not a column of the target"):
            migrate(pair.open(text))
        text = text.replace('indexes = [["deployment_id", "created_at"]]', "")
    migration = pair.open(text)
    outcomes, checks = migrate(migration, chunk_rows=80)
    migration.close()
    assert [(c.partition, c.ok) for c in checks if c.entity == "predictions"] == [("(all)", True)]
    assert len(outcomes) == 4  # 300 rows cut every 80th by the chunking column
    assert totals(outcomes).inserted == ACCEPTED
    pair.delete_source(250)
    again = pair.open(text)
    outcomes, checks = migrate(again, chunk_rows=80)
    again.close()
    assert all(c.ok for c in checks)
    assert (totals(outcomes).deleted, totals(outcomes).written) == (1, 1)
    with pytest.raises(Exception, match="selects by partition only"):
        migrate(pair.open(text), Selection(since=datetime(2024, 1, 1)))


def test_keep_deleted_keeps_what_the_source_lost_and_verify_says_so(pair):
    first = pair.open()
    migrate(first)
    first.close()
    pair.delete_source(20)
    kept = pair.open(keep_deleted=True)
    outcomes, checks = migrate(kept)
    kept.close()
    assert totals(outcomes).written == 0
    assert str(pair.source_key(20)) in pair.target_keys()
    bad = [c for c in checks if not c.ok]
    assert len(bad) == 1 and bad[0].detail == "the target holds 1 rows more than the source"


def test_the_sampled_comparison_finds_a_target_edited_by_hand(pair):
    migration = pair.open()
    _, checks = migrate(migration)
    assert [c.ok for c in checks if c.entity == "predictions (sample)"] == [True]
    if pair.target_kind == "pg":
        with psycopg.connect(pair.pg_url) as conn:
            conn.execute("UPDATE predictions SET region = 'us'")
    else:
        pair.mongo["predictions"].update_many({}, {"$set": {"region": "us"}})
    checks = migration.verify(Selection(), list(DEPLOYMENTS), {})
    migration.close()
    sample = [c for c in checks if c.entity == "predictions (sample)"]
    assert len(sample) == 1 and not sample[0].ok and sample[0].source_rows == 20
    assert "region is 'us', expected 'eu'" in sample[0].detail


def test_a_chunk_of_several_batches_into_mongodb(fresh_db, mongo_uri, mongo_db_name):
    """Batches after the first are written while the next is read (write-behind): all land, counted once."""
    rows = 2_500
    build_pg_source(fresh_db, rows=rows)
    text = migration_file('table = "archived_predictions"', 'collection = "predictions"').replace(
        'partition = "deployment_id"\n', "")
    migration = open_declared(text, fresh_db, f"{mongo_uri}/{mongo_db_name}")
    outcomes, checks = migrate(migration, chunk_rows=10_000)
    migration.close()
    assert len(outcomes) == 1  # one chunk of three batches of (at most) 1,000
    assert [c for c in checks if not c.ok] == []
    rejected = sum(len(o.rejects) for o in outcomes)
    assert rejected == len(BAD_SCORE_IDS) + len(MISSING_SCORE_IDS)
    assert totals(outcomes).inserted == rows - rejected
    with pymongo.MongoClient(mongo_uri) as client:
        assert client[mongo_db_name]["predictions"].count_documents({}) == rows - rejected
