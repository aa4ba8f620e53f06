"""Transparent mode: backends see the client's own address, with no PROXY header.

The end-to-end tests build real networks of namespaces (see ``netns.py``): a client,
the tcpfwd host and a backend, joined by veth pairs, with a router between the tcpfwd
host and the backend in the "routed" layout::

    client 10.77.1.2 ── 10.77.1.1 tcpfwd 10.77.2.1 ── 10.77.2.2 backend            (lan)
    client 10.77.1.2 ── 10.77.1.1 tcpfwd 10.77.2.1 ── 10.77.2.2 router 10.77.3.1
                                                            ── 10.77.3.2 backend   (routed)

and the same with fd77:N::/64 for IPv6. The client also holds 10.77.9.2 (fd77:9::2),
an address the backend has no route back to. The tcpfwd host runs the recipe of
docs/transparent.md, read from the document itself, so the document is what is tested.
Ports chosen by the kernel come from 42000-42999 on the tcpfwd host and 51000-51999 on
the client, so a port the backend reports tells whose it is. The configuration keys and
the capability check are tested without a network in tests/unit/test_transparent.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import netns
from netns import Lab, Namespace
from peers import postfix
from support import (
    ROOT,
    Tcpfwd,
    echo_server,
    failed_attempts,
    recv_all,
    run_command,
    service_config,
    split_hostport,
    toml_table,
    wait_until,
    write_config,
)
from tcpfwd.transparent import (
    IP_TRANSPARENT,
    IPV6_TRANSPARENT,
    transparent_socket,
)
from tcpfwd.vocabulary import End, Outcome

RECIPE = ROOT / "docs" / "transparent.md"
HOST_PORTS = (42000, 42999)
CLIENT_PORTS = (51000, 51999)
LISTEN_PORT = 2525
BACKEND_PORT = 7000
DEAD_PORT = 7001
FAMILIES = ("ipv4", "ipv6")
STRIPPED = ["setpriv", "--inh-caps=-all", "--bounding-set=-net_admin,-net_raw"]


def addr(family: str, net: int, host: int) -> str:
    return f"10.77.{net}.{host}" if family == "ipv4" else f"fd77:{net}::{host}"


def cidr(family: str, net: int, host: int) -> str:
    return f"{addr(family, net, host)}/{24 if family == 'ipv4' else 64}"


def subnet(family: str, net: int) -> str:
    return f"10.77.{net}.0/24" if family == "ipv4" else f"fd77:{net}::/64"


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def recipe(family: str) -> str:
    """The tcpfwd host's commands for ``family``, as docs/transparent.md gives them."""
    heading = "IPv4" if family == "ipv4" else "IPv6"
    blocks = re.findall(r"```sh\n(# On the tcpfwd host[^\n]*\n.*?)```", RECIPE.read_text(), re.S)
    chosen = [b for b in blocks if heading in b.splitlines()[0]]
    assert len(chosen) == 1, f"docs/transparent.md: one tcpfwd host block for {heading}"
    return chosen[0]


@dataclass
class Net:
    client: Namespace
    host: Namespace
    backend: Namespace
    family: str
    backend_ip: str

    def ip(self, net: int, host: int) -> str:
        return addr(self.family, net, host)

    @property
    def client_ip(self) -> str:
        return self.ip(1, 2)

    @property
    def listen(self) -> str:
        return hostport(self.ip(1, 1), LISTEN_PORT)

    def backend_at(self, port: int) -> str:
        return hostport(self.backend_ip, port)


