"""`model-files` chunk by chunk (no Celery) into a real PostgreSQL, and the users' API on the same table."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import joblib
import psycopg
import pytest

from common.errors import ConfigError
from common.migrations.base import Selection
from common.migrations.model_files import ModelFiles
from common.migrations.model_files_fixtures import build_tree, same_model
from common.model_store import versioning
from common.models_api import (ModelNotFound, deactivate_model, latest_version, list_versions, load_model,
                               save_model)

NAMES = 12  # × 4 events × 3 types = 144 files


@pytest.fixture(scope="module")
def template_tree(tmp_path_factory):
    return build_tree(tmp_path_factory.mktemp("models-template") / "root", names=NAMES)


@pytest.fixture
def tree(template_tree, tmp_path):
    """A copy of the generated tree this test may change; objects keyed by the copy's paths."""
    root = tmp_path / "root"
    shutil.copytree(template_tree.root, root, symlinks=True)
    objects = {str(root / Path(p).relative_to(template_tree.root)): o for p, o in template_tree.objects.items()}
    return root, objects


def migrate(root: Path, url: str, **flags) -> tuple[ModelFiles, list]:
    """Plan and run every chunk in this process; returns the migration and the chunk outcomes."""
    migration = ModelFiles(f"file://{root}", url, ModelFiles.plan_options(**flags))
    migration.check_services()
    migration.prepare_target()
    outcomes = [migration.run_chunk(spec, lambda n: None) for spec in migration.plan_chunks(Selection(), 1000)]
    return migration, outcomes


def totals(outcomes) -> dict[str, int]:
    counts = {"read": 0, "inserted": 0, "unchanged": 0, "rejected": 0, "updated": 0, "deleted": 0}
    for o in outcomes:
        counts["read"] += o.rows_read
        counts["rejected"] += len(o.rejects)
        for k, v in o.totals().as_dict().items():
            counts[k] += v
    return counts


