"""Migration files: what a user gets told when one is wrong (file, line, key), and the mapping's rules."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from common.declarative.catalogue import migration_for, scan
from common.declarative.loader import expand_env, parse_spec
from common.declarative.mapping import Mapper, MappingError
from common.declarative.spec import MigrationSpec
from common.errors import ConfigError

GOOD = """\
[migration]
name = "predictions-compact"
summary = "Archived predictions into the compact table"

[source]
table = "archived_predictions"
key = ["id"]
partition = "deployment_id"

[target]
table = "predictions"
indexes = [["deployment_id", "created_at"]]

[columns]
prediction_id = { from = "id" }
score = { from = "payload", path = "$.score", cast = "float" }
created_at = { from = "ts_ms", transform = "epoch_ms_to_timestamp" }
region = { constant = "eu" }
email = { from = "email", transform = "lower" }

[options]
drop = ["debug_blob"]
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_spec(text, "migrations/p.toml")
    return str(caught.value)


def test_a_good_file_gives_the_spec_and_survives_the_run_options():
    spec = parse_spec(GOOD, "p.toml")
    assert spec.name == "predictions-compact"
    assert spec.source.kind == "postgres" and spec.target.kind == "postgres"
    assert spec.source.chunk_by == "id"  # the first key column by default
    assert spec.target_key == ("prediction_id",)
    assert MigrationSpec.from_dict(spec.as_dict()) == spec


@pytest.mark.parametrize("old, new, expected", [
    ('cast = "float"', 'cast = "double"', "migrations/p.toml:16: columns.score.cast: unknown cast 'double'; use one of: "
     "text, int, float, bool, timestamp, json"),
    ('transform = "lower"', 'transform = "lowercase"', "migrations/p.toml:19: columns.email.transform: unknown "
     "transform 'lowercase'"),
    ('path = "$.score"', 'path = "score"', "migrations/p.toml:16: columns.score.path: path 'score': use $ followed by"),
    ('key = ["id"]', 'kee = ["id"]', "migrations/p.toml:7: source.kee: unknown key 'kee' in [source]"),
    ('name = "predictions-compact"', 'name = "Predictions Compact"', "migrations/p.toml:2: migration.name: name "
     "'Predictions Compact': use lowercase letters"),
    ('table = "predictions"', 'collection = "predictions"\ntable = "x"', "migrations/p.toml:11: target.collection: give "
     "exactly one of table or collection in [target]"),
    ('drop = ["debug_blob"]', 'drop = ["debug_blob"]\nkeep_unmapped = "yes"', "migrations/p.toml:23: "
     "options.keep_unmapped: keep_unmapped must be true or false"),
    ('region = { constant = "eu" }', 'region = { constant = "eu", from = "x" }', "migrations/p.toml:18: "
     "columns.region.constant: columns.region: a constant takes no from, path or transform"),
    ('prediction_id = { from = "id" }', 'prediction_id = { from = "id", transform = "trim" }',
     "migrations/p.toml:7: source.key: key column 'id' must reach the target as it is"),
    ('[source]', '[source]\nurl = "postgresql://app:secret@db/app"', "migrations/p.toml:6: source.url: no passwords "
     "in migration files: write ${ENV_VAR} in its place"),
    ('[source]', '[source]\nurl = "postgresql://app@db/app?password=secret"', "migrations/p.toml:6: source.url: "
     "no passwords in migration files"),
    ('[source]', '[source]\nurl = "mongodb://db/app"', "migrations/p.toml:6: source.url: source names a table or "
     "query, so its url must start with postgresql://"),
])
def test_errors_name_file_line_and_key(old, new, expected):
    assert old in GOOD
    assert expected in error_of(GOOD.replace(old, new, 1))


def test_a_missing_section_and_bad_toml_are_named_too():
    assert error_of(GOOD.replace("[target]", "[targets]")) == (
        "migrations/p.toml:10: targets: unknown section [targets]; use: migration, source, target, columns, options, "
        "validate")
    assert error_of(GOOD.replace('key = ["id"]', 'key = ["id"')).startswith("migrations/p.toml:8: not valid TOML:")
    assert error_of(GOOD.replace("[migration]\n", "").replace('name = "predictions-compact"\n', "").replace(
        'summary = "Archived predictions into the compact table"\n', "")) == "migrations/p.toml: missing section [migration]"


def test_a_mongodb_source_is_keyed_and_cut_by_id():
    text = GOOD.replace('table = "archived_predictions"', 'collection = "archived_predictions"').replace(
        'key = ["id"]', "").replace('prediction_id = { from = "id" }', 'prediction_id = { from = "_id", cast = "text" }')
    spec = parse_spec(text, "p.toml")
    assert spec.source.key == ("_id",) and spec.source.chunk_by == "_id"
    assert "chunk_by: a MongoDB source is cut into chunks by _id" in error_of(
        text.replace('partition = "deployment_id"', 'partition = "deployment_id"\nchunk_by = "n"'))


def test_a_password_from_the_environment_is_allowed():
    spec = parse_spec(GOOD.replace("[source]", '[source]\nurl = "postgresql://app:${APP_PW}@db/app?password=${APP_PW}"'),
                      "p.toml")
    assert spec.source.url == "postgresql://app:${APP_PW}@db/app?password=${APP_PW}"


