"""Worker "hosts" on one machine: network namespaces joined to the root namespace by veth pairs.

Why: Shuttle's promise is "add workers on as many hosts as you like", and loopback proves nothing about
it. Each host here has its own network stack, its own hostname (a UTS namespace) and its own link, which
can be pulled (`ip link set … down`) like a cable. The services it needs (PostgreSQL, Redis, the MongoDB
stand-in) listen on 127.0.0.1 only and are not reconfigured: a forwarder of this process listens on a
*service address* that exists only on the root side of the links, and passes each connection on to
127.0.0.1. A host's own loopback has nothing behind it, so a worker that reaches a service at all reaches
it through its link.

    P.10+i  (host i: namespace and hostname shuttle-K-hi, link eth0) ──veth── P.1  (root side, link shKhi:
                                                                                the service address)
                                                                   forwarder: P.1:<port> → 127.0.0.1:<port>

P is 198.(18 + K // 256).(K % 256), in 198.18.0.0/15, the range reserved for benchmarking interconnects
(RFC 2544): never a real destination. K (0..511) is claimed per instance with an exclusive file under
/run/shuttle-netns, so parallel test processes never share names or addresses. Every instance that starts
first removes those whose owning process died without tearing down (SIGKILL): the processes left inside
their hosts, their namespaces and links. The forwarder is a thread of the calling process, which must
stay alive while the hosts are used.

The forwarder drops a connection whose host stopped answering within `dead_peer_after_s` (TCP keepalive
and TCP_USER_TIMEOUT on the host's side), then closes its side to the service. It plays the part of a
server with short keepalives: without it, the session of a host cut off mid-transaction would keep its
row locks until the kernel gives up, hours later (see the README's "Add a worker on another host").

Cost: one stream through a host's link and the forwarder moved 125 MB/s here (PostgreSQL COPY out, 200 MB;
265 MB/s on loopback), from a thread of the calling process. Plenty for runs whose chunks aggregate at the
source (`modmon`); a benchmark that moves raw rows should say the forwarder is in the path.

API (all of it):

    check_available() -> None                 raises Unavailable("unavailable: <reason>") when namespaces
                                              cannot be made here (not root, no `ip`/`unshare`, no permission)
    NetnsHosts(hosts=3, ports=(), dead_peer_after_s=5.0)   a context manager; `with` sets up, exit tears
                                              everything down (workers, forwarder, namespaces, links), also
                                              after an error. Construction does nothing.
      .service_address -> str                 "P.1", the same from every host and from the caller
      .hosts -> list[Host]                    Host(name, namespace, address, root_link); name = its hostname
      .workers -> list[HostWorkers]           every group start_workers started
      .expose(port) -> None                   forward service_address:port → 127.0.0.1:port (idempotent)
      .url(url) -> str                        a URL with host 127.0.0.1/localhost rewritten to the service
                                              address (its port exposed); other URLs unchanged
      .settings(settings) -> Settings         the same settings with every URL rewritten by .url()
      .command(host, argv) -> list[str]       argv run inside the host (its namespace and hostname)
      .start_workers(host, settings, count=1, concurrency=1, name="w", log_dir=None, extra_env=None,
                     wait=True) -> HostWorkers
                                              Celery workers inside the host, node names
                                              f"{name}{j}@{host.name}" (the ledger records each chunk's
                                              worker as that plus ":pid"), settings rewritten by
                                              .settings(); stopped by .stop() or at teardown
      .link_down(host) / .link_up(host)       the host's link (its namespace side) down / up again
      .close()                                what leaving `with` does; safe to call twice
    HostWorkers: .host, .nodes (Celery node names), .processes, .wait_ready(timeout), .stop(timeout)
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from common.settings import Settings
from producer.local_workers import PROJECT_ROOT, worker_env

CLAIMS = Path("/run/shuttle-netns")
SLOTS = 512  # /24 blocks in 198.18.0.0/15
LOCAL_HOSTS = ("127.0.0.1", "localhost")


class Unavailable(RuntimeError):
    """Network namespaces cannot be created here; the message starts with "unavailable: " and says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"unavailable: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Host:
    name: str  # the hostname inside, and the host part of its workers' node names
    namespace: str
    address: str
    root_link: str  # the veth end in the root namespace; inside, the link is `eth0`


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def check_available() -> None:
    """Raise `Unavailable` with the reason when this process cannot make network namespaces."""
    if not sys.platform.startswith("linux"):
        raise Unavailable(f"network namespaces are Linux only (this is {sys.platform})")
    if os.geteuid() != 0:
        raise Unavailable("creating network namespaces needs root")
    for tool in ("ip", "unshare", "sh"):
        if shutil.which(tool) is None:
            raise Unavailable(f"`{tool}` is not installed")
    probe = f"shuttle-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        raise Unavailable(f"`ip netns add` failed: {made.stderr.strip()}")
    try:
        link = f"shp{os.getpid() % 100000}"
        veth = _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", probe, check=False)
        if veth.returncode != 0:
            raise Unavailable(f"no veth pairs here: {veth.stderr.strip()}")
        _ip("link", "del", link, check=False)
    finally:
        _ip("netns", "del", probe, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_slot(slot: int) -> None:
    """Delete what an instance of slot `slot` whose owner died made: the processes left inside its hosts
    (workers with no way out), its namespaces and its root-side links."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(f"shuttle-{slot}-h"):
            _kill_inside(name)
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            link = parts[1].strip().split("@")[0]
            if link.startswith(f"sh{slot}h"):
                _ip("link", "del", link, check=False)


def _kill_inside(namespace: str) -> None:
    for pid in _ip("netns", "pids", namespace, check=False).stdout.split():
        if pid.isdigit():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _owner(claim: Path) -> int:
    try:
        return int(claim.read_text().strip() or "0")
    except (OSError, ValueError):
        return 0


def _clean_orphans() -> None:
    """Remove every instance whose owning process is gone (killed before it could tear down)."""
    for claim in CLAIMS.glob("*.pid"):
        owner = _owner(claim)
        if claim.stem.isdigit() and not (owner and _alive(owner)):
            _remove_slot(int(claim.stem))
            claim.unlink(missing_ok=True)


def _claim_slot() -> int:
    """A slot no live process holds, claimed by an exclusive file; a dead owner's leftovers are removed."""
    CLAIMS.mkdir(parents=True, exist_ok=True)
    _clean_orphans()
    start = (os.getpid() * 7) % SLOTS
    for step in range(SLOTS):
        slot = (start + step) % SLOTS
        claim = CLAIMS / f"{slot}.pid"
        for _ in range(2):
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _owner(claim)
                if owner and _alive(owner):
                    break
                _remove_slot(slot)
                claim.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return slot
    raise Unavailable("no free slot in 198.18.0.0/15 (512 instances running?)")


class _Forwarder:
    """TCP forwarding service_address:port → 127.0.0.1:port on an event loop in a daemon thread."""

    def __init__(self, address: str, dead_peer_after_s: float) -> None:
        self.address = address
        self.dead_peer_after_s = dead_peer_after_s
        self.loop = asyncio.new_event_loop()
        self.servers: dict[int, asyncio.Server] = {}
        self.thread = threading.Thread(target=self.loop.run_forever, name="netns-forwarder", daemon=True)
        self.thread.start()

    def expose(self, port: int) -> None:
        if port not in self.servers:
            self.servers[port] = asyncio.run_coroutine_threadsafe(self._serve(port), self.loop).result(10)

    async def _serve(self, port: int) -> asyncio.Server:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND: bind even while every link is down
        listener.bind((self.address, port))
        return await asyncio.start_server(lambda r, w: self._pass(r, w, port), sock=listener, backlog=256)

    def _watch_peer(self, sock: socket.socket) -> None:
        """Keepalive probes from the first idle second and a bound on unacknowledged data: a host whose
        link is down is given up after about `dead_peer_after_s`, as a server with short keepalives would."""
        half = max(1, math.ceil(self.dead_peer_after_s / 2))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, half)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, half)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.dead_peer_after_s * 1000))

    async def _pass(self, host_reader: asyncio.StreamReader, host_writer: asyncio.StreamWriter, port: int) -> None:
        self._watch_peer(host_writer.get_extra_info("socket"))
        try:
            service_reader, service_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            host_writer.close()
            return
        pumps = [asyncio.ensure_future(self._pump(host_reader, service_writer)),
                 asyncio.ensure_future(self._pump(service_reader, host_writer))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass  # tearing down: close both sides below
        finally:
            for pump in pumps:
                pump.cancel()
            for writer in (host_writer, service_writer):
                writer.close()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass

    def close(self) -> None:
        async def shut() -> None:
            for server in self.servers.values():
                server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
            except Exception:  # noqa: BLE001 - tearing down: the loop stops below in any case
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        self.servers.clear()


@dataclass
class HostWorkers:
    """Celery worker processes inside one host."""

    host: Host
    broker_settings: Settings
    nodes: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Block until every worker answers a ping through the broker (from the root namespace)."""
        from common.broker import Broker

        broker = Broker(self.broker_settings)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"a worker of host {self.host.name} exited at start; see its log")
            if set(broker.workers_online(timeout=1.0)).issuperset(self.nodes):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the workers of host {self.host.name} did not come online within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL to what is left."""
        _stop(self.processes, timeout)
        self.processes.clear()


def _stop(processes: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM to every process group at once, SIGKILL to those still there after `timeout`: a worker whose
    link was down may be stuck on a dead connection and never finish its warm shutdown."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class NetnsHosts:
    """`hosts` worker hosts in network namespaces, reaching this machine's services only through a
    forwarded service address. Use as a context manager; see the module docstring for the API."""

    def __init__(self, hosts: int = 3, ports: tuple[int, ...] = (), dead_peer_after_s: float = 5.0) -> None:
        self.count = hosts
        self.ports = ports
        self.dead_peer_after_s = dead_peer_after_s
        self.slot: int | None = None
        self.hosts: list[Host] = []
        self.workers: list[HostWorkers] = []
        self._forwarder: _Forwarder | None = None

    # -- setting up and tearing down -------------------------------------------------------------------

    @property
    def service_address(self) -> str:
        return f"{self._prefix}.1"

    @property
    def _prefix(self) -> str:
        assert self.slot is not None, "NetnsHosts is set up by `with`"
        return f"198.{18 + self.slot // 256}.{self.slot % 256}"

    def __enter__(self) -> NetnsHosts:
        check_available()
        self.slot = _claim_slot()
        try:
            for i in range(self.count):
                self._add_host(i)
            self._forwarder = _Forwarder(self.service_address, self.dead_peer_after_s)
            for port in self.ports:
                self.expose(port)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_host(self, i: int) -> None:
        host = Host(name=f"shuttle-{self.slot}-h{i}", namespace=f"shuttle-{self.slot}-h{i}",
                    address=f"{self._prefix}.{10 + i}", root_link=f"sh{self.slot}h{i}")
        try:
            _ip("netns", "add", host.namespace)
        except RuntimeError as exc:
            raise Unavailable(f"`ip netns add` failed: {exc}") from None
        self.hosts.append(host)
        _ip("link", "add", host.root_link, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
        # The same service address on every root-side link, each with a route to its one host (peer).
        _ip("addr", "add", f"{self.service_address}/32", "peer", f"{host.address}/32", "dev", host.root_link)
        _ip("link", "set", host.root_link, "up")
        _ip("-n", host.namespace, "addr", "add", f"{host.address}/32", "peer", f"{self.service_address}/32",
            "dev", "eth0")
        _ip("-n", host.namespace, "link", "set", "lo", "up")
        _ip("-n", host.namespace, "link", "set", "eth0", "up")

    def close(self) -> None:
        """Everything this instance made, in reverse; each step runs even if an earlier one failed."""
        try:
            _stop([p for workers in self.workers for p in workers.processes], timeout=5.0)
        except Exception:  # noqa: BLE001 - go on tearing down
            pass
        self.workers.clear()
        if self._forwarder is not None:
            self._forwarder.close()
            self._forwarder = None
        for host in self.hosts:
            _kill_inside(host.namespace)  # what a caller started inside with .command(): ours to end
            _ip("netns", "del", host.namespace, check=False)
            _ip("link", "del", host.root_link, check=False)
        self.hosts.clear()
        if self.slot is not None:
            (CLAIMS / f"{self.slot}.pid").unlink(missing_ok=True)
            self.slot = None

    # -- services --------------------------------------------------------------------------------------

    def expose(self, port: int) -> None:
        """Forward service_address:port to 127.0.0.1:port (once per port)."""
        assert self._forwarder is not None, "NetnsHosts is set up by `with`"
        try:
            self._forwarder.expose(port)
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                raise RuntimeError(f"cannot listen on {self.service_address}:{port}: {exc}") from None
            raise

    def url(self, url: str) -> str:
        """`url` with a 127.0.0.1/localhost host moved to the service address (and its port exposed); a
        `;`-separated list (Celery failover brokers) part by part; any other URL unchanged."""
        if ";" in url:
            return ";".join(self.url(part) for part in url.split(";"))
        parts = urlsplit(url)
        if parts.hostname not in LOCAL_HOSTS:
            return url
        default_ports = {"postgresql": 5432, "postgres": 5432, "redis": 6379, "mongodb": 27017, "amqp": 5672}
        port = parts.port or default_ports.get(parts.scheme)
        if port is None:
            return url
        self.expose(port)
        userinfo, _, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@" if userinfo else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}{self.service_address}:{port}"))

    def settings(self, settings: Settings) -> Settings:
        """The same settings with every URL reachable from the hosts."""
        update = {"broker_url": self.url(settings.broker_url), "ledger_url": self.url(settings.ledger_url),
                  "result_backend": self.url(settings.effective_result_backend)}
        for key in ("source_url", "target_url"):
            value = getattr(settings, key)
            if value:
                update[key] = self.url(value)
        return settings.model_copy(update=update)

    # -- hosts -----------------------------------------------------------------------------------------

    def command(self, host: Host, argv: list[str]) -> list[str]:
        """argv as run inside `host`: its network namespace, and a UTS namespace whose hostname is its name."""
        return ["ip", "netns", "exec", host.namespace, "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', host.name, *argv]

    def start_workers(self, host: Host, settings: Settings, count: int = 1, concurrency: int = 1, name: str = "w",
                      log_dir: Path | None = None, extra_env: dict[str, str] | None = None,
                      wait: bool = True) -> HostWorkers:
        """`count` Celery workers inside `host`, consuming `settings.queue`, named f"{name}{j}@{host.name}"."""
        reachable = self.settings(settings)
        env = worker_env(reachable, extra_env)
        group = HostWorkers(host, reachable)
        for j in range(count):
            node = f"{name}{j}@{host.name}"
            log = open(log_dir / f"{host.name}-{name}{j}.log", "ab") if log_dir else subprocess.DEVNULL
            argv = [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel=INFO", "--events",
                    "--queues", reachable.queue, "--concurrency", str(concurrency), "--hostname", node,
                    "--without-gossip", "--without-mingle"]
            group.processes.append(subprocess.Popen(
                self.command(host, argv), cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
            group.nodes.append(node)
        self.workers.append(group)
        if wait:
            group.wait_ready()
        return group

    def link_down(self, host: Host) -> None:
        """Pull the host's cable: its side of the link goes down, so nothing passes either way."""
        _ip("-n", host.namespace, "link", "set", "eth0", "down")

    def link_up(self, host: Host) -> None:
        """Plug it back: the link comes up with its address and its route to the service address."""
        _ip("-n", host.namespace, "link", "set", "eth0", "up")
