"""`mlflow-latest-metrics` chunk by chunk (no Celery) on databases MLflow's own client filled.

What MLflow's client left in latest_metrics while logging is the reference; each test works on a
copy of one such database (CREATE DATABASE … TEMPLATE), built once per module.
"""

from __future__ import annotations

import math
import os

import psycopg
import pytest

from common.errors import ConfigError
from common.migrations.base import Selection
from common.migrations.mlflow_latest_metrics import LatestMetrics
from common.migrations.mlflow_metrics_fixtures import EDGE_CASES, build_logged, log_in_order, mlflow_client
from tests.conftest import _admin, create_db, drop_db, pg_url

CHUNK_ROWS = 300  # several chunks per experiment (each run has ~118 metric rows)
COLUMNS = "key, value, timestamp, step, is_nan, run_uuid"


@pytest.fixture(scope="module")
def template():
    name = f"shuttle_lm_{os.getpid()}_template"
    data = build_logged(create_db(name))
    with _admin() as conn:  # MLflow's engine keeps pooled connections; a template must have none
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    yield name, data
    drop_db(name)


def copy_of(template_name: str) -> str:
    name = f"shuttle_lm_{os.getpid()}_{os.urandom(3).hex()}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"')
    return pg_url(name)


@pytest.fixture
def mlflow_db(template):
    """A fresh copy of the logged database: (url, dataset, latest_metrics as MLflow left it)."""
    url = copy_of(template[0])
    yield url, template[1], table(url)
    drop_db(url.rsplit("/", 1)[1])


@pytest.fixture
def other_mlflow_db(template):
    """A second copy with latest_metrics emptied: a target database other than the source."""
    url = copy_of(template[0])
    sql(url, "DELETE FROM latest_metrics")
    yield url
    drop_db(url.rsplit("/", 1)[1])


