"""Workers on three hosts: network namespaces with their own links, reaching PostgreSQL, Redis and the MongoDB
stand-in only through a forwarded service address (ops/netns_hosts.py), never loopback.

A `modmon` run and an `mlflow-to-mongo` run split across the three hosts end with exactly the target of a
one-host run (workers on this machine's loopback, a queue of their own); the ledger names the host of every
chunk, and every host did some. Then one host's link is pulled while it holds a chunk: the other hosts'
sweepers find its heartbeat silent and send the chunk again, and the run ends clean by itself with the same
exact target. Skipped, with the reason, where namespaces cannot be made (not root, no `ip`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from urllib.parse import urlsplit

import pytest
import redis

from common.broker import Broker
from common.migrations.modmon_fixtures import build_source
from ops.netns_hosts import NetnsHosts, Unavailable, check_available
from tests.conftest import REDIS_BASE, create_db, drop_db
from tests.e2e.conftest import E2E_REDIS_DB
from tests.faults.cases import Case, ModmonCase, MongoCase
from tests.faults.checks import assert_exact, healed
from tests.faults.conftest import HEALING
from tests.harness import Env, wait_for
from tests.mongo_server import REAL_MONGO_URI, NxServer

pytestmark = pytest.mark.e2e
PID = os.getpid()
HOSTS = 3
# The forwarder gives up on a host silent this long and closes its sessions, as the server itself does with
# the keepalives every Shuttle session asks for (`common/pg_sessions.py`), which the forwarder, standing
# between, keeps from acting. Without it the run does not heal: the chunk sent again waits on the rows the
# cut-off host's open transaction still locks.
DEAD_PEER_AFTER_S = 5.0


def host_of(worker: str) -> str:
    """The host part of a ledger worker name, `name@host:pid`."""
    return worker.rpartition(":")[0].rpartition("@")[2]


@pytest.fixture(scope="module")
def namespaces() -> None:
    """Skips the file, with the reason, before anything is built where namespaces cannot be made."""
    try:
        check_available()
    except Unavailable as exc:
        pytest.skip(str(exc))
    if REAL_MONGO_URI:
        pytest.skip("the hosts reach services of this machine only; SHUTTLE_TEST_MONGO_URI is another server")


@pytest.fixture(scope="module")
def small_mlflow(namespaces) -> Iterator[tuple[str, object]]:
    """An MLflow database of our own, smaller than the session's: the two mlflow-to-mongo runs on nx-27017
    take seconds, and building it costs about as much as MLflow's schema alone."""
    from common.migrations.mlflow_fixtures import build_mlflow_source

    name = f"shuttle_hosts_{PID}_mlflow"
    url = create_db(name)
    yield url, build_mlflow_source(url, experiments=3, runs_per_experiment=12, steps=12)
    drop_db(name)


@pytest.fixture(scope="module")
def hosts(namespaces, small_mlflow, tmp_path_factory) -> Iterator[dict]:
    """Three hosts with one worker each on the hosts' queue, and the loopback env of the one-host runs."""
    source_db, ledger_db = f"shuttle_hosts_{PID}", f"shuttle_hosts_ledger_{PID}"
    source_url, ledger_url = create_db(source_db), create_db(ledger_db)
    data = build_source(source_url, rows=24_000, deployments=6)
    broker_url = f"{REDIS_BASE}/{E2E_REDIS_DB}"
    log_dir = tmp_path_factory.mktemp("hosts_workers")
    one_host = Env(source_url, ledger_url, broker_url, data, log_dir, f"shuttle-hosts-{PID}-one")
    server = NxServer().start()
    try:
        with NetnsHosts(HOSTS, dead_peer_after_s=DEAD_PEER_AFTER_S) as net:
            # What the hosts (and the producer, which records these URLs in the ledger) use: the service address.
            many = Env(net.url(source_url), net.url(ledger_url), net.url(broker_url), data, log_dir,
                       f"shuttle-hosts-{PID}")
            mlflow_url, mlflow_data = small_mlflow
            for host in net.hosts:
                net.start_workers(host, many.settings(), name="w", log_dir=log_dir, wait=False,
                                  extra_env=HEALING)
            with one_host.workers(2, "one"):  # the one-host runs' workers, on loopback
                for group in net.workers:
                    group.wait_ready()
                yield {"net": net, "one": one_host, "many": many, "server": server,
                       "mongo_uri": net.url(server.uri),
                       "mlflow_one": replace(one_host, source_url=mlflow_url, data=mlflow_data),
                       "mlflow_many": replace(many, source_url=net.url(mlflow_url), data=mlflow_data)}
    finally:
        client = redis.Redis.from_url(broker_url)
        client.delete(one_host.queue, f"shuttle-hosts-{PID}")
        drop_db(source_db)
        drop_db(ledger_db)
        server.cleanup()


