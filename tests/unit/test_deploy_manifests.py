"""The Kubernetes manifests in ops/deploy/k8s, read as kubectl would: the KEDA ScaledObject scales the worker
Deployment on the Redis list its workers consume, and every credential comes from the Secret."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from common.settings import Settings

K8S = Path(__file__).resolve().parents[2] / "ops" / "deploy" / "k8s"


def documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def one(kind: str, name: str | None = None) -> dict:
    found = [d for d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def worker() -> dict:
    return one("Deployment", "shuttle-worker")


@pytest.fixture(scope="module")
def scaled() -> dict:
    return one("ScaledObject")


@pytest.fixture(scope="module")
def secret() -> dict:
    return one("Secret", "shuttle-secrets")


def container_args(deployment: dict) -> list[str]:
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "worker"]
    return container["command"] + container["args"]


def test_every_manifest_parses_with_kind_and_name():
    docs = documents()
    assert docs and all(d.get("apiVersion") and d.get("kind") and d["metadata"].get("name") for d in docs)


def test_scaled_object_targets_the_worker_deployment(scaled, worker):
    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment" and target.get("apiVersion", "apps/v1") == "apps/v1"
    assert target["name"] == worker["metadata"]["name"]
    assert 1 <= scaled["spec"]["maxReplicaCount"] and scaled["spec"].get("minReplicaCount", 0) <= \
        scaled["spec"]["maxReplicaCount"]


def test_trigger_is_the_redis_list_of_the_workers_queue(scaled, worker, secret):
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    queues = [a.split("=", 1)[1] for a in container_args(worker) if a.startswith("--queues=")]
    # Celery's Redis transport keeps a queue's waiting messages in a list named after the queue.
    assert queues == [meta["listName"]] == [Settings.model_fields["queue"].default]
    broker = urlsplit(secret["stringData"]["SHUTTLE_BROKER_URL"])
    assert meta["address"] == f"{broker.hostname}:{broker.port}"
    assert meta["databaseIndex"] == broker.path.strip("/")
    assert int(meta["listLength"]) >= 1


def test_credentials_come_from_the_secret(scaled, worker, secret):
    trigger = scaled["spec"]["triggers"][0]
    assert not {"password", "username", "passwordFromEnv"} & set(trigger["metadata"]), "no credential in the trigger"
    assert "@" not in trigger["metadata"]["address"]
    auth = one("TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = auth["spec"]["secretTargetRef"]
    assert {r["parameter"] for r in refs} == {"password"}
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    worker_secrets = {s["secretRef"]["name"] for s in container["envFrom"]}
    assert worker_secrets == {secret["metadata"]["name"]}
    for ref in refs:
        assert ref["name"] in worker_secrets and ref["key"] in secret["stringData"]
    broker_password = urlsplit(secret["stringData"]["SHUTTLE_BROKER_URL"]).password
    assert secret["stringData"][refs[0]["key"]] == broker_password, "the same password as the broker URL's"
    assert "env" not in container or all("value" not in e or "password" not in e["name"].lower()
                                         for e in container["env"])