def build(lab: Lab, family: str, *, routed: bool = False) -> Net:
    client, host, backend = lab.namespace("c"), lab.namespace("h"), lab.namespace("b")
    lab.link(client, "c0", host, "h0")
    flags = ["nodad"] if family == "ipv6" else []
    ip_flag = "-6" if family == "ipv6" else "-4"

    def address(ns: Namespace, device: str, net: int, number: int) -> None:
        ns.ip("addr", "add", cidr(family, net, number), "dev", device, *flags)

    def route(ns: Namespace, to: str, via: str) -> None:
        ns.ip(ip_flag, "route", "add", to, "via", via)

    address(client, "c0", 1, 2)
    address(client, "c0", 9, 2)
    route(client, "default", addr(family, 1, 1))
    address(host, "h0", 1, 1)
    address(host, "h0", 9, 1)
    if routed:
        router = lab.namespace("r")
        lab.link(host, "h1", router, "r0")
        lab.link(router, "r1", backend, "b0")
        address(host, "h1", 2, 1)
        address(router, "r0", 2, 2)
        address(router, "r1", 3, 1)
        address(backend, "b0", 3, 2)
        route(host, subnet(family, 3), addr(family, 2, 2))
        # The router sends the client network's traffic back to the tcpfwd host.
        route(router, subnet(family, 1), addr(family, 2, 1))
        router.sysctl(
            "net.ipv4.ip_forward" if family == "ipv4" else "net.ipv6.conf.all.forwarding", "1"
        )
        route(backend, subnet(family, 1), addr(family, 3, 1))
        backend_ip = addr(family, 3, 2)
    else:
        lab.link(host, "h1", backend, "b0")
        address(host, "h1", 2, 1)
        address(backend, "b0", 2, 2)
        # The backend's way back to clients is through the tcpfwd host; 10.77.9.0/24 has none.
        route(backend, subnet(family, 1), addr(family, 2, 1))
        backend_ip = addr(family, 2, 2)
    host.sh(recipe(family))
    host.sysctl("net.ipv4.ip_local_port_range", f"{HOST_PORTS[0]} {HOST_PORTS[1]}")
    client.sysctl("net.ipv4.ip_local_port_range", f"{CLIENT_PORTS[0]} {CLIENT_PORTS[1]}")
    return Net(client, host, backend, family, backend_ip)


class PeerReporter:
    """A server in a namespace that tells each connection who it is: ``you are IP PORT``,
    then waits for the peer to finish. Remembers every peer, health checks included."""

    def __init__(self, ns: Namespace, ip: str, port: int = BACKEND_PORT) -> None:
        self.sock = ns.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen(64)
        self.peers: list[tuple[str, int]] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append((peer[0], peer[1]))
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket, peer: tuple[str, int]) -> None:
        with conn:
            try:
                conn.sendall(f"you are {peer[0]} {peer[1]}\n".encode())
                conn.settimeout(10)
                while conn.recv(4096):
                    pass
            except OSError:
                pass

    def close(self) -> None:
        # shutdown wakes the accept() blocked in the thread.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


def ask_who(net: Net, source: str | None = None) -> tuple[str, int]:
    """Through tcpfwd as a client of ``net``: the address the backend says we have."""
    with connected(net, source) as sock:
        line = sock.makefile("rb").readline()
    words = line.split()
    assert words[:2] == [b"you", b"are"], line
    return words[2].decode(), int(words[3])


@contextlib.contextmanager
def connected(
    net: Net, source: str | None = None, timeout: float = 10.0
) -> Iterator[socket.socket]:
    """A client socket of ``net``'s client namespace connected to tcpfwd's listener."""
    sock = net.client.socket(socket.AF_INET6 if net.family == "ipv6" else socket.AF_INET)
    with sock:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))
        sock.connect(split_hostport(net.listen))
        yield sock


@pytest.fixture
def lab() -> Iterator[Lab]:
    with netns.lab() as made:
        yield made


def config_text(net: Net, *, log_format: str = "text", workers: int = 1, **keys: Any) -> str:
    return toml_table("global", log_format=log_format, workers=workers) + service_config(
        name="s", listen=net.listen, **keys
    )


def start(net: Net, tmp_path: Path, **settings: Any) -> Tcpfwd:
    """tcpfwd on the tcpfwd host with one service ``net`` listens for: its ``backends``
    and other keys, and the log format and worker count."""
    config = write_config(tmp_path, config_text(net, **settings))
    return Tcpfwd(["run", "--config", str(config)], prefix=net.host.prefix)


