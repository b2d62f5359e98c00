"""MLflow databases for `mlflow-latest-metrics`: one logged through MLflow's own client, one bulk-filled.

`build_logged` makes the reference: MLflow creates its schema itself and maintains latest_metrics
as every batch is logged, so what it leaves there is, by definition, the right answer. The edge
cases below are logged in the order stated, because MLflow's rule is applied incrementally.

`build_bulk` is for the benchmark only: MLflow creates the schema and the experiments, then runs
and metric rows are generated inside PostgreSQL (`INSERT … SELECT generate_series`, seeded) straight
into MLflow's tables, since logging 2,000,000 values through the client would take hours. Its
latest_metrics is left empty.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import psycopg

from common.urls import libpq_url, sqlalchemy_url

INF = math.inf
NAN = math.nan
T0 = 1_700_000_000_000

# key → batches logged one after the other, each a list of (value, timestamp offset, step), and what
# MLflow keeps as latest (value as stored, is_nan). Written so a reviewer can check each by eye.
EDGE_CASES: dict[str, tuple[list[list[tuple[float, int, int]]], tuple[float, bool]]] = {
    "edge/nan_last":        ([[(1.0, 0, 0), (2.0, 1, 1), (NAN, 2, 2)]],          (0.0, True)),
    "edge/pos_inf":         ([[(5.0, 0, 0), (INF, 1, 1)]],                        (1.7976931348623157e308, False)),
    "edge/neg_inf":         ([[(1.0, 0, 2), (-INF, 0, 3)]],                       (-1.7976931348623157e308, False)),
    "edge/neg_step":        ([[(1.0, 0, -5), (2.0, 0, -1), (3.0, 0, -3)]],        (2.0, False)),
    "edge/equal_ts":        ([[(1.0, 7, 4), (2.0, 7, 4), (0.5, 7, 4)]],           (2.0, False)),
    "edge/ts_beats_value":  ([[(9.0, 0, 4), (1.0, 5, 4)]],                        (1.0, False)),
    "edge/step_beats_ts":   ([[(1.0, 100, 1), (2.0, 0, 2)]],                      (2.0, False)),
    "edge/nan_vs_pos":      ([[(NAN, 3, 7), (5.0, 3, 7)]],                        (5.0, False)),
    "edge/nan_vs_neg":      ([[(NAN, 3, 7), (-3.0, 3, 7)]],                       (0.0, True)),
    "edge/nan_then_zero":   ([[(NAN, 3, 7)], [(0.0, 3, 7)]],                      (0.0, True)),
    "edge/late_but_older":  ([[(1.0, 0, 10)], [(2.0, 50, 5)]],                    (1.0, False)),
    "edge/neg_values":      ([[(-7.0, 9, 3), (-2.0, 9, 3), (-9.0, 9, 3)]],        (-2.0, False)),
}
REGULAR_KEYS = ("loss", "accuracy", "lr")


@dataclass(frozen=True)
class LoggedDataset:
    """What `build_logged` made: experiment ids (with runs) → run ids, plus an experiment without runs."""

    url: str
    runs: dict[str, tuple[str, ...]]
    empty_experiment: str
    metric_rows: int
    pairs: int

    @property
    def experiments(self) -> tuple[str, ...]:
        return tuple(self.runs)



def mlflow_client(url: str):
    from mlflow.tracking import MlflowClient  # heavy; only the fixtures and tests need it

    return MlflowClient(tracking_uri=sqlalchemy_url(url))


def log_in_order(client, run_id: str, batches: list[list[tuple[str, float, int, int]]]) -> None:
    """Log each batch with one `log_batch` call (≤ 1,000 metrics, MLflow's limit), in the order given."""
    from mlflow.entities import Metric

    for batch in batches:
        for i in range(0, len(batch), 1000):
            client.log_batch(run_id, metrics=[Metric(k, v, T0 + ts, s) for k, v, ts, s in batch[i:i + 1000]])


def build_logged(url: str, experiments: int = 3, runs_per_experiment: int = 4, steps: int = 30,
                 seed: int = 7) -> LoggedDataset:
    """An MLflow database (empty database at `url`) filled only through MLflow's client."""
    rng = random.Random(seed)
    client = mlflow_client(url)
    runs: dict[str, tuple[str, ...]] = {}
    for e in range(experiments):
        experiment_id = client.create_experiment(f"shuttle-fixture-{e}")
        ids = []
        for _ in range(runs_per_experiment):
            run_id = client.create_run(experiment_id).info.run_id
            regular = [(k, rng.choice([rng.uniform(-1, 1), rng.uniform(0, 100), NAN if rng.random() < 0.05 else 0.25]),
                        step * 1000 + rng.choice([0, 0, 500]), step)
                       for k in REGULAR_KEYS for step in range(steps)]
            rng.shuffle(regular)
            half = len(regular) // 2
            log_in_order(client, run_id, [regular[:half], regular[half:]])
            for key, (batches, _) in EDGE_CASES.items():
                log_in_order(client, run_id, [[(key, v, ts, s) for v, ts, s in batch] for batch in batches])
            ids.append(run_id)
        runs[experiment_id] = tuple(ids)
    empty = client.create_experiment("shuttle-fixture-empty")
    with psycopg.connect(libpq_url(url)) as conn:
        metric_rows, pairs = conn.execute("SELECT count(*), count(DISTINCT (run_uuid, key)) FROM metrics").fetchone()
    return LoggedDataset(url, runs, empty, metric_rows, pairs)


BULK_RUNS_SQL = """
INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status, start_time,
                  end_time, source_version, lifecycle_stage, artifact_uri, experiment_id)
SELECT md5('run' || i), 'run-' || i, 'LOCAL', 'bench', '', 'bench', 'FINISHED', %(t0)s, %(t0)s + 1000, '',
       'active', 'file:///tmp/bench/' || i, %(first_experiment)s + i %% %(experiments)s
FROM generate_series(0, %(runs)s - 1) AS i
"""
# Per run: `keys` keys × `steps` steps, logged run after run (as a real database fills up). About 2% NaN
# (value 0, is_nan true), some ±Inf as MLflow stores them, every 7th step shares its timestamp with the
# step before; values random.
BULK_METRICS_SQL = """
INSERT INTO metrics (key, value, timestamp, step, is_nan, run_uuid)
SELECT 'k' || k,
       CASE WHEN x < 0.02 THEN 0 WHEN x < 0.025 THEN 1.7976931348623157e308 WHEN x < 0.03 THEN -1.7976931348623157e308
            ELSE (x - 0.5) * 100 END,
       %(t0)s + (s - (s %% 7 = 6)::int) * 1000, s, x < 0.02, md5('run' || i)
FROM generate_series(0, %(runs)s - 1) AS i, generate_series(0, %(keys)s - 1) AS k,
     generate_series(0, %(steps)s - 1) AS s, LATERAL (SELECT random() + 0 * i * k * s AS x) r
ORDER BY i
"""


def build_bulk(url: str, runs: int = 20_000, rows: int = 2_000_000, experiments: int = 20, keys: int = 5) -> int:
    """A large MLflow database for the benchmark; returns the metric rows written (runs × keys × steps)."""
    client = mlflow_client(url)
    first = int(client.create_experiment("bench-0"))
    for e in range(1, experiments):
        client.create_experiment(f"bench-{e}")
    steps = max(1, rows // (runs * keys))
    with psycopg.connect(libpq_url(url)) as conn:
        conn.execute("SELECT setseed(0.42)")
        params = {"t0": T0, "runs": runs, "experiments": experiments, "first_experiment": first,
                  "keys": keys, "steps": steps}
        conn.execute(BULK_RUNS_SQL, params)
        conn.execute(BULK_METRICS_SQL, params)
        conn.commit()
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE runs")
        conn.execute("VACUUM ANALYZE metrics")
    return runs * keys * steps
