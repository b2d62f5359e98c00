"""A realistic MLflow database built by MLflow's own client (the schema and rows MLflow itself writes).

Experiments with hundreds of runs, metric histories with steps (NaN and ±Inf included), params, tags,
datasets and run inputs, registered models with versions, tags and aliases, and traces. Used by the
tests and by demos of `mlflow-to-mongo`; needs the `mlflow` package (a test dependency).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

from common.urls import sqlalchemy_url


@dataclass
class MlflowDataset:
    experiment_ids: list[str] = field(default_factory=list)
    run_ids: dict[str, list[str]] = field(default_factory=dict)  # experiment id → run ids
    model_names: list[str] = field(default_factory=list)
    metric_points: int = 0
    trace_ids: list[str] = field(default_factory=list)


def build_mlflow_source(url: str, experiments: int = 4, runs_per_experiment: int = 60, steps: int = 40,
                        models: int = 3, versions_per_model: int = 3, traces: int = 5,
                        seed: int = 7) -> MlflowDataset:
    """Create MLflow's schema in the (empty) database at `url` and fill it through MlflowClient."""
    import mlflow
    from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
    from mlflow.entities import Dataset as MlflowDatasetEntity
    from mlflow.tracking import MlflowClient

    rng = random.Random(seed)
    tracking_uri = sqlalchemy_url(url)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    data = MlflowDataset()
    base_ms = 1_760_000_000_000
    for e in range(experiments):
        exp_id = client.create_experiment(f"shuttle-exp-{e}", artifact_location=f"file:///tmp/shuttle-artifacts/{e}",
                                          tags={"team": f"team-{e % 2}", "config": '{"owner": "ml", "tier": %d}' % e})
        data.experiment_ids.append(exp_id)
        data.run_ids[exp_id] = []
        for r in range(runs_per_experiment):
            run = client.create_run(exp_id, start_time=base_ms + e * 10_000_000 + r * 1000, run_name=f"run-{e}-{r}",
                                    tags={"mlflow.source.type": "LOCAL", "model": rng.choice(["xgb", "lr", "nn"])})
            run_id = run.info.run_id
            data.run_ids[exp_id].append(run_id)
            metrics = []
            for step in range(steps):
                ts = base_ms + e * 10_000_000 + r * 1000 + step
                loss = 1.0 / (step + 1) + rng.random() / 100
                metrics.append(Metric("loss", loss, ts, step))
                metrics.append(Metric("accuracy", 1 - loss, ts, step))
            if r % 10 == 0:
                metrics += [Metric("diverged", float("nan"), base_ms, 0), Metric("grad_norm", math.inf, base_ms, 1),
                            Metric("grad_norm", -math.inf, base_ms + 1, 2)]
            params = [Param("lr", str(rng.choice([0.1, 0.01, 0.001]))), Param("depth", str(rng.randint(2, 9))),
                      Param("config_json", '{"layers": [64, 32], "dropout": 0.2}' if r % 3 == 0 else "not {json")]
            tags = [RunTag("stage", rng.choice(["dev", "prod"])), RunTag("mlflow.note.content", f"note {r}")]
            for start in range(0, len(metrics), 1000):
                client.log_batch(run_id, metrics=metrics[start:start + 1000],
                                 params=params if start == 0 else [], tags=tags if start == 0 else [])
            data.metric_points += len(metrics)
            if r % 5 == 0:
                dataset = MlflowDatasetEntity(name=f"train-{e}", digest=f"d{e:04d}", source_type="local",
                                              source='{"uri": "file:///data/train.csv"}',
                                              schema='{"mlflow_colspec": [{"type": "double", "name": "x"}]}',
                                              profile='{"num_rows": 1000}')
                client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])
            status = "FAILED" if r % 17 == 0 else "FINISHED"
            client.set_terminated(run_id, status=status, end_time=base_ms + e * 10_000_000 + r * 1000 + 900)
    for m in range(models):
        name = f"shuttle-model-{m}"
        client.create_registered_model(name, tags={"owner": f"o{m}"}, description=f"model {m}")
        data.model_names.append(name)
        for v in range(versions_per_model):
            exp_id = data.experiment_ids[(m + v) % len(data.experiment_ids)]
            run_id = data.run_ids[exp_id][v]
            version = client.create_model_version(name, f"file:///tmp/shuttle-models/{m}/{v}", run_id=run_id,
                                                  tags={"validated": str(v % 2 == 0).lower()})
            if v == versions_per_model - 1:
                client.transition_model_version_stage(name, version.version, "Production")
            elif v == 0:
                client.transition_model_version_stage(name, version.version, "Archived")
        client.set_registered_model_alias(name, "champion", str(versions_per_model))
        client.set_registered_model_alias(name, "challenger", "1")
    mlflow.set_experiment(experiment_id=data.experiment_ids[0])
    for t in range(traces):
        with mlflow.start_span(name=f"predict-{t}") as span:
            span.set_inputs({"x": t})
            span.set_outputs({"y": t * 2})
            data.trace_ids.append(span.trace_id)
    mlflow.flush_trace_async_logging() if hasattr(mlflow, "flush_trace_async_logging") else time.sleep(0)
    return data
