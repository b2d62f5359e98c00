"""The Grafana dashboard and its provisioning, Prometheus's config and the compose services that load them.

No Grafana or Prometheus server here: the files are checked for the format Grafana's file provisioning
reads, and every panel's query must name metrics that really exist — those `shuttle metrics` exposes
(rendered from common.metrics) or Flower's own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from common.metrics import families

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "ops" / "grafana"
FLOWER_METRICS = {"flower_events_total", "flower_task_runtime_seconds", "flower_task_prefetch_time_seconds",
                  "flower_worker_prefetched_tasks", "flower_worker_online", "flower_worker_number_of_currently_executing_tasks"}
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "clamp_min", "without", "on", "le",
                "avg", "max", "min", "count", "irate", "label_values", "and", "or", "unless"}


class _Sample(Collector):
    def collect(self):
        runs = [{"run_id": "r1", "migration": "modmon", "status": "running", "total_rows": 10}]
        chunks = [{"run_id": "r1", "state": "done", "worker": "w1@h:1", "rows_read": 5, "rows_rejected": 1,
                   "rows_done": None, "writes": {"t": {"inserted": 2, "updated": 1, "unchanged": 1, "deleted": 1}},
                   "duration_s": 1.5, "attempts": 2},
                  {"run_id": "r1", "state": "running", "worker": "w2@h:2", "rows_read": 0, "rows_rejected": 0,
                   "rows_done": 3, "writes": {}, "duration_s": None, "attempts": 1}]
        return families(runs, chunks)


def exposed() -> tuple[set[str], str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Sample())
    text = generate_latest(registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    return names | FLOWER_METRICS, text


def test_exporter_exposition_is_what_the_dashboard_reads():
    names, text = exposed()
    assert 'shuttle_run_rows_done{migration="modmon",run="r1"} 8.0' in text  # 5 recorded + 3 in flight
    assert 'shuttle_rows_written_total{migration="modmon",run="r1"} 4.0' in text
    assert 'shuttle_worker_rows_read_total{migration="modmon",run="r1",worker="w1@h"} 5.0' in text
    assert 'shuttle_chunks{migration="modmon",run="r1",state="running"} 1.0' in text
    assert 'shuttle_chunk_retries_total{migration="modmon",run="r1"} 1.0' in text
    assert "shuttle_chunk_duration_seconds_bucket" in names


def metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_strings)
    without_labels = re.sub(r"\{[^}]*\}", "", without_ranges)
    without_groupings = re.sub(r"\b(by|without)\s*\([^)]*\)", "", without_labels)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_groupings))
    return {w for w in words if w not in PROMQL_WORDS and not w.startswith("__")}


def test_dashboard_json_is_valid_and_every_query_names_an_exposed_metric():
    names, _ = exposed()
    dashboard = json.loads((GRAFANA / "dashboards" / "shuttle.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    assert "id" not in dashboard or dashboard["id"] is None  # provisioning assigns ids
    datasource_uid = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"][0]["uid"]
    panels = dashboard["panels"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("progress", "throughput per worker", "reject", "fail"):
        assert topic in titles, topic
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource_uid}, panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = metric_names(target["expr"])
            assert used, target["expr"]
            assert used <= names, f"{panel['title']}: {sorted(used - names)} not exposed"
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == datasource_uid
        metric, label = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"]).groups()
        assert metric_names(metric) <= names
        assert f'{label}="' in exposed()[1]


def test_provisioning_files_have_grafanas_format():
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy" and source["url"].startswith("http://")
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "shuttle.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    mounts = dict(volume.split(":")[:2] for volume in services["grafana"]["volumes"] if volume.startswith("./"))
    assert mounts["./ops/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./ops/grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    assert mounts["./ops/grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    for mounted in mounts:
        assert (ROOT / mounted).is_dir(), mounted
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    assert "shuttle metrics" in services["metrics"]["command"] and "0.0.0.0" in services["metrics"]["command"]
    assert "--conf=" in services["flower"]["command"]


def test_prometheus_scrapes_the_exporter_and_flower_with_auth_from_files():
    config = yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["shuttle"]["static_configs"][0]["targets"] == ["metrics:9808"]
    auth = jobs["flower"]["basic_auth"]
    assert set(auth) == {"username_file", "password_file"}, "no credential written in the file itself"
