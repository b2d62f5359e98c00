import math

from common.migrations.hourly_stats import HISTOGRAM_BUCKETS, TOP_CATEGORIES, FeatureStats, PredictionStats, bucket_of


def test_bucket_edges_are_half_open_and_cover_everything():
    assert bucket_of(-1e9) == 0
    assert bucket_of(0.0) == bucket_of(0.05) != bucket_of(0.1)
    assert bucket_of(0.99) + 1 == bucket_of(1.0)
    assert bucket_of(1e12) == HISTOGRAM_BUCKETS - 1


def test_prediction_stats_moments_extremes_and_actuals():
    stats = PredictionStats()
    for prediction, actual, assoc in [(0.2, 1.0, True), (0.8, None, False), (0.5, 0.0, True)]:
        stats.add(prediction, actual, assoc)
    count, total, total_sq, low, high, hist, a_count, a_total, a_sq, err_sq, assoc = stats.as_row()
    assert (count, low, high, a_count, assoc) == (3, 0.2, 0.8, 2, 2)
    assert math.isclose(total, 1.5) and math.isclose(total_sq, 0.04 + 0.64 + 0.25)
    assert math.isclose(err_sq, 0.8 ** 2 + 0.5 ** 2) and a_total == 1.0 and a_sq == 1.0
    assert sum(hist) == 3 and hist[bucket_of(0.2)] == 1


def test_feature_stats_numbers_categories_nulls():
    stats = FeatureStats()
    for value in [1, 2.5, None, float("nan"), "a", "b", "a", True, {"x": 1}]:
        stats.add(value)
    row = stats.as_row()
    count, nulls, numeric, total, total_sq, low, high, hist, cat_count, top, other = row
    assert (count, nulls, numeric, low, high) == (9, 2, 2, 1.0, 2.5)
    assert math.isclose(total, 3.5) and math.isclose(total_sq, 7.25)
    assert cat_count == 5 and top[0] == ["a", 2] and ["true", 1] in top and ['{"x":1}', 1] in top
    assert other == 0 and sum(hist) == 2


def test_top_categories_keep_ten_and_sum_the_rest_deterministically():
    stats = FeatureStats()
    for i in range(15):
        for _ in range(i + 1):
            stats.add(f"c{i:02d}")
    *_, cat_count, top, other = stats.as_row()
    assert len(top) == TOP_CATEGORIES
    assert top[0] == ["c14", 15] and top[-1] == ["c05", 6]
    assert other == sum(range(1, 6)) and cat_count == sum(range(1, 16))


def test_only_categorical_values_have_no_min_max():
    stats = FeatureStats()
    stats.add("x")
    row = stats.as_row()
    assert row[5] is None and row[6] is None
