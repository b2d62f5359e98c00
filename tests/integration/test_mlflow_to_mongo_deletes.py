"""`mlflow-to-mongo` re-runs after rows were deleted from the source (no Celery), into nx-27017 (or the
MongoDB of SHUTTLE_TEST_MONGO_URI): a chunk deletes the documents of its partition and key range whose
row is gone, a partition with no rows left is emptied, and --keep-deleted keeps them."""

from __future__ import annotations

import psycopg
import pymongo
import pytest

from common.migrations.base import Selection
from common.migrations.mlflow_to_mongo import MlflowToMongo

CHUNK_ROWS = 150  # several key ranges per experiment's metrics
SCHEMA = """
CREATE TABLE experiments (experiment_id int PRIMARY KEY, name text);
CREATE TABLE runs (run_uuid varchar(32) PRIMARY KEY, experiment_id int REFERENCES experiments);
CREATE TABLE metrics (key varchar(250), value float8, timestamp bigint, run_uuid varchar(32) REFERENCES runs,
                      step bigint, is_nan boolean, PRIMARY KEY (key, timestamp, step, run_uuid, value, is_nan));
INSERT INTO experiments SELECT e, 'exp ' || e FROM generate_series(0, 3) e;
INSERT INTO runs SELECT md5('run' || r), r % 3 + 1 FROM generate_series(1, 12) r;
INSERT INTO metrics SELECT k, s * 0.5, 1700000000000 + s, md5('run' || r), s, false
  FROM generate_series(1, 12) r, unnest(ARRAY['loss', 'acc', 'lr']) k, generate_series(1, 20) s;
"""


def migrate(url: str, target: str, **flags):
    migration = MlflowToMongo(url, target, MlflowToMongo.plan_options(**flags))
    try:
        counts = migration.count_partitions(Selection())
        chunks = list(migration.plan_chunks(Selection(), CHUNK_ROWS))
        migration.prepare_target()
        outcomes = [migration.run_chunk(spec, lambda rows: None) for spec in chunks]
        migration.finish_target()
        failed = [c for c in migration.verify(Selection(), sorted({p.partition for p in counts} | {"1", "2", "3"}), {})
                  if not c.ok]
        return chunks, outcomes, failed
    finally:
        migration.close()


def deleted(outcomes) -> dict[str, int]:
    found: dict[str, int] = {}
    for outcome in outcomes:
        for table, counts in outcome.writes.items():
            if counts.deleted:
                found[table] = found.get(table, 0) + counts.deleted
    return found


@pytest.fixture
def source(fresh_db, mongo_uri, mongo_db_name):
    with psycopg.connect(fresh_db) as conn:
        conn.execute(SCHEMA)
    target = f"{mongo_uri}/{mongo_db_name}"
    chunks, _, failed = migrate(fresh_db, target)
    assert not failed and len([c for c in chunks if c.entity == "metrics" and c.partition == "1"]) > 1
    yield fresh_db, target, pymongo.MongoClient(mongo_uri)[mongo_db_name]


def test_documents_whose_rows_are_gone_are_deleted_unless_kept(source):
    url, target, db = source
    run = psycopg.connect(url).execute("SELECT md5('run1')").fetchone()[0]
    with psycopg.connect(url) as conn:
        conn.execute("DELETE FROM metrics WHERE key = 'acc' AND step BETWEEN 5 AND 9")  # inside ranges, every run
        conn.execute("DELETE FROM metrics WHERE run_uuid = %s", (run,))
        conn.execute("DELETE FROM runs WHERE run_uuid = %s", (run,))
        conn.execute("DELETE FROM metrics WHERE run_uuid IN (SELECT run_uuid FROM runs WHERE experiment_id = 3)")
        metrics = conn.execute("SELECT count(*) FROM metrics").fetchone()[0]
    gone = db["metrics"].count_documents({}) - metrics

    _, kept, failed = migrate(url, target, keep_deleted=True)
    assert deleted(kept) == {} and db["metrics"].count_documents({}) == metrics + gone
    assert [c.detail for c in failed if c.entity == "metrics" and c.partition == "1"] == \
        [f"{sum(1 for d in db['metrics'].find({'_partition': '1'}, {'_id': 1})) - _rows(url, '1')}"
         " extra documents, not in the source"]

    chunks, outcomes, failed = migrate(url, target)
    assert not failed, failed
    assert deleted(outcomes) == {"metrics": gone, "runs": 1}
    assert db["metrics"].count_documents({}) == metrics and db["runs"].count_documents({"run_uuid": run}) == 0
    assert db["metrics"].count_documents({"_partition": "3"}) == 0
    assert [(c.lo, c.hi) for c in chunks if c.entity == "metrics" and c.partition == "3"] == [("", "")]
    _, again, failed = migrate(url, target)
    assert deleted(again) == {} and sum(o.totals().written for o in again) == 0 and not failed


def _rows(url: str, experiment: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM metrics JOIN runs USING (run_uuid) WHERE experiment_id = %s",
                            (int(experiment),)).fetchone()[0]
