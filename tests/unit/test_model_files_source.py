"""The files source without services: naming patterns, headers, roots, listing ranges and read rules."""

from __future__ import annotations

import gzip
import os
import pickle
import zlib

import pytest

from common.connectors.files import NamingPattern, Source, roots_from_url, sniff
from common.errors import ConfigError, DataError, TransientError

PICKLE = pickle.dumps({"weights": list(range(50))}, protocol=4)


@pytest.mark.parametrize("path, expected", [
    ("churn__signup__classifier_binary.joblib", ("churn", "signup", "classifier_binary")),
    ("team/sub/ltv__renewal__regression.pkl", ("ltv", "renewal", "regression")),
    ("a__b__c__d.joblib", ("a", "b", "c__d")),  # the first separators win, the type takes the rest
    ("churn__signup.joblib", None),
    ("churn__signup__x.txt", None),
    ("README.md", None),
])
def test_default_pattern(path, expected):
    assert NamingPattern().match(path) == expected


def test_pattern_with_directories_matches_the_whole_relative_path():
    pattern = NamingPattern("{name}/{event}/{model_type}.joblib")
    assert pattern.match("churn/signup/regression.joblib") == ("churn", "signup", "regression")
    assert pattern.match("x/churn/signup/regression.joblib") is None


@pytest.mark.parametrize("pattern", ["{name}.joblib", "{name}_{event}_{model_type}_{version}.pkl",
                                     "{name}_{name}_{event}_{model_type}"])
def test_bad_patterns_are_config_errors(pattern):
    with pytest.raises(ConfigError, match="naming pattern"):
        NamingPattern(pattern)


HEADERS = [
    (PICKLE, "pickle protocol 4"),
    (pickle.dumps(1, protocol=2), "pickle protocol 2"),
    (zlib.compress(PICKLE), "joblib, zlib-compressed"),
    (gzip.compress(PICKLE), "joblib, gzip-compressed"),
    (b"BZh91AY", "joblib, bz2-compressed"),
    (b"\xfd7zXZ\x00\x00", "joblib, xz-compressed"),
]


# Named by kind, not by bytes: gzip's header holds the time, and every test process must collect the same ids.
@pytest.mark.parametrize("head, kind", HEADERS, ids=[kind for _, kind in HEADERS])
def test_headers_of_joblib_and_pickle_files(head, kind):
    assert sniff(head[:8]) == kind


@pytest.mark.parametrize("head", [b"PK\x03\x04", b"{\"a\": 1}", b"\x80\x09", b"(dp0\n", b"", b"\x00" * 8])
def test_other_headers_are_refused(head):
    assert sniff(head) is None


def test_roots_from_url(tmp_path):
    (tmp_path / "a").mkdir()
    os.symlink(tmp_path / "a", tmp_path / "link")
    assert roots_from_url(f"file://{tmp_path}/a,file://{tmp_path}/b") == (f"{tmp_path}/a", f"{tmp_path}/b")
    assert roots_from_url(f"file://{tmp_path}/link, {tmp_path}/a") == (f"{tmp_path}/a",)  # resolved, deduplicated
    for bad in ("postgresql://x/y", "file://relative/path", f"file://{tmp_path},{tmp_path}/a"):
        with pytest.raises(ConfigError):
            roots_from_url(bad)


