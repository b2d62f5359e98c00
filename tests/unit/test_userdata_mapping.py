"""The runbook's two tables, field by field on hand-written documents, and their invariants on every generated
document: deterministic ids, counts and flags, nothing lost, and the inverse giving back each original exactly."""

from __future__ import annotations

import re
from datetime import datetime

import pytest
from bson.int64 import Int64
from bson.objectid import ObjectId

from common.connectors.mongo_source import decode_id, encode_id
from common.migrations.userdata_fixtures import bad_documents, documents
from common.migrations.userdata_mapping import (LEGACY, LEGACY_ABSENT, BadDocument, differences, identical, join,
                                                split)

OID = ObjectId("65a1b2c3d4e5f60718293a4b")
AT = datetime(2025, 3, 4, 5, 6, 7, 123000)


def modern() -> dict:
    return {
        "_id": OID, "user_id": "u1", "filename": "f.csv", "original_filename": "Sales.csv", "s3_url": "s3://b/f.csv",
        "num_rows": 10, "num_columns": 2,
        "data_schema": [{"name": "a", "type": "integer", "nullable": False, "sample_values": [1, 2]},
                        {"name": "b", "type": "string", "nullable": True}],
        "contains_pii": True, "pii_report": {"email": {"columns": ["b"]}}, "pii_risk_level": "high", "pii_masked": False,
        "is_processed": True, "processed_at": AT, "schema": {"columns": {"a": {"type": "integer"}}},
        "statistics": {"a": {"mean": 1.5}}, "quality_report": {"score": 97.5}, "data_preview": [{"a": 1, "b": "x"}],
        "aiSummary": "Sales by region.", "file_type": "xlsx", "onboarding_progress": {"step": 3},
        "created_at": AT, "updated_at": AT, "file_path": "/data/f.csv",
        "transformation_history": [{"operation": "fill_missing", "column": "a", "params": {"strategy": "mean"},
                                    "timestamp": AT}],
    }


def test_dataset_metadata_row_by_row():
    metadata, _ = split(modern())
    assert metadata == {
        "_id": OID, "dataset_id": "65a1b2c3d4e5f60718293a4b", "user_id": "u1", "filename": "f.csv",
        "original_filename": "Sales.csv", "s3_url": "s3://b/f.csv", "num_rows": 10, "num_columns": 2,
        "data_schema": [{"name": "a", "data_type": "integer", "nullable": False, "sample_values": [1, 2]},
                        {"name": "b", "data_type": "string", "nullable": True}],
        "pii_report": {"contains_pii": True, "detection_details": {"email": {"columns": ["b"]}}, "risk_level": "high",
                       "masked": False},
        "is_processed": True, "processed_at": AT, "inferred_schema": {"columns": {"a": {"type": "integer"}}},
        "statistics": {"a": {"mean": 1.5}}, "quality_report": {"score": 97.5}, "data_preview": [{"a": 1, "b": "x"}],
        "ai_summary": "Sales by region.", "file_type": "xlsx", "onboarding_progress": {"step": 3},
        "created_at": AT, "updated_at": AT,
    }


def test_transformation_config_row_by_row():
    _, config = split(modern())
    assert config == {
        "_id": "65a1b2c3d4e5f60718293a4b_config", "config_id": "65a1b2c3d4e5f60718293a4b_config",
        "dataset_id": "65a1b2c3d4e5f60718293a4b", "user_id": "u1",
        "transformation_steps": [{"order": 1, "transformation_type": "fill_missing", "column": "a",
                                  "parameters": {"strategy": "mean"}, "applied_at": AT}],
        "current_file_path": "/data/f.csv", "is_applied": True, "applied_at": AT, "total_transformations": 1,
        "created_at": AT, "updated_at": AT,
    }


