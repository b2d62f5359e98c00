"""Pure parts of mlflow-to-mongo: `_id`s, conversions, and the reference tool's config-file layout."""

import base64
import hashlib
import json

import pytest
from bson.int64 import Int64

from common.errors import ConfigError
from common.migrations.mlflow_mapping import convert_value, document_id, indexes_for, parse_json_text, to_document
from common.settings import load_settings


def test_ids_are_the_key_or_a_short_digest_of_a_composite_key():
    assert document_id(("abc",)) == "abc" and document_id((7,)) == 7
    assert document_id((True,)) == "[true]"
    key = ("loss", 17, 0, "842cfe258353afc4f9dc27a04290f281", 0.5, False)
    digest = hashlib.blake2b(b'["loss",17,0,"842cfe258353afc4f9dc27a04290f281",0.5,false]', digest_size=16).digest()
    assert document_id(key) == base64.urlsafe_b64encode(digest).decode().rstrip("=")
    assert len(document_id(key)) == 22
    others = {document_id(("loss", 17, step, "r1", value, nan)) for step in range(50)
              for value in (0.5, float("inf"), -0.0) for nan in (True, False)}
    assert len(others) == 300  # every key its own `_id`


def test_conversions():
    assert convert_value("runs", "start_time", "bigint", 5) == (Int64(5), False)
    assert type(convert_value("runs", "start_time", "bigint", 5)[0]) is Int64
    assert convert_value("runs", "status", "integer", 3) == ("FINISHED", False)
    assert convert_value("runs", "status", "character varying", "KILLED") == ("KILLED", False)
    assert convert_value("jobs", "status", "integer", 2) == ("SUCCEEDED", False)
    assert convert_value("datasets", "dataset_profile", "text", '{"n": 1}') == ({"n": 1}, False)
    assert convert_value("params", "value", "character varying", '{"n": 1}') == ('{"n": 1}', False)
    assert parse_json_text("not {json") == ("not {json", True)
    assert parse_json_text('{"a.b": 1}') == ('{"a.b": 1}', True)
    assert parse_json_text("42") == ("42", False)
    assert convert_value("metrics", "value", "double precision", 1.7976931348623157e308)[0] == 1.7976931348623157e308


def test_document_keeps_every_column_and_its_partition():
    doc, kept = to_document("metrics", {"key": "text", "value": "double precision", "is_nan": "boolean",
                                        "step": "bigint", "run_uuid": "text"}, ("run_uuid", "key", "step"),
                            {"key": "k", "value": 0.0, "is_nan": True, "step": 3, "run_uuid": "r"}, "1")
    assert doc == {"_id": document_id(("r", "k", 3)), "key": "k", "value": 0.0, "is_nan": True,
                   "step": 3, "run_uuid": "r", "_partition": "1"} and kept == 0


def test_indexes_unique_primary_key_foreign_keys_and_query_paths():
    got = indexes_for("runs", {"run_uuid": "", "experiment_id": "", "start_time": "", "status": ""}, ("run_uuid",),
                      [("experiment_id",)])
    assert ((("run_uuid", 1),), True) in got
    assert ((("experiment_id", 1), ("start_time", -1)), False) in got
    # The foreign key experiment_id leads (experiment_id, start_time): that index serves it, no second one.
    assert ((("experiment_id", 1),), False) not in got
    # The primary-key index leads with the query path made of key fields, and so serves it and the foreign key.
    tags = indexes_for("tags", {"key": "", "value": "", "run_uuid": ""}, ("key", "run_uuid"), [("run_uuid",)])
    assert tags == [((("_partition", 1),), False), ((("run_uuid", 1), ("key", 1)), True)]
    metric_columns = dict.fromkeys(("key", "value", "timestamp", "run_uuid", "step", "is_nan"), "")
    metrics = indexes_for("metrics", metric_columns, ("key", "timestamp", "step", "run_uuid", "value", "is_nan"),
                          [("run_uuid",)])
    assert metrics == [((("_partition", 1),), False),
                       ((("run_uuid", 1), ("key", 1), ("step", 1), ("timestamp", 1), ("value", 1), ("is_nan", 1)), True),
                       ((("timestamp", 1),), False)]
    # A foreign key no longer index starts with keeps an index of its own.
    inputs = indexes_for("inputs", {"input_uuid": "", "source_id": "", "destination_id": ""}, ("input_uuid",),
                         [("source_id",)])
    assert ((("source_id", 1),), False) in inputs


def test_reference_tool_config_files_work(tmp_path):
    path = tmp_path / "migration_config.json"
    path.write_text(json.dumps({"source": {"connection_uri": "postgresql://u:p@h/mlflow"},
                                "destination": {"recommended": "mongodb://localhost:27017/mlflow_migrated"},
                                "migration_settings": {"batch_size": 2000, "dry_run": True, "validate_data": True}}))
    settings = load_settings(path)
    assert settings.source_url == "postgresql://u:p@h/mlflow"
    assert settings.target_url == "mongodb://localhost:27017/mlflow_migrated"
    assert settings.batch_size == 2000 and settings.dry_run is True
    toml = tmp_path / "c.toml"
    toml.write_text('[source]\nuri = "postgresql://h/db"\n[destination]\nuri = "mongodb://m/x"\n[settings]\nsample = 5\n')
    assert load_settings(toml).sample == 5 and load_settings(toml).target_url == "mongodb://m/x"
    toml.write_text('[settings]\nvalidate_data = false\n')
    with pytest.raises(ConfigError, match="always verifies"):
        load_settings(toml)
    toml.write_text('[destination]\nhost = "x"\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) host in \[destination\]"):
        load_settings(toml)