def one_host_baseline(one: Case, many: Case) -> object:
    """The one-host run (the loopback workers, their own queue) into target `base`; both cases compare with it."""
    one.prepare_target("base")
    code, report = one.env.run_json("run", *one.run_args("base"))
    assert code == 0, report["verdict_reason"]
    baseline = one.checksum("base")
    one.__dict__["baseline"] = many.__dict__["baseline"] = baseline  # Case.baseline is a cached property
    return baseline


@pytest.fixture(scope="module")
def modmon(hosts) -> tuple[Case, Case]:
    """(one host, three hosts) over the same source and ledger."""
    one, many = ModmonCase(hosts["one"]), ModmonCase(hosts["many"])
    one_host_baseline(one, many)
    return one, many


@pytest.fixture(scope="module")
def mongo(hosts) -> Iterator[tuple[Case, Case]]:
    server = hosts["server"]
    one = MongoCase(hosts["mlflow_one"], server.uri, server)
    many = MongoCase(hosts["mlflow_many"], hosts["mongo_uri"], server)
    one_host_baseline(one, many)
    yield one, many
    one.cleanup()


def chunk_hosts(case: Case, run_id: str) -> Counter:
    workers = case.env.ledger_sql("SELECT worker FROM shuttle.chunks WHERE run_id = %s", (run_id,))
    return Counter(host_of(worker or "") for (worker,) in workers)


@pytest.mark.parametrize("migration", ["modmon", "mlflow-to-mongo"])
def test_split_across_three_hosts_equals_one_host(hosts, migration, request):
    one, many = request.getfixturevalue("modmon" if migration == "modmon" else "mongo")
    baseline = one.baseline
    name = "many"
    many.prepare_target(name)
    code, report = many.env.run_json("run", *many.run_args(name))
    assert code == 0, report["verdict_reason"]
    assert_exact(many, run_id := report["run_id"], name, baseline, report)
    split = chunk_hosts(many, run_id)
    assert set(split) == {host.name for host in hosts["net"].hosts}, f"every chunk on a host, every host did one: {split}"
    recorded = urlsplit(report["source"]).hostname, urlsplit(report["target"]).hostname
    assert recorded == (hosts["net"].service_address,) * 2, "the run's URLs reach the hosts' service address"


def test_link_down_mid_chunk_heals_by_itself(hosts, modmon):
    """The run heals while the host is cut off; then its link comes back and its worker rejoins by itself, and
    whatever its abandoned attempt does on its return changes nothing."""
    net, (_, case) = hosts["net"], modmon
    cut = net.hosts[1]
    (cut_workers,) = [group for group in net.workers if group.host == cut]
    try:
        with case.started_held("cut") as run_id:
            chunk_id, worker = wait_for(lambda: next(iter(case.env.ledger_sql(
                "SELECT chunk_id, worker FROM shuttle.chunks WHERE run_id = %s AND state = 'running' AND worker LIKE %s",
                (run_id, f"%@{cut.name}:%"))), None), timeout=60, interval=0.05)
            net.link_down(cut)
        report = healed(case, run_id)
    finally:
        net.link_up(cut)
    # The host notices only when its kernel next retransmits on its dead connections, which backs off
    # exponentially over the outage: seconds after a short one, up to two minutes after a long one.
    broker = Broker(case.env.settings())
    wait_for(lambda: set(cut_workers.nodes) <= set(broker.workers_online(timeout=1.0)), timeout=150, interval=0.5)
    assert_exact(case, run_id, "cut", case.baseline, report)
    stale = case.env.ledger_sql("SELECT count(*) FROM shuttle.events WHERE chunk_id = %s AND kind = 'stale'",
                                (chunk_id,))[0][0]
    assert stale == 1, "the cut-off host's chunk was found stale and sent again, once"
    final, attempts = case.env.ledger_sql("SELECT worker, attempts FROM shuttle.chunks WHERE chunk_id = %s",
                                          (chunk_id,))[0]
    assert attempts >= 2 and host_of(final) != cut.name, f"another host finished it: {final}"
