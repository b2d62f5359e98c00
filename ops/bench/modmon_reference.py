"""The in-database reference of the `modmon` benchmark: the aggregation as two statements.

Prediction statistics and the feature-drift equivalent over jsonb_each, each one `INSERT … SELECT …
GROUP BY` into a scratch table shaped like Shuttle's target, so the benchmark can time both on the same
data and compare their rows.
"""

from __future__ import annotations

import time
from typing import Any

from benchlib import db
from common.connectors.base import TableSpec
from common.connectors.postgres import Sink
from common.migrations.hourly_stats import HISTOGRAM_BUCKETS, HISTOGRAM_EDGES
from common.migrations.modmon import FEATURE_DRIFT, PREDICTION_STATS

REF_PREDICTIONS = "bench_ref_prediction_stats"
REF_FEATURES = "bench_ref_feature_drift"


def _histogram(expr: str) -> str:
    return "ARRAY[" + ", ".join(f"count(*) FILTER (WHERE {expr} = {i})" for i in range(HISTOGRAM_BUCKETS)) + "]"


EDGES = "'{" + ",".join(repr(e) for e in HISTOGRAM_EDGES) + "}'::float8[]"
# width_bucket(x, edges) counts the edges <= x, exactly bisect_right of the Python accumulators. The
# bucket is computed once per row in a subquery kept from being flattened (OFFSET 0): flattened, the
# planner would evaluate it once per FILTER, and the statement took 4x longer; so this is its best form.
REF_PREDICTIONS_SQL = f"""
INSERT INTO {REF_PREDICTIONS}
SELECT deployment_id, model_id, hour,
       count(*), sum(prediction), sum(prediction * prediction), min(prediction), max(prediction),
       {_histogram('b')},
       count(actual), sum(actual), sum(actual * actual), sum((prediction - actual) ^ 2), count(association_id)
FROM (SELECT deployment_id, model_id, date_trunc('hour', ts) AS hour, prediction, actual, association_id,
             width_bucket(prediction, {EDGES}) AS b
      FROM archived_predictions
      WHERE model_id IS NOT NULL AND prediction IS NOT NULL
        AND prediction NOT IN ('NaN', 'Infinity', '-Infinity') OFFSET 0) s
GROUP BY 1, 2, 3
"""
# Same moments and histogram per (deployment, model, feature, hour); categories are counted but the
# top-ten list is not built (the engine does build it), so the reference does slightly less work.
REF_FEATURES_SQL = f"""
INSERT INTO {REF_FEATURES} (deployment_id, model_id, feature, hour, value_count, null_count, numeric_count,
                            value_sum, value_sum_sq, value_min, value_max, histogram, category_count,
                            other_category_count)
SELECT deployment_id, model_id, feature, hour,
       count(*), count(*) FILTER (WHERE kind = 'null'), count(num),
       coalesce(sum(num), 0), coalesce(sum(num * num), 0), min(num), max(num),
       {_histogram('b')},
       count(*) FILTER (WHERE kind IN ('string', 'boolean')), 0
FROM (SELECT deployment_id, model_id, feature, hour, kind, num, width_bucket(num, {EDGES}) AS b
      FROM (SELECT p.deployment_id, p.model_id, f.key AS feature, date_trunc('hour', p.ts) AS hour,
                   jsonb_typeof(f.value) AS kind,
                   CASE WHEN jsonb_typeof(f.value) = 'number' THEN f.value::float8 END AS num
            FROM archived_predictions p CROSS JOIN LATERAL jsonb_each(p.features::jsonb) f
            WHERE p.model_id IS NOT NULL AND p.prediction IS NOT NULL OFFSET 0) e OFFSET 0) s
GROUP BY 1, 2, 3, 4
"""


def prepare_reference(url: str) -> None:
    sink = Sink(url)
    try:
        for name, spec in ((REF_PREDICTIONS, PREDICTION_STATS), (REF_FEATURES, FEATURE_DRIFT)):
            sink.ensure_table(TableSpec(name, spec.columns, spec.key))
    finally:
        sink.close()


def run_reference(url: str) -> dict[str, Any]:
    with db(url) as conn:
        conn.execute(f"TRUNCATE {REF_PREDICTIONS}, {REF_FEATURES}")
        started = time.monotonic()
        with conn.transaction():
            # The planner cannot estimate the groups of jsonb_each (it assumes 20M, there are ~60k) and
            # picks a 1 GB external sort + GroupAggregate: 34s at 2M rows. Hash aggregation takes 22s
            # with the same stock work_mem, so the reference gets that hint (server settings unchanged).
            conn.execute("SET LOCAL enable_sort = off")
            conn.execute(REF_PREDICTIONS_SQL)
            middle = time.monotonic()
            conn.execute(REF_FEATURES_SQL)
        ended = time.monotonic()
        counts = conn.execute(f"SELECT (SELECT count(*) FROM {REF_PREDICTIONS}),"
                              f" (SELECT count(*) FROM {REF_FEATURES})").fetchone()
    return {"seconds": ended - started, "predictions_s": middle - started, "features_s": ended - middle,
            "target_rows": {"predictions": counts[0], "features": counts[1]}}