def table(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT {COLUMNS} FROM latest_metrics ORDER BY run_uuid, key").fetchall()


def sql(url: str, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def run_all(url: str, selection: Selection = Selection(), target_url: str | None = None, **flags):
    migration = LatestMetrics(url, target_url or url, LatestMetrics.plan_options(**flags))
    migration.prepare_target()
    chunks = list(migration.plan_chunks(selection, CHUNK_ROWS))
    outcomes = [migration.run_chunk(spec, lambda rows: None) for spec in chunks]
    return migration, chunks, outcomes


def written(outcomes) -> dict[str, int]:
    counts = {"inserted": 0, "updated": 0, "unchanged": 0, "deleted": 0}
    for outcome in outcomes:
        for k, v in outcome.writes["latest_metrics"].as_dict().items():
            counts[k] += v
    return counts


def test_rebuild_of_an_emptied_table_equals_what_mlflow_maintained(mlflow_db):
    url, data, saved = mlflow_db
    sql(url, "DELETE FROM latest_metrics")
    migration, chunks, outcomes = run_all(url)
    assert table(url) == saved and len(saved) == data.pairs
    assert sum(o.rows_read for o in outcomes) == data.metric_rows
    assert written(outcomes) == {"inserted": data.pairs, "updated": 0, "unchanged": 0, "deleted": 0}
    assert len(chunks) > len(data.experiments)
    checks = migration.verify(Selection(), [*data.experiments, data.empty_experiment], {})
    assert all(c.ok for c in checks) and sum(c.target_rows for c in checks) == data.pairs
    migration.close()


def test_every_edge_case_gets_mlflow_s_answer(mlflow_db):
    url, data, _ = mlflow_db
    sql(url, "DELETE FROM latest_metrics")
    run_all(url)
    got = sql(url, "SELECT key, value, is_nan FROM latest_metrics WHERE key LIKE 'edge/%%'")
    assert len(got) == len(EDGE_CASES) * sum(len(r) for r in data.runs.values())
    for key, value, is_nan in got:
        assert (value, is_nan) == EDGE_CASES[key][1], key


def test_chunks_are_run_ranges_inside_one_experiment_and_never_split_a_run(mlflow_db):
    url, data, _ = mlflow_db
    migration = LatestMetrics(url, url, LatestMetrics.plan_options())
    chunks = list(migration.plan_chunks(Selection(), CHUNK_ROWS))
    per_run = dict(sql(url, "SELECT run_uuid, count(*) FROM metrics GROUP BY 1"))
    covered: dict[str, str] = {}
    for spec in chunks:
        # half-open [lo, hi) in byte order, the experiment's first and last open-ended ("")
        runs = sorted((r for r in data.runs[spec.partition] if spec.lo <= r and (not spec.hi or r < spec.hi)))
        assert spec.lo in ("", runs[0]) and (spec.hi == "" or spec.hi > runs[-1])
        assert spec.est_rows == sum(per_run[r] for r in runs)
        assert spec.est_rows <= CHUNK_ROWS or len(runs) == 1
        for run in runs:
            assert run not in covered, f"{run} in two chunks"
            covered[run] = spec.chunk_key
    assert set(covered) == {r for runs in data.runs.values() for r in runs}
    migration.close()


def test_rerun_changes_nothing(mlflow_db):
    url, data, saved = mlflow_db
    _, _, outcomes = run_all(url)
    assert written(outcomes) == {"inserted": 0, "updated": 0, "unchanged": data.pairs, "deleted": 0}
    assert table(url) == saved


def test_full_rebuild_repairs_wrong_and_missing_rows(mlflow_db):
    url, data, saved = mlflow_db
    sql(url, "UPDATE latest_metrics SET value = value + 1 WHERE key = 'loss'")
    sql(url, "DELETE FROM latest_metrics WHERE key = 'edge/nan_vs_neg'")
    wrong = missing = sum(len(runs) for runs in data.runs.values())
    _, _, outcomes = run_all(url)
    assert written(outcomes) == {"inserted": missing, "updated": wrong, "unchanged": data.pairs - wrong - missing, "deleted": 0}
    assert table(url) == saved


def test_only_missing_fills_absent_pairs_and_leaves_the_rest_alone(mlflow_db):
    url, data, saved = mlflow_db
    sql(url, "UPDATE latest_metrics SET value = -1 WHERE key = 'loss'")
    sql(url, "DELETE FROM latest_metrics WHERE key IN ('accuracy', 'edge/nan_last')")
    deleted = 2 * sum(len(runs) for runs in data.runs.values())
    _, _, outcomes = run_all(url, only_missing=True)
    assert written(outcomes) == {"inserted": deleted, "updated": 0, "unchanged": data.pairs - deleted, "deleted": 0}
    after = table(url)
    assert [r for r in after if r[0] != "loss"] == [r for r in saved if r[0] != "loss"]
    assert {r[1] for r in after if r[0] == "loss"} == {-1}


def test_experiment_ids_select_exactly_those(mlflow_db):
    url, data, saved = mlflow_db
    chosen = data.experiments[1]
    sql(url, "DELETE FROM latest_metrics")
    migration, chunks, outcomes = run_all(url, Selection(partitions=(chosen, data.empty_experiment)))
    assert {c.partition for c in chunks} == {chosen}
    counts = {p.partition: p.rows for p in migration.count_partitions(Selection(partitions=(chosen, data.empty_experiment)))}
    assert counts[data.empty_experiment] == 0 and counts[chosen] == sum(o.rows_read for o in outcomes)
    runs = set(data.runs[chosen])
    assert table(url) == [r for r in saved if r[5] in runs]
    with pytest.raises(ConfigError, match="unknown experiment ids: 77, 999"):
        migration.count_partitions(Selection(partitions=("999", "77", chosen)))
    with pytest.raises(ConfigError, match="experiment ids must be whole numbers, got: abc"):
        migration.count_partitions(Selection(partitions=("abc",)))
    migration.close()


def test_nan_and_zero_tie_keeps_what_mlflow_kept_and_prefers_nan_when_rebuilt(mlflow_db):
    """A NaN (stored 0) and a 0.0 at the same (step, timestamp): MLflow keeps the first logged."""
    url, data, _ = mlflow_db
    client = mlflow_client(url)
    run_id = client.create_run(data.experiments[0]).info.run_id
    log_in_order(client, run_id, [[("tie/zero_then_nan", 0.0, 3, 7)], [("tie/zero_then_nan", math.nan, 3, 7)],
                                  [("tie/nan_then_zero", math.nan, 3, 7)], [("tie/nan_then_zero", 0.0, 3, 7)]])
    ties = "SELECT key, value, is_nan FROM latest_metrics WHERE key LIKE 'tie/%%' ORDER BY key"
    assert sql(url, ties) == [("tie/nan_then_zero", 0.0, True), ("tie/zero_then_nan", 0.0, False)]
    _, _, outcomes = run_all(url)
    assert written(outcomes)["updated"] == 0 and written(outcomes)["inserted"] == 0
    assert sql(url, ties) == [("tie/nan_then_zero", 0.0, True), ("tie/zero_then_nan", 0.0, False)]
    sql(url, "DELETE FROM latest_metrics WHERE key LIKE 'tie/%%'")
    run_all(url)
    assert sql(url, ties) == [("tie/nan_then_zero", 0.0, True), ("tie/zero_then_nan", 0.0, True)]


def test_into_another_database_gives_the_same_table(mlflow_db, other_mlflow_db):
    url, data, saved = mlflow_db
    migration, _, outcomes = run_all(url, target_url=other_mlflow_db)
    assert not migration.in_place
    assert table(other_mlflow_db) == saved
    assert sum(o.rows_read for o in outcomes) == data.metric_rows
    assert written(outcomes) == {"inserted": data.pairs, "updated": 0, "unchanged": 0, "deleted": 0}
    _, _, outcomes = run_all(url, target_url=other_mlflow_db)
    assert written(outcomes) == {"inserted": 0, "updated": 0, "unchanged": data.pairs, "deleted": 0}


def fail_after(url: str, rows: int) -> None:
    """Make the target fail mid-statement: the row after `rows` written rows raises, as a lost disk would."""
    sql(url, f"CREATE SEQUENCE written_rows; CREATE FUNCTION fail_after() RETURNS trigger LANGUAGE plpgsql AS $$"
             f" BEGIN IF nextval('written_rows') > {rows} THEN RAISE EXCEPTION 'disk lost mid-chunk'; END IF;"
             f" RETURN NEW; END $$; CREATE TRIGGER fail_after BEFORE INSERT OR UPDATE ON latest_metrics"
             f" FOR EACH ROW EXECUTE FUNCTION fail_after()")


@pytest.mark.parametrize("where", ["in place", "another database"])
def test_a_chunk_that_fails_while_writing_leaves_the_table_as_it_was(mlflow_db, other_mlflow_db, where):
    url, data, saved = mlflow_db
    target = url if where == "in place" else other_mlflow_db
    sql(target, "UPDATE latest_metrics SET value = 42 WHERE key = 'lr'")
    sql(target, "DELETE FROM latest_metrics WHERE key = 'loss'")
    before = table(target)
    migration = LatestMetrics(url, target, LatestMetrics.plan_options())
    assert migration.in_place == (where == "in place")
    chunks = list(migration.plan_chunks(Selection(), CHUNK_ROWS))
    fail_after(target, 3)
    with pytest.raises(psycopg.errors.RaiseException, match="disk lost mid-chunk"):
        migration.run_chunk(chunks[0], lambda rows: None)
    assert sql(target, "SELECT last_value > 3 FROM written_rows") == [(True,)], "the chunk had begun writing"
    assert table(target) == before
    sql(target, "DROP TRIGGER fail_after ON latest_metrics")
    for spec in chunks:
        migration.run_chunk(spec, lambda rows: None)
    assert table(target) == saved
    migration.close()


def test_target_without_mlflow_schema_is_refused(mlflow_db, fresh_db):
    url, *_ = mlflow_db
    migration = LatestMetrics(url, fresh_db, LatestMetrics.plan_options())
    with pytest.raises(ConfigError, match="has no table latest_metrics; point --target-url at an MLflow database"):
        migration.prepare_target()
    migration.close()


def test_pairs_with_no_metrics_left_are_deleted_unless_kept(mlflow_db):
    """A key gone from a run, a run with no metrics left, an experiment with none left: their rows go."""
    url, data, saved = mlflow_db
    a, b = data.experiments[0], data.experiments[1]
    run, emptied_run = data.runs[a][0], data.runs[a][1]
    sql(url, "DELETE FROM metrics WHERE run_uuid = %s AND key = 'lr'", (run,))
    sql(url, "DELETE FROM metrics WHERE run_uuid = %s OR run_uuid = ANY(%s)", (emptied_run, list(data.runs[b])))
    _, _, kept = run_all(url, keep_deleted=True)
    assert written(kept)["deleted"] == 0 and table(url) == saved
    gone_runs = {emptied_run, *data.runs[b]}
    expected = [r for r in saved if r[5] not in gone_runs and (r[5], r[0]) != (run, "lr")]
    migration, chunks, outcomes = run_all(url)
    assert table(url) == expected
    deleted = len(saved) - len(expected)
    assert written(outcomes) == {"inserted": 0, "updated": 0, "unchanged": len(expected), "deleted": deleted}
    assert [(c.lo, c.hi) for c in chunks if c.partition == b] == [("", "")]  # planned from the target alone
    checks = migration.verify(Selection(), [*data.experiments, data.empty_experiment], {})
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    _, _, again = run_all(url)
    assert written(again)["deleted"] == 0 and written(again)["unchanged"] == len(expected)
    migration.close()


def test_pairs_of_a_run_deleted_from_another_source_database_are_deleted(mlflow_db, other_mlflow_db):
    url, data, saved = mlflow_db
    run_all(url, target_url=other_mlflow_db)
    gone = data.runs[data.experiments[2]][-1]
    for child in ("latest_metrics", "metrics", "params", "tags"):
        sql(url, f"DELETE FROM {child} WHERE run_uuid = %s", (gone,))
    sql(url, "DELETE FROM runs WHERE run_uuid = %s", (gone,))
    _, _, outcomes = run_all(url, target_url=other_mlflow_db)
    assert table(other_mlflow_db) == [r for r in saved if r[5] != gone]
    assert written(outcomes)["deleted"] == sum(1 for r in saved if r[5] == gone) > 0


@pytest.mark.parametrize("where", ["in place", "another database"])
def test_a_row_wrong_only_in_is_nan_is_repaired(mlflow_db, other_mlflow_db, where):
    """is_nan true on a logged 5.0, false on a NaN: both repaired and counted updated; the tie is kept."""
    url, data, saved = mlflow_db
    target = url if where == "in place" else other_mlflow_db
    if target != url:
        run_all(url, target_url=target)
    sql(target, "UPDATE latest_metrics SET is_nan = true WHERE key = 'loss'")
    sql(target, "UPDATE latest_metrics SET is_nan = false WHERE key = 'edge/nan_last'")
    wrong = 2 * sum(len(runs) for runs in data.runs.values())
    _, _, outcomes = run_all(url, target_url=target)
    assert written(outcomes) == {"inserted": 0, "updated": wrong, "unchanged": data.pairs - wrong, "deleted": 0}
    assert table(target) == saved
