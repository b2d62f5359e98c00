"""A declared migration as plain, frozen data, built from a parsed TOML file (or from a run's options).

    [migration]  name, summary
    [source]     url?, table | collection | query, key, partition?, chunk_by?
    [target]     url?, table | collection, create, indexes
    [columns]    target name = { from, path, cast, transform, constant, optional }
    [options]    keep_unmapped, drop, rest_column, keep_deleted
    [validate]   counts, sample, checksum

Checks here are about the file alone (names, types, which keys go together); what needs the databases
(a column that is not in the source table) is checked when a run is planned. A problem is a `SpecProblem`
naming the key path, which the loader turns into `file:line` (`loader.py`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from common.declarative.mapping import CASTS, TRANSFORMS, check_path

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")
FIELD = re.compile(r"^[^$.\x00][^.\x00]*$")
URL_SCHEMES = {"postgres": ("postgresql://", "postgres://", "postgresql+psycopg://"),
               "mongo": ("mongodb://", "mongodb+srv://")}
SECTIONS = {
    "migration": {"name", "summary"},
    "source": {"url", "table", "collection", "query", "key", "partition", "chunk_by"},
    "target": {"url", "table", "collection", "create", "indexes", "copy_indexes"},
    "columns": None,  # any target name
    "options": {"keep_unmapped", "drop", "rest_column", "keep_deleted"},
    "validate": {"counts", "sample", "checksum"},
}
RULE_KEYS = {"from", "path", "cast", "transform", "constant", "optional"}


class SpecProblem(ValueError):
    """What is wrong with a migration file, and where: the key path, e.g. ("columns", "score", "cast")."""

    def __init__(self, path: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message

    def __reduce__(self):
        return (SpecProblem, (self.path, self.message))


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # "postgres" (table or query) or "mongo" (collection)
    url: str | None
    table: str | None
    collection: str | None
    query: str | None
    key: tuple[str, ...]
    partition: str | None
    chunk_by: str


@dataclass(frozen=True)
class TargetSpec:
    kind: str
    url: str | None
    table: str | None
    collection: str | None
    create: bool
    indexes: tuple[tuple[str, ...], ...]
    copy_indexes: bool = False  # the source table's indexes over columns that reach the target unchanged

    @property
    def name(self) -> str:
        return self.table or self.collection or ""


@dataclass(frozen=True)
class ColumnRule:
    """One target column (or field): where its value comes from and how it is made."""

    target: str
    source: str | None = None  # `from`
    path: str | None = None
    cast: str | None = None
    transform: str | None = None
    constant: Any = None
    has_constant: bool = False
    optional: bool = False

    @property
    def is_plain(self) -> bool:
        """A rename (or copy) of one source value: no path, transform or constant (a cast may apply)."""
        return self.source is not None and self.path is None and self.transform is None


@dataclass(frozen=True)
class ValidateSpec:
    counts: bool = True
    sample: int = 0
    checksum: bool = False


@dataclass(frozen=True)
class MigrationSpec:
    name: str
    summary: str
    source: SourceSpec
    target: TargetSpec
    columns: tuple[ColumnRule, ...]
    keep_unmapped: bool = True
    drop: tuple[str, ...] = ()
    rest_column: str = "extra"
    keep_deleted: bool = False
    validate: ValidateSpec = field(default_factory=ValidateSpec)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the run's options: workers rebuild the spec from it, without the file."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MigrationSpec:
        source = dict(data["source"])
        source["key"] = tuple(source["key"])
        target = dict(data["target"])
        target["indexes"] = tuple(tuple(i) for i in target["indexes"])
        return cls(name=data["name"], summary=data["summary"], source=SourceSpec(**source),
                   target=TargetSpec(**target), columns=tuple(ColumnRule(**c) for c in data["columns"]),
                   keep_unmapped=data["keep_unmapped"], drop=tuple(data["drop"]), rest_column=data["rest_column"],
                   keep_deleted=data["keep_deleted"], validate=ValidateSpec(**data["validate"]))

    # -- what the generic migration derives from the spec ----------------------------------------

    def rule_from(self, source_name: str) -> ColumnRule | None:
        """The plain rule renaming `source_name`, if any."""
        return next((r for r in self.columns if r.is_plain and r.source == source_name), None)

    def target_name(self, source_name: str) -> str:
        """Where a key, partition or chunking column lands in the target (validated to exist)."""
        rule = self.rule_from(source_name)
        return rule.target if rule is not None else source_name

    @property
    def target_key(self) -> tuple[str, ...]:
        return tuple(self.target_name(k) for k in self.source.key)


def build_spec(data: dict[str, Any]) -> MigrationSpec:
    """The spec of a parsed file; raises SpecProblem at the first thing wrong."""
    for section, value in data.items():
        if section not in SECTIONS:
            raise SpecProblem((section,), f"unknown section [{section}]; use: {', '.join(SECTIONS)}")
        if not isinstance(value, dict):
            raise SpecProblem((section,), f"'{section}' must be a table ([{section}])")
        allowed = SECTIONS[section]
        for key in value:
            if allowed is not None and key not in allowed:
                raise SpecProblem((section, key), f"unknown key '{key}' in [{section}]; use: {', '.join(sorted(allowed))}")
    for section in ("migration", "source", "target"):
        if section not in data:
            raise SpecProblem((), f"missing section [{section}]")
    migration = data["migration"]
    name = _text(migration, ("migration", "name"), required=True)
    if not NAME.match(name):
        raise SpecProblem(("migration", "name"), f"name {name!r}: use lowercase letters, digits, - and _ "
                          "(at most 63), starting with a letter or digit")
    summary = _text(migration, ("migration", "summary")) or f"declared migration {name}"
    source = _source(data["source"])
    target = _target(data["target"])
    columns = _columns(data.get("columns", {}), source.kind)
    options = data.get("options", {})
    validate = data.get("validate", {})
    spec = MigrationSpec(
        name=name, summary=summary, source=source, target=target, columns=columns,
        keep_unmapped=_flag(options, ("options", "keep_unmapped"), True),
        drop=tuple(_names(options, ("options", "drop"), FIELD)),
        rest_column=_text(options, ("options", "rest_column")) or "extra",
        keep_deleted=_flag(options, ("options", "keep_deleted"), False),
        validate=ValidateSpec(counts=_flag(validate, ("validate", "counts"), True),
                              sample=_count(validate, ("validate", "sample")),
                              checksum=_flag(validate, ("validate", "checksum"), False)))
    _check_together(spec)
    return spec


def _source(section: dict[str, Any]) -> SourceSpec:
    where = ("source",)
    given = [k for k in ("table", "collection", "query") if section.get(k) is not None]
    if len(given) != 1:
        raise SpecProblem(where + ((given[1],) if len(given) > 1 else ()),
                          "give exactly one of table, collection or query in [source]")
    kind = "mongo" if given[0] == "collection" else "postgres"
    url = _url(section, where, kind)
    table = _text(section, where + ("table",))
    if table is not None and not IDENTIFIER.match(table):
        raise SpecProblem(where + ("table",), f"table {table!r}: use letters, digits and _, optionally schema.table")
    collection = _text(section, where + ("collection",))
    query = _text(section, where + ("query",))
    if query is not None and not query.strip().lower().startswith(("select", "with")):
        raise SpecProblem(where + ("query",), "query must be one SELECT (or WITH … SELECT) statement")
    default_key = ["_id"] if kind == "mongo" else None
    key = _names(section, where + ("key",), FIELD if kind == "mongo" else IDENTIFIER, default_key)
    if not key:
        raise SpecProblem(where + ("key",), "key is required: the column(s) that identify a row (the upsert key)")
    partition = _text(section, where + ("partition",))
    chunk_by = _text(section, where + ("chunk_by",)) or ("_id" if kind == "mongo" else key[0])
    for name, value in (("partition", partition), ("chunk_by", chunk_by)):
        if value is not None and not (FIELD if kind == "mongo" else IDENTIFIER).match(value):
            raise SpecProblem(where + (name,), f"{name} {value!r} is not a valid column or field name")
    if kind == "mongo" and chunk_by != "_id":
        raise SpecProblem(where + ("chunk_by",), "a MongoDB source is cut into chunks by _id: leave chunk_by out "
                          "or set it to \"_id\"")
    return SourceSpec(kind, url, table, collection, query, tuple(key), partition, chunk_by)


def _target(section: dict[str, Any]) -> TargetSpec:
    where = ("target",)
    given = [k for k in ("table", "collection") if section.get(k) is not None]
    if len(given) != 1:
        raise SpecProblem(where + ((given[1],) if len(given) > 1 else ()),
                          "give exactly one of table or collection in [target]")
    kind = "mongo" if given[0] == "collection" else "postgres"
    url = _url(section, where, kind)
    table = _text(section, where + ("table",))
    if table is not None and not IDENTIFIER.match(table):
        raise SpecProblem(where + ("table",), f"table {table!r}: use letters, digits and _, optionally schema.table")
    collection = _text(section, where + ("collection",))
    indexes = section.get("indexes", [])
    if not isinstance(indexes, list) or not all(
            isinstance(i, list) and i and all(isinstance(c, str) for c in i) for i in indexes):
        raise SpecProblem(where + ("indexes",), "indexes must be a list of column lists, e.g. [[\"a\", \"b\"], [\"c\"]]")
    return TargetSpec(kind, url, table, collection, _flag(section, where + ("create",), True),
                      tuple(tuple(i) for i in indexes), _flag(section, where + ("copy_indexes",), False))


def _columns(section: dict[str, Any], source_kind: str) -> tuple[ColumnRule, ...]:
    rules = []
    for target, rule in section.items():
        where = ("columns", target)
        if not (FIELD.match(target) and len(target) <= 63):
            raise SpecProblem(where, f"column name {target!r} is not valid")
        if isinstance(rule, str):  # shorthand: new_name = "old_name"
            rule = {"from": rule}
        if not isinstance(rule, dict):
            raise SpecProblem(where, f"columns.{target} must be a table such as {{ from = \"old_name\" }} or a "
                              "source name in quotes")
        for key in rule:
            if key not in RULE_KEYS:
                raise SpecProblem(where + (key,), f"unknown key '{key}' in columns.{target}; use: "
                                  f"{', '.join(sorted(RULE_KEYS))}")
        has_constant = "constant" in rule
        if has_constant and set(rule) - {"constant", "cast"}:
            raise SpecProblem(where + ("constant",), f"columns.{target}: a constant takes no from, path or transform")
        if not has_constant and "from" not in rule:
            raise SpecProblem(where, f"columns.{target}: give from = \"source name\" or constant = …")
        source = _text(rule, where + ("from",))
        path = _text(rule, where + ("path",))
        if path is not None:
            problem = check_path(path)
            if problem:
                raise SpecProblem(where + ("path",), f"path {path!r}: {problem}")
        cast = _text(rule, where + ("cast",))
        if cast is not None and cast not in CASTS:
            raise SpecProblem(where + ("cast",), f"unknown cast {cast!r}; use one of: {', '.join(CASTS)}")
        transform = _text(rule, where + ("transform",))
        if transform is not None and transform not in TRANSFORMS:
            raise SpecProblem(where + ("transform",),
                              f"unknown transform {transform!r}; use one of: {', '.join(TRANSFORMS)}")
        constant = rule.get("constant")
        if has_constant and not isinstance(constant, (str, int, float, bool)):
            raise SpecProblem(where + ("constant",), "a constant is a string, number or boolean")
        rules.append(ColumnRule(target, source, path, cast, transform, constant, has_constant,
                                _flag(rule, where + ("optional",), False)))
    return tuple(rules)


def _check_together(spec: MigrationSpec) -> None:
    """Rules that need several keys: the key, partition and chunking columns must reach the target unchanged
    (a chunk finds its own rows there by them), and the target must hold a key."""
    targets = [r.target for r in spec.columns]
    duplicate = next((t for t in targets if targets.count(t) > 1), None)
    if duplicate:
        raise SpecProblem(("columns", duplicate), f"column {duplicate!r} is declared twice")
    derived = {r.source for r in spec.columns if r.source is not None and not r.is_plain}
    for what, names in (("key", spec.source.key), ("partition", (spec.source.partition,)),
                        ("chunk_by", (spec.source.chunk_by,))):
        for name in names:
            if name is None:
                continue
            if spec.rule_from(name) is None and (not spec.keep_unmapped or name in spec.drop or name in derived):
                raise SpecProblem(("source", what), f"{what} column {name!r} must reach the target as it is (copied "
                                  f"or renamed with from = {name!r}): a chunk finds its rows in the target by it")
            rule = spec.rule_from(name)
            if rule is not None and rule.cast is not None and spec.source.kind != "mongo":
                raise SpecProblem(("columns", rule.target, "cast"), f"columns.{rule.target} carries the {what} "
                                  f"column {name!r}: it is copied as it is, so give it no cast")
    if spec.target.kind == "postgres" and spec.source.kind == "mongo" and spec.keep_unmapped \
            and spec.rest_column in targets:
        raise SpecProblem(("options", "rest_column"), f"rest_column {spec.rest_column!r} is also a mapped column")
    for i, index in enumerate(spec.target.indexes):
        for column in index:
            if spec.target.kind == "postgres" and not IDENTIFIER.match(column):
                raise SpecProblem(("target", "indexes"), f"index {i + 1}: {column!r} is not a column name")
    if spec.validate.checksum:
        raise SpecProblem(("validate", "checksum"), "checksum = true is not supported yet for declared migrations; "
                          "use sample = N (rows compared field by field) and counts")
    if spec.source.kind == "mongo" and spec.source.key != ("_id",):
        raise SpecProblem(("source", "key"), "a MongoDB source is keyed by _id: leave key out or set key = [\"_id\"] "
                          "(rename it in [columns], e.g. id = { from = \"_id\", cast = \"text\" })")


def _url(section: dict[str, Any], where: tuple[str, ...], kind: str) -> str | None:
    url = _text(section, where + ("url",))
    if url is None:
        return None
    if not url.startswith(URL_SCHEMES[kind]):
        what = "a table or query" if kind == "postgres" else "a collection"
        raise SpecProblem(where + ("url",), f"{where[0]} names {what}, so its url must start with "
                          f"{' or '.join(URL_SCHEMES[kind])}")
    userinfo = url.split("://", 1)[1].split("@", 1)[0] if "@" in url else ""
    in_query = re.search(r"[?&]password=(?!\$\{[A-Za-z_][A-Za-z0-9_]*\}(&|$))", url)
    if in_query or (":" in userinfo and not re.search(r":\$\{[A-Za-z_][A-Za-z0-9_]*\}$", userinfo)):
        raise SpecProblem(where + ("url",), "no passwords in migration files: write ${ENV_VAR} in its place "
                          "(e.g. postgresql://app:${APP_PASSWORD}@host/db), or pass the URL with --"
                          f"{where[0]}-url")
    return url


def _text(section: dict[str, Any], where: tuple[str, ...], required: bool = False) -> str | None:
    value = section.get(where[-1])
    if value is None:
        if required:
            raise SpecProblem(where, f"{where[-1]} is required in [{where[0]}]")
        return None
    if not isinstance(value, str) or not value.strip():
        raise SpecProblem(where, f"{where[-1]} must be a non-empty string")
    return value


def _flag(section: dict[str, Any], where: tuple[str, ...], default: bool) -> bool:
    value = section.get(where[-1], default)
    if not isinstance(value, bool):
        raise SpecProblem(where, f"{where[-1]} must be true or false")
    return value


def _count(section: dict[str, Any], where: tuple[str, ...]) -> int:
    value = section.get(where[-1], 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecProblem(where, f"{where[-1]} must be a whole number ≥ 0")
    return value


def _names(section: dict[str, Any], where: tuple[str, ...], pattern: re.Pattern[str],
           default: list[str] | None = None) -> list[str]:
    value = section.get(where[-1], default if default is not None else [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and pattern.match(v) for v in value):
        raise SpecProblem(where, f"{where[-1]} must be a list of column names, e.g. [\"id\"]")
    return list(value)