def test_urls_take_passwords_from_the_environment(monkeypatch):
    monkeypatch.setenv("DECL_TEST_PW", "s3cret")
    assert expand_env("postgresql://app:${DECL_TEST_PW}@db/app", "[source] url") == "postgresql://app:s3cret@db/app"
    monkeypatch.delenv("DECL_TEST_PW")
    with pytest.raises(ConfigError, match=r"\[source\] url uses \$\{DECL_TEST_PW\}, which is not set"):
        expand_env("postgresql://app:${DECL_TEST_PW}@db/app", "[source] url")


def mapper(columns: str, options: str = "") -> Mapper:
    return Mapper(parse_spec(GOOD.split("[columns]")[0] + "[columns]\nprediction_id = { from = \"id\" }\n" + columns
                             + "\n[options]\n" + options, "p.toml"))


def test_the_mapping_renames_extracts_casts_transforms_and_copies_the_rest():
    m = mapper('score = { from = "payload", path = "$.scores[1].v", cast = "float" }\n'
               'at = { from = "ts", transform = "epoch_s_to_timestamp" }\n'
               'name = { from = "name", transform = "trim" }\nflag = { from = "flag", cast = "bool" }\n'
               'n = { from = "n", cast = "int" }\nregion = { constant = "eu" }', 'drop = ["junk"]')
    row = {"id": 1, "payload": '{"scores": [{"v": 1}, {"v": "2.5"}]}', "ts": 0, "name": "  a ", "flag": "yes",
           "n": "42", "deployment_id": "d", "junk": "x", "other": [1]}
    assert m.apply(row) == {"prediction_id": 1, "score": 2.5, "at": datetime(1970, 1, 1, tzinfo=timezone.utc),
                            "name": "a", "flag": True, "n": 42, "region": "eu", "deployment_id": "d", "other": [1]}


@pytest.mark.parametrize("columns, row, reason", [
    ('n = { from = "n", cast = "int" }', {"n": "4.5"}, "n: int of n: '4.5' is not an integer"),
    ('n = { from = "n", cast = "int" }', {"n": 2 ** 70}, "is out of the 64-bit integer range"),
    ('s = { from = "p", path = "$.a" }', {"p": "{not json"}, "s: p is not valid JSON"),
    ('s = { from = "p", path = "$.a" }', {"p": {"b": 1}}, "s: path $.a in 'p' is missing"),
    ('t = { from = "t", cast = "timestamp" }', {"t": "yesterday"}, "'yesterday' is not an ISO 8601 time"),
    ('e = { from = "e", transform = "lower" }', {"e": 5}, "e: lower of e: lower needs text, got int"),
    ('e = { from = "e" }', {}, "e: field 'e' is missing"),
])
def test_rows_that_break_the_mapping_say_why(columns, row, reason):
    with pytest.raises(MappingError, match=None) as caught:
        mapper(columns).apply({"id": 1, "deployment_id": "d", **row})
    assert reason in str(caught.value)


def test_optional_gives_null_and_keep_unmapped_false_copies_nothing_else():
    with pytest.raises(ConfigError, match="p.toml:8: source.partition: partition column 'deployment_id' must reach "
                       "the target as it is"):
        mapper('s = { from = "p", path = "$.a", optional = true }', "keep_unmapped = false")
    m = mapper('s = { from = "p", path = "$.a", optional = true }\ndeployment = "deployment_id"', "keep_unmapped = false")
    assert m.apply({"id": 1, "deployment_id": "d", "p": {}, "x": 1}) == {"prediction_id": 1, "s": None,
                                                                        "deployment": "d"}


def test_the_folder_lists_good_and_bad_files_and_runs_them_by_name(tmp_path):
    (tmp_path / "a.toml").write_text(GOOD)
    (tmp_path / "b.toml").write_text(GOOD.replace('cast = "float"', 'cast = "double"'))
    (tmp_path / "c.toml").write_text(GOOD)  # the same name again
    (tmp_path / "d.toml").write_text(GOOD.replace('"predictions-compact"', '"modmon"'))
    listed = {item.path.name: item for item in scan(tmp_path)}
    assert listed["a.toml"].spec is not None and listed["a.toml"].error is None
    assert listed["b.toml"].error.endswith("b.toml:16: columns.score.cast: unknown cast 'double'; use one of: text, "
                                           "int, float, bool, timestamp, json")
    assert "name 'predictions-compact' is also declared in" in listed["c.toml"].error
    assert "name 'modmon' is a built-in migration's" in listed["d.toml"].error
    assert migration_for("predictions-compact", tmp_path).name == "predictions-compact"
    assert migration_for(str(tmp_path / "a.toml"), None).spec.target.table == "predictions"
    assert migration_for("modmon", tmp_path).name == "modmon"
    with pytest.raises(ConfigError, match="unknown migration 'nosuch'; available: .*predictions-compact"):
        migration_for("nosuch", tmp_path)


def test_the_listing_shows_a_bad_files_error_whole_on_80_columns(tmp_path):
    from rich.console import Console

    from producer.display import show_migrations

    (tmp_path / "typo.toml").write_text('[migration]\nname = "x"\n[source]\ntabel = "events"\nkey = ["id"]\n'
                                        '[target]\ntable = "t"\n')
    console = Console(width=80, record=True, color_system=None)
    show_migrations(console, tmp_path)
    cells = " ".join(part.strip() for line in console.export_text().splitlines() for part in line.split("│")[1:])
    assert "invalid:" in cells and "unknown key 'tabel' in [source]" in " ".join(cells.split())