def test_row_count_preferred_file_type_defaulted_absent_stays_absent():
    doc = {"_id": "d1", "user_id": "u1", "num_rows": 5, "row_count": 7, "created_at": AT}
    metadata, config = split(doc)
    assert metadata["num_rows"] == 7 and metadata["file_type"] == "csv"
    assert "s3_url" not in metadata and "pii_report" not in metadata and "current_file_path" not in config
    assert config["is_applied"] is False and config["applied_at"] is None and config["total_transformations"] == 0
    assert config["transformation_steps"] == []
    # what the tables cannot give back is kept: row_count and the source's own num_rows; file_type was added
    assert metadata[LEGACY] == {"row_count": 7, "num_rows": 5}
    assert set(metadata[LEGACY_ABSENT]) == {"file_type", "transformation_history"}
    assert identical(join(metadata, config), doc)


def test_unmapped_fields_and_legacy_spellings_are_kept():
    doc = {**modern(), "legacy": {"uploaded_via": "v1", "flags": [1, 2.5, True, None]}, "tags": ["raw"],
           "data_schema": [{"column_name": "a", "data_type": "integer"}], "updated_at": "2025-03-04T05:06:07Z",
           "transformation_history": [{"type": "normalize", "parameters": {}, "applied_at": "2025-03-04T05:06:07Z"}]}
    metadata, config = split(doc)
    assert metadata["data_schema"] == [{"name": "a", "data_type": "integer"}]
    assert config["transformation_steps"][0]["applied_at"] == datetime(2025, 3, 4, 5, 6, 7)
    assert config["applied_at"] == datetime(2025, 3, 4, 5, 6, 7) and metadata["updated_at"] == "2025-03-04T05:06:07Z"
    assert set(metadata[LEGACY]) == {"legacy", "tags", "data_schema", "transformation_history"}
    assert differences(join(metadata, config), doc) == []


@pytest.mark.parametrize("doc,reason", bad_documents(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_documents_are_rejected_with_a_reason(doc, reason):
    with pytest.raises(BadDocument, match=re.escape(reason.split("'")[0])):
        split(doc)


def test_invariants_on_every_generated_document():
    docs = list(documents(3_000, users=15, seed=7))
    assert len({d["_id"] for d in docs}) == len(docs)
    for doc in docs:
        metadata, config = split(doc)
        history = doc.get("transformation_history") or []
        assert metadata["_id"] == doc["_id"] and metadata["dataset_id"] == str(doc["_id"])
        assert config["_id"] == config["config_id"] == f"{doc['_id']}_config" and config["dataset_id"] == str(doc["_id"])
        assert metadata["user_id"] == config["user_id"] == doc["user_id"]
        assert config["total_transformations"] == len(history) == len(config["transformation_steps"])
        assert config["is_applied"] is bool(history) and (config["applied_at"] is None) is (not history)
        assert metadata.get("num_rows") == (doc["row_count"] if doc.get("row_count") is not None else doc.get("num_rows"))
        assert metadata["file_type"] == (doc.get("file_type") or "csv")
        assert ("pii_report" in metadata) is any(k in doc for k in ("contains_pii", "pii_report", "pii_risk_level",
                                                                    "pii_masked"))
        rebuilt = join(metadata, config)
        assert identical(rebuilt, doc), differences(rebuilt, doc)


def test_identical_is_strict_about_types():
    assert identical({"a": 1, "b": [1.5, None]}, {"b": [1.5, None], "a": Int64(1)})
    assert not identical(1, 1.0) and not identical(1, True) and not identical("1", 1)
    assert not identical(OID, str(OID)) and identical(float("nan"), float("nan"))
    assert differences({"a": {"b": 1}}, {"a": {"b": 1.0}}) == ["a.b: int vs float"]
    assert differences({"a": 1}, {}) == ["a: present vs absent"]


def test_chunk_boundaries_keep_the_id_type():
    for value in (OID, "user:1:x", 42):
        back = decode_id(encode_id(value))
        assert back == value and type(back) is type(value)
