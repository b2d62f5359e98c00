"""The MLflow source as found: tables, columns, primary and foreign keys read from PostgreSQL's catalog,
each table's partition (experiment, registered model, or global) and an order that puts parents first.

Reflection, not a hard-coded list: whatever tables the installed MLflow version created are migrated.
A table reaches its experiment through its own `experiment_id` column or through foreign keys (metrics →
runs → experiments); registry tables are partitioned by registered model name; the rest is "global".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg import sql

from common.connectors.postgres import Source
from common.migrations.mlflow_mapping import EXTRA_REFERENCES, REGISTRY_ROOT

GLOBAL = "global"
MODEL_PREFIX = "model:"
SAMPLE_SEED = 20240601  # any fixed value: a sampled check reads the same rows on every run


@dataclass(frozen=True)
class ForeignKey:
    columns: tuple[str, ...]
    table: str
    ref_columns: tuple[str, ...]


@dataclass
class Table:
    name: str
    columns: dict[str, str]  # name → PostgreSQL type name (format_type)
    primary_key: tuple[str, ...]
    foreign_keys: list[ForeignKey] = field(default_factory=list)
    # How to reach the partition: joins [(alias, table, "on" columns pairs)], and the partition expression.
    joins: list[tuple[str, str, tuple[tuple[str, str], ...]]] = field(default_factory=list)
    partition_sql: sql.Composable = field(default_factory=lambda: sql.Literal(GLOBAL))
    kind: str = GLOBAL  # "experiment", "registry" or "global"

    @property
    def key(self) -> tuple[str, ...]:
        """The primary key, or every column when the table has none (still a stable, total order)."""
        return self.primary_key or tuple(self.columns)

    def from_clause(self, schema: str, sample_percent: float | None = None) -> sql.Composable:
        """The table as `t` with the joins its partition path needs; `sample_percent` reads a fixed
        pseudo-random share of its rows (`TABLESAMPLE BERNOULLI … REPEATABLE`: the same share every time)."""
        table = sql.Identifier(schema, self.name)
        parts = [sql.SQL("{} AS t").format(table) if sample_percent is None else
                 sql.SQL("{} AS t TABLESAMPLE BERNOULLI ({}) REPEATABLE ({})").format(
                     table, sql.Literal(sample_percent), sql.Literal(SAMPLE_SEED))]
        for alias, table, on in self.joins:
            conditions = sql.SQL(" AND ").join(
                sql.SQL("{} = {}").format(sql.Identifier(*left.split(".")), sql.Identifier(alias, right))
                for left, right in on)
            parts.append(sql.SQL("LEFT JOIN {} AS {} ON {}").format(sql.Identifier(schema, table),
                                                                     sql.Identifier(alias), conditions))
        return sql.SQL(" ").join(parts)

    def partition_expr(self) -> sql.Composable:
        return sql.SQL("coalesce(({})::text, {})").format(self.partition_sql, sql.Literal(GLOBAL))


def reflect(source: Source, schema: str) -> dict[str, Table]:
    """Every base table of `schema` with its columns, keys and partition path."""
    tables: dict[str, Table] = {}
    for table, column, type_name in source.query(
            "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_attribute a ON a.attrelid = c.oid"
            " WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped"
            " ORDER BY c.relname, a.attnum", [schema]):
        tables.setdefault(table, Table(table, {}, ())).columns[column] = type_name
    for table, kind, columns, ref_table, ref_columns in source.query(
            "SELECT c.relname, k.contype,"
            " array(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, i)"
            "       JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.i),"
            " f.relname,"
            " array(SELECT a.attname FROM unnest(k.confkey) WITH ORDINALITY u(n, i)"
            "       JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.n ORDER BY u.i)"
            " FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " LEFT JOIN pg_class f ON f.oid = k.confrelid"
            " WHERE n.nspname = %s AND k.contype IN ('p', 'f') ORDER BY c.relname, k.conname", [schema]):
        if table not in tables:
            continue
        if kind == "p":
            tables[table].primary_key = tuple(columns)
        elif ref_table in tables:
            tables[table].foreign_keys.append(ForeignKey(tuple(columns), ref_table, tuple(ref_columns or ())))
    for table in tables.values():
        _resolve_partition(table, tables)
    return tables


def references(table: Table, tables: dict[str, Table]) -> list[ForeignKey]:
    """Declared foreign keys plus the references MLflow keeps without a constraint (inputs → runs)."""
    extra = [ForeignKey(tuple(c), t, tuple(r)) for c, t, r in EXTRA_REFERENCES.get(table.name, ())
             if t in tables and set(c) <= set(table.columns)]
    return table.foreign_keys + extra


def _resolve_partition(table: Table, tables: dict[str, Table], depth: int = 0) -> None:
    if table.name == REGISTRY_ROOT or _reaches_registry(table, tables):
        table.kind = "registry"
        table.partition_sql = sql.SQL("{} || t.{}").format(sql.Literal(MODEL_PREFIX), sql.Identifier("name"))
        return
    if "experiment_id" in table.columns:
        table.kind = "experiment"
        table.partition_sql = sql.SQL("t.{}").format(sql.Identifier("experiment_id"))
        return
    # Follow references (declared or known) up to two tables away to one holding experiment_id.
    for first in references(table, tables):
        parent = tables[first.table]
        if "experiment_id" in parent.columns:
            table.kind = "experiment"
            table.joins = [("p1", parent.name, tuple((f"t.{c}", r) for c, r in zip(first.columns, first.ref_columns)))]
            table.partition_sql = sql.SQL("p1.{}").format(sql.Identifier("experiment_id"))
            return
        for second in references(parent, tables):
            grand = tables[second.table]
            if "experiment_id" in grand.columns:
                table.kind = "experiment"
                table.joins = [
                    ("p1", parent.name, tuple((f"t.{c}", r) for c, r in zip(first.columns, first.ref_columns))),
                    ("p2", grand.name, tuple((f"p1.{c}", r) for c, r in zip(second.columns, second.ref_columns)))]
                table.partition_sql = sql.SQL("p2.{}").format(sql.Identifier("experiment_id"))
                return


def _reaches_registry(table: Table, tables: dict[str, Table], depth: int = 0) -> bool:
    if "name" not in table.columns or depth > 2:
        return False
    return any(fk.table == REGISTRY_ROOT or _reaches_registry(tables[fk.table], tables, depth + 1)
               for fk in table.foreign_keys if "name" in fk.columns)


def parents_first(tables: dict[str, Table]) -> list[str]:
    """Table names ordered so that every referenced table comes before the tables referring to it."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, path: frozenset[str]) -> None:
        if name in seen or name in path:
            return
        for fk in references(tables[name], tables):
            if fk.table != name:
                visit(fk.table, path | {name})
        seen.add(name)
        order.append(name)

    for name in sorted(tables):
        visit(name, frozenset())
    return order
