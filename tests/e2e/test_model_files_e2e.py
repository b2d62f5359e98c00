"""`shuttle run model-files` as users run it, with two real workers reading a generated tree of joblib files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import joblib
import psycopg
import pytest

from common.migrations.model_files_fixtures import build_tree, same_model
from common.models_api import load_model
from tests.conftest import create_db, drop_db

pytestmark = pytest.mark.e2e
MIGRATION = "model-files"
NAMES = 30  # × 4 events × 3 types = 360 files


@pytest.fixture(scope="module")
def target():
    name = f"shuttle_mf_{os.getpid()}_e2e"
    yield create_db(name)
    drop_db(name)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return build_tree(tmp_path_factory.mktemp("model-files") / "models", names=NAMES)


def run(e2e, tree, target, *args: str) -> tuple[int, dict]:
    return e2e.run_json("run", MIGRATION, "--source-url", f"file://{tree.root}", "--target-url", target, *args)


def sql(url: str, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()


def model_of(path: str) -> tuple[str, str, str]:
    name, event, model_type = Path(path).name.rsplit(".", 1)[0].split("__")
    return name, event, model_type


def test_generated_tree_migrates_clean_every_hash_checked_and_loads_equal(e2e, tree, target):
    code, report = run(e2e, tree, target)
    assert code == 0, report["verdict_reason"]
    totals = report["totals"]
    assert totals["source_rows"] == totals["rows_read"] == tree.files
    assert totals["rows_rejected"] == 0
    assert totals["targets"]["models"] == {"inserted": tree.files, "updated": 0, "unchanged": 0, "deleted": 0,
                                           "target_rows": tree.files}
    assert 1 < report["chunks"]["total"] < NAMES  # small names packed, several per chunk
    assert len(report["checks"]) == report["chunks"]["total"] and all(c["ok"] for c in report["checks"])
    assert sum(c["source_rows"] for c in report["checks"]) == tree.files
    assert report["actions"] == [f"read from root {tree.root}: {tree.files} model files"]
    stored = dict(sql(target, "SELECT source_path, content_hash FROM models WHERE content_hash = "
                              "encode(sha256(model_binary), 'hex')"))
    assert stored == {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in tree.objects}
    for path, original in tree.objects.items():
        assert same_model(load_model(target, *model_of(path))[0], original), path


def test_rerun_inserts_nothing(e2e, tree, target):
    code, report = run(e2e, tree, target)
    assert code == 0, report["verdict_reason"]
    assert report["totals"]["rows_written"] == 0
    assert report["totals"]["targets"]["models"]["unchanged"] == tree.files
    assert "nothing changed" in report["verdict_reason"]


def test_changed_file_new_version_and_bad_files_rejected_run_completes(e2e, tree, target, tmp_path):
    changed = sorted(tree.objects)[0]
    name, event, model_type = model_of(changed)
    (old_version,) = sql(target, "SELECT version FROM models WHERE source_path = %s", (changed,))[0]
    joblib.dump({"retrained": 2}, changed)
    root = tree.root
    (root / "broken__e__t.joblib").write_bytes(b"\x00\x01garbage")
    (root / "broken__e__empty.pkl").write_bytes(b"")
    joblib.dump(os.urandom(2 << 20), root / "broken__e__huge.joblib")
    outside = tmp_path / "elsewhere.joblib"
    joblib.dump({"outside": True}, outside)
    os.symlink(outside, root / "broken__e__link.joblib")
    try:
        code, report = run(e2e, tree, target, "--max-file-mb", "1")
    finally:
        for bad in ("broken__e__t.joblib", "broken__e__empty.pkl", "broken__e__huge.joblib", "broken__e__link.joblib"):
            os.remove(root / bad)
    assert code == 0, report["verdict_reason"]
    assert report["totals"]["targets"]["models"]["inserted"] == 1
    assert report["totals"]["rows_rejected"] == 4
    reasons = {r["key"]: r["reason"] for r in report["rejects"]["sample"]}
    assert reasons.keys() == {str(root / n) for n in ("broken__e__t.joblib", "broken__e__empty.pkl",
                                                      "broken__e__huge.joblib", "broken__e__link.joblib")}
    assert "not a joblib or pickle file" in reasons[str(root / "broken__e__t.joblib")]
    assert "symlink out of the roots" in reasons[str(root / "broken__e__link.joblib")]
    versions = sql(target, "SELECT version, is_active FROM models WHERE name = %s AND event = %s AND model_type = %s"
                           " ORDER BY version", (name, event, model_type))
    assert versions[0] == (old_version, False) and versions[-1][1] is True and len(versions) == 2
    assert load_model(target, name, event, model_type)[0] == {"retrained": 2}


def test_models_commands(e2e, tree, target):
    listed = e2e.shuttle("models", "list", "--target-url", target, "--json")
    assert listed.returncode == 0, listed.stderr
    active = json.loads(listed.stdout)
    assert len(active) == tree.files and all(v["is_active"] for v in active)
    name, event, model_type = model_of(sorted(tree.objects)[0])
    shown = json.loads(e2e.shuttle("models", "show", name, "--target-url", target, "--json").stdout)
    assert [v["version"] for v in shown] == sorted(v["version"] for v in shown) and len(shown) == 13
    newest = max(v["version"] for v in shown if v["event"] == event and v["model_type"] == model_type)
    result = e2e.shuttle("models", "deactivate", name, event, model_type, str(newest), "--target-url", target)
    assert result.returncode == 0 and "deactivated" in result.stdout
    assert e2e.shuttle("models", "show", "nobody", "--target-url", target).returncode == 2


def test_unknown_model_name_is_a_usage_error(e2e, tree, target):
    result = e2e.shuttle("plan", MIGRATION, "--source-url", f"file://{tree.root}", "--target-url", target,
                         "--model-names", "nobody")
    assert result.returncode == 2 and "no model files named nobody" in result.stderr
    missing = e2e.shuttle("plan", MIGRATION, "--source-url", "file:///no/such/root", "--target-url", target)
    assert missing.returncode == 2 and "not a readable directory" in missing.stderr
