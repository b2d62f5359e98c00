"""Cutting run ranges for `mlflow-latest-metrics`: bounded chunks, a run never split."""

import pytest

from common.errors import ConfigError
from common.migrations.mlflow_latest_metrics import contiguous, cut_runs, experiment_ids


def test_runs_are_grouped_up_to_the_bound_and_a_big_run_stands_alone():
    runs = [("a", 40), ("b", 50), ("c", 30), ("d", 500), ("e", 10), ("f", 10)]
    assert list(cut_runs(runs, 100)) == [("a", "b", 90), ("c", "c", 30), ("d", "d", 500), ("e", "f", 20)]


def test_no_runs_no_chunks_and_every_row_is_in_one_chunk():
    assert list(cut_runs([], 100)) == []
    runs = [(f"{i:032x}", i % 7 + 1) for i in range(200)]
    chunks = list(cut_runs(runs, 25))
    assert sum(rows for *_, rows in chunks) == sum(n for _, n in runs)
    assert all(rows <= 25 for *_, rows in chunks)
    assert [c[0] for c in chunks][1:] == [runs[[r for r, _ in runs].index(c[1]) + 1][0] for c in chunks[:-1]]


def test_ranges_are_contiguous_and_open_ended_so_every_run_has_one_chunk():
    cuts = list(cut_runs([("a", 40), ("b", 50), ("c", 30), ("d", 500)], 100))
    assert list(contiguous(cuts)) == [("", "c", 90), ("c", "d", 30), ("d", "", 500)]
    assert list(contiguous([("a", "f", 9)])) == [("", "", 9)]


def test_experiment_ids_must_be_whole_numbers():
    assert experiment_ids(["0", "12"]) == [0, 12]
    with pytest.raises(ConfigError, match="got: -1, x"):
        experiment_ids(["x", "3", "-1"])
