from common.migrations.modmon import cut_hours, hour_label, hour_number, span_ranges
from common.model import ChunkSpec
from producer.cli import expand_multi_values


def test_cut_hours_bounds_chunks_and_never_splits_an_hour():
    hours = [(10, 400), (11, 400), (12, 400), (14, 5000), (15, 100), (16, 100)]
    chunks = list(cut_hours(hours, 1000))
    assert chunks == [(10, 12, 800), (12, 13, 400), (14, 15, 5000), (15, 17, 200)]
    assert sum(rows for *_, rows in chunks) == sum(n for _, n in hours)


def test_cut_hours_empty_and_single():
    assert list(cut_hours([], 10)) == []
    assert list(cut_hours([(5, 3)], 10)) == [(5, 6, 3)]


def test_ranges_are_contiguous_so_an_hour_without_rows_still_has_a_chunk():
    cuts = list(cut_hours([(10, 400), (11, 400), (12, 400), (14, 5000), (15, 100)], 1000))
    assert list(span_ranges(cuts, None, None)) == [(None, 12, 800), (12, 14, 400), (14, 15, 5000), (15, None, 100)]
    assert list(span_ranges(cuts[:1], 5, 20)) == [(5, 20, 800)]


def test_hour_labels_round_trip():
    for hour in (0, 1, 473_000, 500_123):
        assert hour_number(hour_label(hour)) == hour


def test_chunk_ids_are_pure_functions_of_what_the_chunk_is():
    a = ChunkSpec("predictions", "dep1", "20260601T00", "20260601T05", 10)
    b = ChunkSpec("predictions", "dep1", "20260601T00", "20260601T05", 10)
    assert a.chunk_id("run-1") == b.chunk_id("run-1") == "run-1:predictions:dep1:20260601T00-20260601T05"
    assert a.chunk_id("run-2") != a.chunk_id("run-1")


def test_deployment_ids_take_several_values_after_the_flag():
    argv = ["run", "modmon", "--deployment-ids", "a", "b", "--wait", "--partitions", "c"]
    assert expand_multi_values(argv) == [
        "run", "modmon", "--deployment-ids", "a", "--deployment-ids", "b", "--wait", "--partitions", "c"]