def _tree(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    for rel in ("m1__e__t.joblib", "m2__e__t.joblib", "sub/m1__f__t.pkl", "sub/m3__e__t.joblib", "notes.txt"):
        (root / rel).write_bytes(PICKLE)
    return root


def test_listing_by_name_and_range(tmp_path):
    source = Source(f"file://{_tree(tmp_path)}")
    every = [f.relpath for f in source.files()]
    assert sorted(every) == ["m1__e__t.joblib", "m2__e__t.joblib", "sub/m1__f__t.pkl", "sub/m3__e__t.joblib"]
    assert source.unmatched == 1
    assert [f.relpath for f in source.files({"m1"})] == ["m1__e__t.joblib", "sub/m1__f__t.pkl"]
    assert [f.relpath for f in source.files({"m1"}, "sub/", "sub/zzz")] == ["sub/m1__f__t.pkl"]
    assert [f.relpath for f in source.files(None, "m2__e__t.joblib", "sub/m1__f__t.pkl")] == [
        "m2__e__t.joblib", "sub/m1__f__t.pkl"]


def test_read_rules(tmp_path):
    root = _tree(tmp_path)
    outside = tmp_path / "outside.joblib"
    outside.write_bytes(PICKLE)
    os.symlink(outside, root / "esc__e__t.joblib")
    os.symlink(root / "m1__e__t.joblib", root / "inside__e__t.joblib")
    (root / "empty__e__t.joblib").write_bytes(b"")
    (root / "text__e__t.joblib").write_bytes(b"not a model at all")
    (root / "big__e__t.joblib").write_bytes(PICKLE * 20)
    os.mkfifo(root / "fifo__e__t.joblib")
    source = Source(f"file://{root}")
    files = {f.name: f for f in source.files()}

    def reason(name: str) -> str:
        with pytest.raises(DataError) as caught:
            source.read(files[name], max_bytes=len(PICKLE) * 10, buffer_bytes=1 << 20)
        return str(caught.value)

    assert reason("esc").startswith("symlink out of the roots")
    assert reason("empty") == "empty file"
    assert reason("text").startswith("not a joblib or pickle file by its header")
    assert "over the limit" in reason("big")
    assert reason("fifo") == "not a regular file"
    inside = source.read(files["inside"], max_bytes=1 << 20, buffer_bytes=1 << 20)
    plain = source.read(files["m1"], max_bytes=1 << 20, buffer_bytes=1 << 20)
    assert inside.sha256 == plain.sha256 and inside.data == PICKLE and inside.kind == "pickle protocol 4"


def test_a_file_over_the_buffer_is_streamed_and_must_not_change(tmp_path):
    root = _tree(tmp_path)
    source = Source(f"file://{root}")
    first = next(iter(source.files({"m2"})))
    content = source.read(first, max_bytes=1 << 20, buffer_bytes=16)
    assert content.data is None and b"".join(content.blocks()) == PICKLE
    (root / first.relpath).write_bytes(PICKLE[:-1] + b"!")
    with pytest.raises(TransientError, match="changed while it was being read"):
        b"".join(content.blocks())


def test_size_options_must_be_positive_numbers():
    from common.migrations.model_files import ModelFiles

    assert ModelFiles.plan_options(max_file_mb=2.5)["max_file_mb"] == 2.5
    assert ModelFiles.plan_options(options={"buffer_mb": "8"})["buffer_mb"] == 8.0
    for flags in ({"options": {"max_file_mb": "lots"}}, {"options": {"buffer_mb": "0"}}):
        with pytest.raises(ConfigError, match="positive number of MB"):
            ModelFiles.plan_options(**flags)


def test_partition_labels_are_name_ranges_a_name_falls_in_at_most_one():
    from common.migrations.model_files import Ranges, pack_label

    labels = [pack_label("alpha", "beta"), pack_label("churn", "churn"), pack_label("ltv", "zeta")]
    assert labels == ["alpha/beta", "churn", "ltv/zeta"]
    ranges = Ranges(labels)
    assert (ranges.lowest, ranges.highest) == ("alpha", "zeta")
    found = {name: ranges.label_of(name) for name in ("alpha", "alphabet", "beta", "betamax", "churn", "churn2",
                                                       "a", "ltv", "x", "zeta", "zz")}
    assert found == {"alpha": "alpha/beta", "alphabet": "alpha/beta", "beta": "alpha/beta", "betamax": None,
                     "churn": "churn", "churn2": None, "a": None, "ltv": "ltv/zeta", "x": "ltv/zeta",
                     "zeta": "ltv/zeta", "zz": None}
    assert not Ranges([])