def rows(url: str, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()


def sha256_of(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_tree_migrates_whole_with_every_hash_and_loads_back_equal(tree, fresh_db):
    root, objects = tree
    migration, outcomes = migrate(root, fresh_db)
    assert totals(outcomes) == {"read": len(objects), "inserted": len(objects), "unchanged": 0, "rejected": 0,
                                "updated": 0, "deleted": 0}
    stored = {path: (h, db_hash, active) for path, h, db_hash, active in rows(
        fresh_db, "SELECT source_path, content_hash, encode(sha256(model_binary), 'hex'), is_active FROM models")}
    assert set(stored) == set(objects)
    for path, (content_hash, db_hash, active) in stored.items():
        assert content_hash == db_hash == sha256_of(path) and active
    # versions per name are 1..n, in relative-path order
    for name, versions in rows(fresh_db, "SELECT name, array_agg(version ORDER BY source_path) FROM models GROUP BY 1"):
        assert versions == list(range(1, len(versions) + 1)), name
    for path, original in objects.items():
        name, event, model_type = Path(path).name.rsplit(".", 1)[0].split("__")
        loaded, version = load_model(fresh_db, name, event, model_type)
        assert same_model(loaded, original) and version >= 1
    names = sorted({Path(p).name.split("__")[0] for p in objects})
    checks = migration.verify(Selection(), names, {})
    assert all(c.ok for c in checks) and sum(c.source_rows for c in checks) == len(objects)
    assert migration.after_run(names) == [f"read from root {root}: {len(objects)} model files"]


def test_rerun_inserts_nothing_and_a_changed_file_becomes_one_new_active_version(tree, fresh_db):
    root, objects = tree
    migrate(root, fresh_db)
    before = rows(fresh_db, "SELECT id, name, version, is_active, content_hash FROM models ORDER BY id")
    _, outcomes = migrate(root, fresh_db)
    assert totals(outcomes)["inserted"] == 0 and totals(outcomes)["unchanged"] == len(objects)
    assert rows(fresh_db, "SELECT id, name, version, is_active, content_hash FROM models ORDER BY id") == before

    changed = sorted(objects)[5]
    name, event, model_type = Path(changed).name.rsplit(".", 1)[0].split("__")
    old_version = latest_version(fresh_db, name, event, model_type)
    joblib.dump({"retrained": True}, changed)
    _, outcomes = migrate(root, fresh_db)
    assert totals(outcomes)["inserted"] == 1 and totals(outcomes)["unchanged"] == len(objects) - 1
    versions = list_versions(fresh_db, name, event, model_type)
    assert [(v.version, v.is_active) for v in versions] == [(old_version, False), (max(r[2] for r in before
                                                             if r[1] == name) + 1, True)]
    assert load_model(fresh_db, name, event, model_type)[0] == {"retrained": True}
    assert same_model(load_model(fresh_db, name, event, model_type, version=old_version)[0], objects[changed])
    assert len(rows(fresh_db, "SELECT 1 FROM models")) == len(objects) + 1
    # files removed from disk leave their versions in place
    os.remove(changed)
    _, outcomes = migrate(root, fresh_db)
    assert totals(outcomes)["deleted"] == 0 and len(rows(fresh_db, "SELECT 1 FROM models")) == len(objects) + 1


def test_corrupt_empty_oversized_and_escaping_files_are_rejects(tree, fresh_db, tmp_path):
    root, objects = tree
    outside = tmp_path / "secret.joblib"
    joblib.dump({"secret": 1}, outside)
    bad = {
        "bad__e__corrupt.joblib": "not a joblib or pickle file by its header",
        "bad__e__empty.joblib": "empty file",
        "bad__e__huge.joblib": "over the limit",
        "bad__e__escape.joblib": "symlink out of the roots",
        "bad__e__" + "t" * 60 + ".joblib": "longer than 50 characters",
    }
    (root / "bad__e__corrupt.joblib").write_bytes(b"<html>not a model</html>")
    (root / "bad__e__empty.joblib").write_bytes(b"")
    joblib.dump(os.urandom(3 << 20), root / "bad__e__huge.joblib")
    os.symlink(outside, root / "bad__e__escape.joblib")
    joblib.dump({"long": 1}, root / ("bad__e__" + "t" * 60 + ".joblib"))
    joblib.dump({"fine": 1}, root / "bad__e__fine.joblib")
    migration, outcomes = migrate(root, fresh_db, max_file_mb=2)
    rejects = {r.key: r.reason for o in outcomes for r in o.rejects}
    assert set(rejects) == {str(root / name) for name in bad}
    for name, reason in bad.items():
        assert reason in rejects[str(root / name)]
    assert totals(outcomes)["inserted"] == len(objects) + 1
    assert load_model(fresh_db, "bad", "e", "fine")[0] == {"fine": 1}
    check = next(c for c in migration.verify(Selection(), ["bad"], {"bad": len(bad)}) if c.partition == "bad")
    assert check.ok and check.source_rows == len(bad) + 1 and check.target_rows == 1
    assert not next(c for c in migration.verify(Selection(), ["bad"], {}) if c.partition == "bad").ok


def test_two_writers_on_one_name_never_duplicate_nor_skip_a_version(fresh_db):
    """Each writer adds 25 contents to the same name at the same time, committing each: the advisory
    lock makes them take turns, so the name gets versions 1..50, one active per model."""
    save_model(fresh_db, {"seed": 0}, "shared", "e", "t")  # creates the table: version 1
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def writer(tag: str) -> None:
        try:
            with psycopg.connect(fresh_db) as conn:
                start.wait()
                for i in range(25):
                    data = joblib_bytes({"writer": tag, "i": i})
                    with versioning(conn, "shared") as w:
                        w.add("e", "t" if i % 2 else "u", hashlib.sha256(data).hexdigest(), len(data), [data], tag)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    versions = [v for (v,) in rows(fresh_db, "SELECT version FROM models WHERE name = 'shared' ORDER BY version")]
    assert versions == list(range(1, 52))
    active = rows(fresh_db, "SELECT model_type, max(version) FILTER (WHERE is_active), count(*) FILTER (WHERE is_active)"
                  " FROM models WHERE name = 'shared' GROUP BY 1")
    newest = dict(rows(fresh_db, "SELECT model_type, max(version) FROM models WHERE name = 'shared' GROUP BY 1"))
    assert {t: (v, n) for t, v, n in active} == {t: (newest[t], 1) for t in newest}


def test_the_same_chunk_twice_at_once_stores_each_file_once(tree, fresh_db):
    root, objects = tree
    migration = ModelFiles(f"file://{root}", fresh_db, ModelFiles.plan_options())
    migration.prepare_target()
    spec = next(iter(migration.plan_chunks(Selection(), 1000)))
    twins = [ModelFiles(f"file://{root}", fresh_db, ModelFiles.plan_options()) for _ in range(2)]
    outcomes: list = []
    start = threading.Barrier(2)

    def run(m: ModelFiles) -> None:
        start.wait()
        outcomes.append(m.run_chunk(spec, lambda n: None))

    threads = [threading.Thread(target=run, args=(m,)) for m in twins]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    inserted = sorted(o.totals().inserted for o in outcomes)
    assert inserted == [0, spec.est_rows]
    per_name = rows(fresh_db, "SELECT name, count(*), count(DISTINCT version), max(version) FROM models"
                              " WHERE name BETWEEN %s AND %s GROUP BY name", (spec.lo, spec.hi))
    assert len(per_name) > 1 and sum(n for _, n, _, _ in per_name) == spec.est_rows  # a chunk of several names
    assert all(n == distinct == top for _, n, distinct, top in per_name)


def joblib_bytes(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    joblib.dump(obj, buffer)
    return buffer.getvalue()


def test_an_existing_reference_table_is_adopted_and_its_versions_continue(tree, fresh_db):
    root, objects = tree
    name = sorted(objects)[0]
    model = Path(name).name.rsplit(".", 1)[0].split("__")
    with psycopg.connect(fresh_db) as conn:  # the reference schema, as its own SQL creates it
        conn.execute("CREATE TABLE models (id SERIAL PRIMARY KEY, name VARCHAR(255) NOT NULL, version INTEGER NOT NULL,"
                     " model_type VARCHAR(50) NOT NULL, event VARCHAR(255) NOT NULL, model_binary BYTEA NOT NULL,"
                     " created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, is_active BOOLEAN DEFAULT TRUE,"
                     " UNIQUE(name, version))")
        conn.execute("INSERT INTO models (name, version, model_type, event, model_binary) VALUES (%s, 7, %s, %s, %s)",
                     (model[0], model[2], model[1], Path(name).read_bytes()))
    _, outcomes = migrate(root, fresh_db)
    assert totals(outcomes)["inserted"] == len(objects) - 1  # the row already there had the same content
    assert rows(fresh_db, "SELECT min(version) FROM models WHERE name = %s AND version <> 7", (model[0],)) == [(8,)]
    assert rows(fresh_db, "SELECT count(*) FROM models WHERE content_hash IS NULL") == [(0,)]


def test_a_table_of_another_shape_is_refused(tree, fresh_db):
    root, _ = tree
    with psycopg.connect(fresh_db) as conn:
        conn.execute("CREATE TABLE models (id int, name text)")
    with pytest.raises(ConfigError, match="not with the models schema"):
        migrate(root, fresh_db)


def test_users_api(fresh_db):
    assert save_model(fresh_db, {"a": 1}, "churn", "signup", "regression") == 1
    assert save_model(fresh_db, {"a": 1}, "churn", "signup", "regression") == 1  # same content: same version
    assert save_model(fresh_db, {"a": 2}, "churn", "signup", "regression") == 2
    assert save_model(fresh_db, [1, 2], "churn", "renewal", "vectorizer") == 3  # versions count per name
    assert load_model(fresh_db, "churn", "signup", "regression") == ({"a": 2}, 2)
    assert load_model(fresh_db, "churn", "signup", "regression", version=1) == ({"a": 1}, 1)
    assert latest_version(fresh_db, "churn", "signup", "regression") == 2
    assert deactivate_model(fresh_db, "churn", "signup", "regression", 2) is True
    assert deactivate_model(fresh_db, "churn", "signup", "regression", 2) is False
    assert latest_version(fresh_db, "churn", "signup", "regression", active_only=True) is None
    with pytest.raises(ModelNotFound, match="no active version"):
        load_model(fresh_db, "churn", "signup", "regression")
    with pytest.raises(ModelNotFound):
        deactivate_model(fresh_db, "churn", "signup", "regression", 9)
    listed = [(v.name, v.version, v.event, v.is_active) for v in list_versions(fresh_db, "churn")]
    assert listed == [("churn", 1, "signup", False), ("churn", 2, "signup", False), ("churn", 3, "renewal", True)]
    with psycopg.connect(fresh_db) as conn:  # an open connection works as well as a URL
        assert load_model(conn, "churn", "renewal", "vectorizer") == ([1, 2], 3)


def test_two_roots_versions_in_path_order_and_the_report_names_each_root(fresh_db, tmp_path):
    """The same relative path under two roots: both contents stored, the second root's as the newer
    version; a pattern with directories; every check and action names the roots the files came from."""
    first, second = tmp_path / "nfs-a", tmp_path / "nfs-b"
    for root, value in ((first, "a"), (second, "b")):
        (root / "churn" / "signup").mkdir(parents=True)
        joblib.dump({"from": value}, root / "churn" / "signup" / "regression.joblib")
    joblib.dump({"only": "a"}, first / "churn" / "signup" / "vectorizer.joblib")
    url = f"file://{first},{second}"
    pattern = "{name}/{event}/{model_type}.joblib"
    migration = ModelFiles(url, fresh_db, ModelFiles.plan_options(name_pattern=pattern))
    migration.prepare_target()
    (spec,) = migration.plan_chunks(Selection(), 1000)
    assert (spec.partition, spec.lo, spec.hi, spec.est_rows) == ("churn", "churn", "churn", 3)  # names [lo, hi]
    assert migration.run_chunk(spec, lambda n: None).totals().inserted == 3
    assert [(v.version, v.model_type, v.is_active, v.source_path) for v in list_versions(fresh_db, "churn")] == [
        (1, "regression", False, str(first / "churn/signup/regression.joblib")),
        (2, "regression", True, str(second / "churn/signup/regression.joblib")),
        (3, "vectorizer", True, str(first / "churn/signup/vectorizer.joblib"))]
    assert load_model(fresh_db, "churn", "signup", "regression")[0] == {"from": "b"}
    (check,) = migration.verify(Selection(), ["churn"], {})
    assert check.ok and check.detail == f"files from {first} (2), {second} (1)"
    assert migration.after_run(["churn"]) == [f"read from root {first}: 2 model files",
                                              f"read from root {second}: 1 model file"]
    assert migration.run_chunk(spec, lambda n: None).totals().unchanged == 3  # and again: nothing new


def counting_reads(migration: ModelFiles) -> list[str]:
    """Paths the migration reads from now on (each read hashes the whole file)."""
    read, original = [], migration.source.read

    def read_and_note(file, *args, **kwargs):
        read.append(file.path)
        return original(file, *args, **kwargs)

    migration.source.read = read_and_note
    return read


def rerun(root: Path, url: str, **flags) -> tuple[ModelFiles, list, list[str]]:
    migration = ModelFiles(f"file://{root}", url, ModelFiles.plan_options(**flags))
    read = counting_reads(migration)
    outcomes = [migration.run_chunk(spec, lambda n: None) for spec in migration.plan_chunks(Selection(), 1000)]
    return migration, outcomes, read


def test_rerun_reads_only_files_whose_size_or_mtime_changed_and_the_hash_decides(tree, fresh_db):
    root, objects = tree
    migrate(root, fresh_db)
    _, outcomes, read = rerun(root, fresh_db)
    assert read == [] and totals(outcomes)["unchanged"] == len(objects)
    touched = sorted(objects)[3]
    os.utime(touched, ns=(1, 1))  # same bytes, another mtime: read again, and its hash says unchanged
    _, outcomes, read = rerun(root, fresh_db)
    assert read == [touched] and totals(outcomes)["inserted"] == 0
    _, outcomes, read = rerun(root, fresh_db)
    assert read == []  # its new mtime was recorded
    _, outcomes, read = rerun(root, fresh_db, recompute=True)
    assert sorted(read) == sorted(objects) and totals(outcomes)["inserted"] == 0


def test_packed_chunks_cover_every_name_once_and_a_selection_gets_one_chunk_per_name(tree, fresh_db):
    root, objects = tree
    migration = ModelFiles(f"file://{root}", fresh_db, ModelFiles.plan_options())
    specs = list(migration.plan_chunks(Selection(), 1000))
    names = sorted({Path(p).name.split("__")[0] for p in objects})
    assert 1 < len(specs) < len(names)
    covered = [n for s in specs for n in names if s.lo <= n <= s.hi]
    assert covered == names and sum(s.est_rows for s in specs) == len(objects)
    assert [(p.partition, p.rows) for p in migration.count_partitions(Selection())] == \
        [(s.partition, s.est_rows) for s in specs]
    chosen = Selection(model_names=tuple(names[:3]))
    assert [(s.partition, s.lo, s.hi) for s in migration.plan_chunks(chosen, 1000)] == [(n, n, n) for n in names[:3]]


def test_verify_compares_recorded_hashes_and_on_request_every_binary(tree, fresh_db):
    root, objects = tree
    migration, _ = migrate(root, fresh_db)
    labels = [s.partition for s in migration.plan_chunks(Selection(), 1000)]
    assert all(c.ok for c in migration.verify(Selection(), labels, {}))
    victim = sorted(objects)[0]
    with psycopg.connect(fresh_db) as conn:  # the same length, other bytes: only re-hashing sees it
        conn.execute("UPDATE models SET model_binary = overlay(model_binary PLACING '\\x00'::bytea FROM 40)"
                     " WHERE source_path = %s", (victim,))
    assert all(c.ok for c in migration.verify(Selection(), labels, {}))
    deep = ModelFiles(f"file://{root}", fresh_db, ModelFiles.plan_options(options={"verify_bytes": "true"}))
    bad = [c for c in deep.verify(Selection(), labels, {}) if not c.ok]
    assert len(bad) == 1 and "do not hash to their content_hash" in bad[0].detail
    with psycopg.connect(fresh_db) as conn:  # a stored hash that is not the one read
        conn.execute("UPDATE models SET content_hash = 'x' WHERE source_path = %s", (victim,))
    bad = [c for c in migration.verify(Selection(), labels, {}) if not c.ok]
    assert len(bad) == 1 and "matches no stored version" in bad[0].detail
