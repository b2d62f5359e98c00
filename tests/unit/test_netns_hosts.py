"""ops/netns_hosts.py without namespaces: why it is unavailable, and which URLs it moves to the service address."""

from __future__ import annotations

import pytest

from common.settings import load_settings
from ops import netns_hosts
from ops.netns_hosts import NetnsHosts, Unavailable


def test_not_root_is_unavailable_with_the_reason(monkeypatch):
    monkeypatch.setattr(netns_hosts.os, "geteuid", lambda: 1000)
    with pytest.raises(Unavailable, match=r"^unavailable: creating network namespaces needs root$"):
        netns_hosts.check_available()


def test_no_ip_tool_is_unavailable_with_the_reason(monkeypatch):
    monkeypatch.setattr(netns_hosts.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns_hosts.shutil, "which", lambda tool: None if tool == "ip" else f"/usr/bin/{tool}")
    with pytest.raises(Unavailable, match=r"^unavailable: `ip` is not installed$"):
        netns_hosts.check_available()


class ExposedPorts:
    def __init__(self) -> None:
        self.ports: list[int] = []

    def expose(self, port: int) -> None:
        self.ports.append(port)


@pytest.fixture
def hosts() -> NetnsHosts:
    """An instance as `with` leaves it, but with a forwarder that only records the ports it is asked for."""
    instance = NetnsHosts(2)
    instance.slot = 300
    instance._forwarder = ExposedPorts()
    return instance


def test_service_address_is_in_the_benchmarking_range(hosts):
    assert hosts.service_address == "198.19.44.1"


def test_loopback_urls_move_to_the_service_address_with_their_port(hosts):
    assert hosts.url("postgresql://app:s%40fe@127.0.0.1:5433/db?sslmode=disable") == \
        "postgresql://app:s%40fe@198.19.44.1:5433/db?sslmode=disable"
    assert hosts.url("redis://localhost/3") == "redis://198.19.44.1:6379/3"
    assert hosts.url("mongodb://127.0.0.1:27999/x") == "mongodb://198.19.44.1:27999/x"
    assert hosts._forwarder.ports == [5433, 6379, 27999]


def test_other_urls_are_left_alone(hosts):
    for url in ("postgresql://db.internal:5432/x", "file:///data/models", "redis://10.0.0.5:6379/0"):
        assert hosts.url(url) == url
    assert hosts._forwarder.ports == []


def test_failover_broker_list_part_by_part(hosts):
    assert hosts.url("redis://127.0.0.1:6379/0;redis://cache:6379/0") == \
        "redis://198.19.44.1:6379/0;redis://cache:6379/0"


def test_settings_every_url_reachable_from_the_hosts(hosts):
    settings = load_settings(broker_url="redis://127.0.0.1:6379/4", ledger_url="postgresql://postgres@127.0.0.1/l",
                             source_url="postgresql://postgres@127.0.0.1:5432/s", queue="q")
    moved = hosts.settings(settings)
    assert (moved.broker_url, moved.effective_result_backend, moved.ledger_url, moved.source_url) == (
        "redis://198.19.44.1:6379/4", "redis://198.19.44.1:6379/4", "postgresql://postgres@198.19.44.1:5432/l",
        "postgresql://postgres@198.19.44.1:5432/s")
    assert moved.target_url is None and moved.queue == "q"


def test_command_runs_inside_the_namespace_under_the_hosts_name(hosts):
    host = netns_hosts.Host("shuttle-300-h1", "shuttle-300-h1", "198.19.44.11", "sh300h1")
    argv = hosts.command(host, ["celery", "--version"])
    assert argv[:4] == ["ip", "netns", "exec", "shuttle-300-h1"] and argv[-3:] == ["shuttle-300-h1", "celery",
                                                                                    "--version"]
