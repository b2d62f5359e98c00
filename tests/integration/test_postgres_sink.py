"""The PostgreSQL sink: guarded upserts report inserted/updated/unchanged; identifiers are validated."""

import pytest

from common.connectors.base import Column, TableSpec
from common.connectors.postgres import Sink, Source, identifier
from common.errors import ConfigError

TABLE = TableSpec("metrics_t", (Column("k", "text"), Column("n", "int8"), Column("h", "int8[]"),
                                Column("j", "jsonb")), key=("k",))


def test_upsert_is_idempotent_and_counts_what_changed(fresh_db):
    from psycopg.types.json import Jsonb

    sink = Sink(fresh_db)
    sink.ensure_table(TABLE)
    sink.ensure_table(TABLE)
    rows = [("a", 1, [1, 2], Jsonb({"x": 1})), ("b", 2, [3], Jsonb([["c", 1]]))]
    assert sink.upsert(TABLE, rows).as_dict() == {"inserted": 2, "updated": 0, "unchanged": 0, "deleted": 0}
    assert sink.upsert(TABLE, rows).as_dict() == {"inserted": 0, "updated": 0, "unchanged": 2, "deleted": 0}
    changed = [("a", 1, [1, 2], Jsonb({"x": 2})), ("c", 3, [], Jsonb({}))]
    assert sink.upsert(TABLE, changed).as_dict() == {"inserted": 1, "updated": 1, "unchanged": 0, "deleted": 0}
    got = sink.connection().execute("SELECT k, n, h, j FROM metrics_t ORDER BY k").fetchall()
    assert got == [("a", 1, [1, 2], {"x": 2}), ("b", 2, [3], [["c", 1]]), ("c", 3, [], {})]
    sink.close()


def test_existing_table_with_other_columns_is_refused(fresh_db):
    sink = Sink(fresh_db)
    conn = sink.connection()
    conn.execute("CREATE TABLE metrics_t (k text PRIMARY KEY, other int)")
    conn.commit()
    with pytest.raises(ConfigError, match="exists with different columns"):
        sink.ensure_table(TABLE)
    sink.close()


@pytest.mark.parametrize("name", ['x"; DROP TABLE y; --', "a.b.c", "1abc", "a b", "x" * 64])
def test_hostile_identifiers_are_refused(name):
    with pytest.raises(ConfigError, match="invalid table or schema name"):
        identifier(name)


def test_source_is_read_only(fresh_db):
    source = Source(fresh_db)
    import psycopg

    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        source.query("CREATE TABLE nope (x int)")
    source.close()


MLFLOW_LIKE = TableSpec("latest_t", (Column("key", "varchar"), Column("value", "float8"), Column("run_uuid", "varchar")),
                        key=("key", "run_uuid"))


def test_existing_varchar_columns_with_a_length_are_accepted_but_other_types_are_not(fresh_db):
    sink = Sink(fresh_db)
    conn = sink.connection()
    conn.execute("CREATE TABLE latest_t (key varchar(250), value double precision, run_uuid character varying(32),"
                 " PRIMARY KEY (key, run_uuid))")
    conn.execute("CREATE TABLE wrong_t (key text, value double precision, run_uuid varchar(32), PRIMARY KEY (key, run_uuid))")
    conn.commit()
    sink.ensure_table(MLFLOW_LIKE)
    with pytest.raises(ConfigError, match=r"other type: \['key'\]"):
        sink.ensure_table(TableSpec("wrong_t", MLFLOW_LIKE.columns, MLFLOW_LIKE.key))
    sink.close()


def test_insert_missing_leaves_existing_rows_alone_and_counts_them_unchanged(fresh_db):
    sink = Sink(fresh_db)
    sink.ensure_table(MLFLOW_LIKE)
    assert sink.upsert(MLFLOW_LIKE, [("a", 1.0, "r1")]).as_dict() == {"inserted": 1, "updated": 0, "unchanged": 0, "deleted": 0}
    counts = sink.insert_missing(MLFLOW_LIKE, [("a", 9.0, "r1"), ("b", 2.0, "r1")])
    assert counts.as_dict() == {"inserted": 1, "updated": 0, "unchanged": 1, "deleted": 0}
    assert sink.connection().execute("SELECT key, value FROM latest_t ORDER BY key").fetchall() == [("a", 1.0), ("b", 2.0)]
    assert sink.insert_missing(MLFLOW_LIKE, []).as_dict() == {"inserted": 0, "updated": 0, "unchanged": 0, "deleted": 0}
    sink.close()


def test_rewrite_when_keeps_a_row_that_differs_only_in_other_columns(fresh_db):
    table = TableSpec("tie_t", (Column("k", "text"), Column("v", "float8"), Column("flag", "bool")), key=("k",))
    sink = Sink(fresh_db)
    sink.ensure_table(table)
    sink.upsert(table, [("a", 0.0, True), ("b", 1.0, False)])
    counts = sink.upsert(table, [("a", 0.0, False), ("b", 2.0, False)], rewrite_when=("v",))
    assert counts.as_dict() == {"inserted": 0, "updated": 1, "unchanged": 1, "deleted": 0}
    assert sink.connection().execute("SELECT k, v, flag FROM tie_t ORDER BY k").fetchall() == \
        [("a", 0.0, True), ("b", 2.0, False)]
    with pytest.raises(ConfigError, match="must name non-key columns"):
        sink.upsert(table, [("a", 0.0, True)], rewrite_when=("k",))
    sink.close()


def test_owned_rows_the_write_does_not_hold_are_deleted_and_counted(fresh_db):
    """`owned` scopes the delete: stale keys inside it go (one anti-join), rows outside it stay."""
    from psycopg import sql

    sink = Sink(fresh_db)
    table = TableSpec("owned_t", (Column("g", "text"), Column("k", "int8"), Column("v", "int8")), key=("g", "k"))
    sink.ensure_table(table)
    sink.upsert(table, [("a", 1, 1), ("a", 2, 2), ("a", 3, 3), ("b", 1, 1)])
    group_a = sql.SQL("g = {}").format(sql.Literal("a"))
    counts = sink.upsert(table, [("a", 1, 1), ("a", 3, 30)], owned=group_a)
    assert counts.as_dict() == {"inserted": 0, "updated": 1, "unchanged": 1, "deleted": 1}
    counts, _ = sink.upsert_query(table, sql.SQL("SELECT 'a'::text AS g, 3::int8 AS k, 30::int8 AS v"), owned=group_a)
    assert counts.as_dict() == {"inserted": 0, "updated": 0, "unchanged": 1, "deleted": 1}
    assert sink.upsert_together([(table, [])], owned={table.name: group_a})[table.name].deleted == 1
    assert sink.connection().execute("SELECT g, k, v FROM owned_t ORDER BY 1, 2").fetchall() == [("b", 1, 1)]
    sink.close()