def in_range(port: int, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= port <= bounds[1]


# --- the backend sees the client --------------------------------------------------------


@pytest.mark.parametrize("layout", ["lan", "routed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_backend_sees_the_client_address_and_a_port_of_the_tcpfwd_host(
    lab, tmp_path, family, layout
):
    net = build(lab, family, routed=layout == "routed")
    server = PeerReporter(net.backend, net.backend_ip)
    proxy = start(net, tmp_path, backends=[net.backend_at(BACKEND_PORT)], transparent=True)
    try:
        with connected(net) as sock:
            client_port = sock.getsockname()[1]
            words = sock.makefile("rb").readline().split()
            seen_ip, seen_port = words[2].decode(), int(words[3])
            # While it is open, the tcpfwd host shows it from the client's address.
            sockets = net.host.run("ss", "-tnp").stdout
        (record,) = proxy.access_records(1)
    finally:
        proxy.kill()
        server.close()
    assert seen_ip == net.client_ip
    assert in_range(seen_port, HOST_PORTS), seen_port
    assert in_range(client_port, CLIENT_PORTS)
    own = hostport(net.client_ip, seen_port)
    (line,) = [line for line in sockets.splitlines() if f" {own} " in line]
    assert line.startswith("ESTAB"), line
    assert f" {net.backend_at(BACKEND_PORT)} " in line, line
    assert f"pid={proxy.pid}," in line, line
    assert record["client"] == hostport(net.client_ip, client_port)
    assert record["local"] == own
    assert record["transparent"] == "1"
    assert record["end"] == End.CLIENT_CLOSED


@pytest.mark.parametrize("family", FAMILIES)
def test_postfix_smtpd_logs_the_client_address(lab, tmp_path, family):
    net = build(lab, family)
    smtpd = f"{hostport(net.backend_ip, 25)} inet n - n - - smtpd\n"
    main_cf = f"inet_interfaces = all\ninet_protocols = {family}\nsmtpd_client_port_logging = yes\n"
    with postfix(tmp_path, smtpd, main_cf, ports=(25,), prefix=net.backend.prefix) as mail:
        proxy = start(
            net, tmp_path, backends=[net.backend_at(25)], transparent=True, greeting="smtp"
        )
        try:
            with connected(net) as sock:
                greeting = sock.recv(1024)
                sock.sendall(b"QUIT\r\n")
                reply = greeting + recv_all(sock)
            (record,) = proxy.access_records(1)
        finally:
            proxy.kill()
        assert reply.startswith(b"220 "), reply
        assert b"221 " in reply
        shown = re.escape(net.client_ip)
        found = mail.wait_for_log(rf"smtpd\[\d+\]: connect from unknown\[{shown}\]:(\d+)")
    port = int(found.group(1))
    assert in_range(port, HOST_PORTS), port
    assert record["local"] == hostport(net.client_ip, port)
    assert record["transparent"] == "1"


def test_failover_from_a_dead_first_backend_keeps_the_client_address(lab, tmp_path):
    net = build(lab, "ipv4")
    server = PeerReporter(net.backend, net.backend_ip)
    dead, alive = net.backend_at(DEAD_PORT), net.backend_at(BACKEND_PORT)
    proxy = start(net, tmp_path, backends=[dead, alive], transparent=True, log_format="json")
    try:
        seen = ask_who(net)
        (record,) = proxy.access_records(1)
    finally:
        proxy.kill()
        server.close()
    assert seen[0] == net.client_ip
    assert in_range(seen[1], HOST_PORTS)
    assert [(a["address"], a["outcome"]) for a in record["attempts"]] == [
        (dead, Outcome.REFUSED),
        (alive, Outcome.OK),
    ]
    assert record["transparent"] is True
    assert record["local_address"] == hostport(net.client_ip, seen[1])


def test_health_checks_connect_from_the_tcpfwd_host_address(lab, tmp_path):
    net = build(lab, "ipv4")
    server = PeerReporter(net.backend, net.backend_ip)
    proxy = start(
        net,
        tmp_path,
        backends=[net.backend_at(BACKEND_PORT)],
        transparent=True,
        health={"check": "tcp", "interval": "0.2s"},
    )
    try:
        seen = ask_who(net)
        wait_until(lambda: len(server.peers) >= 3, "the client and two checks", 10)
    finally:
        proxy.kill()
        server.close()
    assert seen[0] == net.client_ip
    sources = {ip for ip, _port in server.peers}
    # Checks come from the host's own address on the backend's side; only the client's
    # session comes from the client's.
    assert sources == {net.client_ip, net.ip(2, 1)}, server.peers
    assert [p for p in server.peers if p[0] == net.client_ip] == [seen]


def test_client_named_by_a_trusted_proxy_header_is_the_source(lab, tmp_path):
    net = build(lab, "ipv4")
    server = PeerReporter(net.backend, net.backend_ip)
    named = net.ip(1, 77)
    proxy = start(
        net,
        tmp_path,
        backends=[net.backend_at(BACKEND_PORT)],
        transparent=True,
        accept_proxy=True,
        trusted_sources=[f"{net.client_ip}/32"],
    )
    try:
        with connected(net) as sock:
            sock.sendall(f"PROXY TCP4 {named} {net.ip(1, 1)} 40000 {LISTEN_PORT}\r\n".encode())
            words = sock.makefile("rb").readline().split()
        (record,) = proxy.access_records(1)
    finally:
        proxy.kill()
        server.close()
    assert words[2].decode() == named
    assert record["client"] == f"{named}:40000"
    assert record["via"].startswith(f"{net.client_ip}:")
    assert record["transparent"] == "1"


def test_unroutable_client_address_fails_the_attempt_within_the_connect_timeout(lab, tmp_path):
    """The backend cannot answer 10.77.9.2: the attempt times out and says so; no hang."""
    net = build(lab, "ipv4")
    server = PeerReporter(net.backend, net.backend_ip)
    backend = net.backend_at(BACKEND_PORT)
    proxy = start(net, tmp_path, backends=[backend], transparent=True, connect_timeout="1s")
    try:
        started = time.monotonic()
        with connected(net, source=net.ip(9, 2)) as sock:
            assert recv_all(sock) == b""
        waited = time.monotonic() - started
        (record,) = proxy.access_records(1)
    finally:
        proxy.kill()
        server.close()
    assert 0.9 < waited < 5, waited
    assert record["end"] == End.NO_BACKEND
    (failure,) = failed_attempts(record)
    assert failure.startswith(f"{backend}/{Outcome.TIMEOUT}/")
    assert record["transparent"] == "0"
    assert server.peers == []


def test_transparent_sessions_in_every_worker(lab, tmp_path):
    net = build(lab, "ipv4")
    server = PeerReporter(net.backend, net.backend_ip)
    backends = [net.backend_at(BACKEND_PORT)]
    proxy = start(net, tmp_path, backends=backends, transparent=True, workers=2)
    try:
        seen = [ask_who(net) for _ in range(20)]
        records = proxy.access_records(20)
    finally:
        proxy.kill()
        server.close()
    assert {ip for ip, _port in seen} == {net.client_ip}
    assert all(record["transparent"] == "1" for record in records)
    # Session ids start with their worker's own prefix: both workers served some.
    assert len({record["session"].split("-")[0] for record in records}) == 2


def test_reload_turns_transparent_mode_on(lab, tmp_path):
    net = build(lab, "ipv4")
    server = PeerReporter(net.backend, net.backend_ip)
    backends = [net.backend_at(BACKEND_PORT)]
    proxy = start(net, tmp_path, backends=backends)
    try:
        before = ask_who(net)
        write_config(tmp_path, config_text(net, backends=backends, transparent=True))
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_event("reloaded")
        after = ask_who(net)
    finally:
        proxy.kill()
        server.close()
    assert before[0] == net.ip(2, 1)
    assert after[0] == net.client_ip


def _root_namespace_state() -> list[str]:
    commands = [
        ["ip", "-o", "link", "show"],
        ["ip", "rule", "show"],
        ["ip", "-6", "rule", "show"],
        ["iptables", "-t", "mangle", "-S"],
        ["ip6tables", "-t", "mangle", "-S"],
    ]
    return [netns.run(*command).stdout for command in commands]


def _fail_inside(made: Lab, inside: dict[str, Any]) -> None:
    """Fill a lab with namespaces, a link, rules, a socket and a process; then fail."""
    with made:
        first, second = made.namespace("p"), made.namespace("q")
        made.link(first, "p0", second, "q0")
        first.sh(recipe("ipv4"))
        inside["socket"] = first.socket()
        inside["process"] = subprocess.Popen([*first.prefix, "sleep", "60"])
        inside["names"] = [first.name, second.name]
        assert all((netns.NETNS_DIR / name).exists() for name in inside["names"])
        raise RuntimeError("the test failed")


def test_lab_removes_everything_it_made_when_the_test_fails():
    netns.require()
    before = _root_namespace_state()
    made, inside = Lab(), {}
    with pytest.raises(RuntimeError, match="the test failed"):
        _fail_inside(made, inside)
    assert inside["process"].wait(10) == -signal.SIGKILL
    assert inside["socket"].fileno() == -1
    assert not any((netns.NETNS_DIR / name).exists() for name in inside["names"])
    listed = [line.split()[0] for line in netns.run("ip", "netns", "list").stdout.splitlines()]
    assert not set(listed) & set(inside["names"])
    # Links, rules and iptables rules lived inside the namespaces: nothing reached ours.
    assert _root_namespace_state() == before


# --- failures of our own bind -------------------------------------------------------------


def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("transparent sockets need CAP_NET_ADMIN: run as root")


def _loopback_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_failed_transparent_bind_is_an_attempt_failure_that_leaves_the_backend_up(
    run_tcpfwd, tmp_path
):
    """An IPv6 client cannot be the source towards an IPv4 backend: each session's first
    attempt fails with transparent_bind, and the backend is not marked down for it (a
    down backend would be tried last, and the second session would start elsewhere)."""
    _root_only()
    if not _loopback_ipv6():
        pytest.skip("no IPv6 on loopback")
    with echo_server() as first, echo_server() as second:
        config = write_config(
            tmp_path,
            '[services.s]\nlisten = "[::1]:0"\ntransparent = true\n'
            f'backends = ["{first.address}", '
            f'{{ address = "{second.address}", transparent = false }}]\n',
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        for payload in (b"one", b"two"):
            with socket.create_connection(proxy.address("s"), timeout=10) as sock:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                assert recv_all(sock) == payload
        records = proxy.access_records(2)
        assert first.accepted == 0
    for record in records:
        (failure,) = failed_attempts(record)
        assert failure.startswith(f"{first.address}/{Outcome.TRANSPARENT_BIND}/")
        assert record["backend_addr"] == second.address
        assert record["transparent"] == "0"
    assert not [e for e in proxy.events if " is down" in e], proxy.events


def test_transparent_socket_is_non_blocking_and_bound_to_the_client_address(lab):
    ns = lab.namespace("x")
    for family, client in ((socket.AF_INET, "10.77.5.5"), (socket.AF_INET6, "fd77:5::5")):
        sock = ns.call(lambda family=family, client=client: transparent_socket(family, client))
        lab.sockets.append(sock)
        assert sock.getblocking() is False
        # The port is the kernel's choice at connect time.
        assert sock.getsockname()[:2] == (client, 0)
        level = socket.IPPROTO_IP if family == socket.AF_INET else socket.IPPROTO_IPV6
        option = IP_TRANSPARENT if family == socket.AF_INET else IPV6_TRANSPARENT
        assert sock.getsockopt(level, option) == 1


def test_ipv4_mapped_client_address_binds_as_ipv4(lab):
    ns = lab.namespace("x")
    sock = ns.call(lambda: transparent_socket(socket.AF_INET, "::ffff:10.77.5.5"))
    lab.sockets.append(sock)
    assert sock.getsockname() == ("10.77.5.5", 0)


def _without_capability(*argv: str) -> list[str]:
    """``argv`` run without CAP_NET_ADMIN and CAP_NET_RAW (as root: through setpriv)."""
    if os.geteuid() != 0:
        return list(argv)
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    return [*STRIPPED, *argv]


_BIND_PROBE = """
import socket
from tcpfwd.transparent import TransparentBindError, transparent_socket, has_transparent_capability
print(has_transparent_capability())
try:
    transparent_socket(socket.AF_INET, "10.77.5.5")
except TransparentBindError as error:
    print(error.errno, error)
"""


def test_without_the_capability_the_bind_fails_with_a_transparent_bind_error():
    argv = _without_capability(sys.executable, "-c", _BIND_PROBE)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    capable, failure = result.stdout.splitlines()
    assert capable == "False"
    assert failure.startswith("1 ")  # EPERM
    assert "needs CAP_NET_ADMIN" in failure


def test_start_without_the_capability_is_one_clear_error(tmp_path):
    result = run_command(
        "127.0.0.1:0", "127.0.0.1:9", "--transparent", prefix=_without_capability()
    )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("tcpfwd: transparent mode (service default) needs CAP_NET_ADMIN")
    assert "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE" in line


def test_reload_that_turns_transparent_on_without_the_capability_is_rejected(tmp_path):
    with echo_server() as echo:
        path = write_config(tmp_path, service_config(echo.address, name="s"))
        proxy = Tcpfwd(["run", "--config", str(path)], prefix=_without_capability())
        try:
            write_config(tmp_path, path.read_text() + "transparent = true\n")
            proxy.signal(signal.SIGHUP)
            proxy.wait_for_event(
                "reload rejected: transparent mode (service s) needs CAP_NET_ADMIN"
            )
            with socket.create_connection(proxy.address("s"), timeout=10) as sock:
                sock.sendall(b"still served")
                sock.shutdown(socket.SHUT_WR)
                assert recv_all(sock) == b"still served"
            (record,) = proxy.access_records(1)
        finally:
            proxy.kill()
    assert record["transparent"] == "0"


def test_check_says_transparent_mode_needs_cap_net_admin(tmp_path):
    config = write_config(
        tmp_path,
        '[services.smtp]\nlisten = "127.0.0.1:25"\n'
        'backends = ["10.0.0.1:25", { address = "10.0.0.2:25", transparent = true }]\n'
        '[services.plain]\nlisten = "127.0.0.1:26"\nbackends = ["10.0.0.1:25"]\n',
    )
    result = run_command("check", "--config", str(config), prefix=_without_capability())
    assert result.returncode == 0, result.stderr
    ok, note = result.stdout.splitlines()
    assert ok.endswith("OK (2 services, 2 listen addresses, 3 backends)")
    assert "transparent mode (service smtp) needs CAP_NET_ADMIN" in note
    assert "this process does not have it" in note


# --- the access line and the start as root --------------------------------------------


def test_access_line_json_says_false_when_not_transparent(run_tcpfwd):
    with echo_server() as echo:
        proxy = run_tcpfwd("127.0.0.1:0", echo.address, "--log-format", "json")
        with socket.create_connection(proxy.address(), timeout=10) as sock:
            sock.sendall(b"x")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"x"
        (line,) = proxy.wait_for_access(1)
    assert json.loads(line)["transparent"] is False


def test_start_as_root_switching_to_global_user_says_the_capability_is_dropped(tmp_path):
    _root_only()
    config = write_config(
        tmp_path,
        '[global]\nuser = "nobody"\n'
        '[services.s]\nlisten = "127.0.0.1:0"\nbackends = ["127.0.0.1:9"]\ntransparent = true\n',
    )
    checked = run_command("check", "--config", str(config))
    assert "switching to global.user drops it" in checked.stdout
    started = run_command("run", "--config", str(config))
    assert started.returncode == 1
    (line,) = started.stderr.splitlines()
    assert line.startswith("tcpfwd: transparent mode (service s) needs CAP_NET_ADMIN")
    assert "run tcpfwd as root without global.user" in line
