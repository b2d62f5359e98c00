"""Pure accumulators for hourly prediction and feature-drift statistics (no I/O, no clock).

Histograms use one fixed set of bucket edges for every value, so buckets from different hours,
deployments and runs can be added together: fine steps across [0, 1] for probabilities, decades
beyond for regression outputs and raw feature values.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from typing import Any

HISTOGRAM_EDGES: tuple[float, ...] = (
    -1000.0, -100.0, -10.0, -1.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 10.0, 100.0, 1000.0)
HISTOGRAM_BUCKETS = len(HISTOGRAM_EDGES) + 1
TOP_CATEGORIES = 10
MAX_CATEGORY_CHARS = 200


def bucket_of(value: float) -> int:
    """Bucket i holds values in [edges[i-1], edges[i]); the first and last are open-ended."""
    return bisect_right(HISTOGRAM_EDGES, value)


class PredictionStats:
    """Counts, sums, squares, extremes and a histogram of one (deployment, model, hour)."""

    __slots__ = ("count", "total", "total_sq", "low", "high", "histogram", "actual_count", "actual_total",
                 "actual_total_sq", "error_sq", "association_count")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.low = math.inf
        self.high = -math.inf
        self.histogram = [0] * HISTOGRAM_BUCKETS
        self.actual_count = 0
        self.actual_total = 0.0
        self.actual_total_sq = 0.0
        self.error_sq = 0.0
        self.association_count = 0

    def add(self, prediction: float, actual: float | None, has_association: bool) -> None:
        self.count += 1
        self.total += prediction
        self.total_sq += prediction * prediction
        if prediction < self.low:
            self.low = prediction
        if prediction > self.high:
            self.high = prediction
        self.histogram[bisect_right(HISTOGRAM_EDGES, prediction)] += 1
        if actual is not None and math.isfinite(actual):
            self.actual_count += 1
            self.actual_total += actual
            self.actual_total_sq += actual * actual
            self.error_sq += (prediction - actual) ** 2
        if has_association:
            self.association_count += 1

    def as_row(self) -> tuple[Any, ...]:
        return (self.count, self.total, self.total_sq, self.low, self.high, self.histogram,
                self.actual_count, self.actual_total, self.actual_total_sq, self.error_sq, self.association_count)


class FeatureStats:
    """Drift statistics of one feature in one (deployment, model, hour).

    Numbers get moments and a histogram; strings and booleans get category counts, of which the top
    ten are kept by name and the rest summed, so the row stays small whatever the cardinality.
    """

    __slots__ = ("count", "null_count", "numeric_count", "total", "total_sq", "low", "high", "histogram",
                 "categories")

    def __init__(self) -> None:
        self.count = 0
        self.null_count = 0
        self.numeric_count = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.low = math.inf
        self.high = -math.inf
        self.histogram = [0] * HISTOGRAM_BUCKETS
        self.categories: dict[str, int] = {}

    def add(self, value: Any) -> None:
        self.count += 1
        kind = type(value)
        if kind is float or kind is int:
            if kind is float and not math.isfinite(value):
                self.null_count += 1
                return
            self.numeric_count += 1
            self.total += value
            self.total_sq += value * value
            if value < self.low:
                self.low = value
            if value > self.high:
                self.high = value
            self.histogram[bisect_right(HISTOGRAM_EDGES, value)] += 1
        elif value is None:
            self.null_count += 1
        else:
            label = value if kind is str else _category_label(value)
            self.categories[label] = self.categories.get(label, 0) + 1

    def as_row(self) -> tuple[Any, ...]:
        ranked = sorted(self.categories.items(), key=lambda kv: (-kv[1], kv[0]))
        top = ranked[:TOP_CATEGORIES]
        other = sum(n for _, n in ranked[TOP_CATEGORIES:])
        numeric = self.numeric_count > 0
        return (self.count, self.null_count, self.numeric_count, float(self.total), float(self.total_sq),
                float(self.low) if numeric else None, float(self.high) if numeric else None, self.histogram,
                sum(self.categories.values()), [[k[:MAX_CATEGORY_CHARS], n] for k, n in top], other)


def _category_label(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
