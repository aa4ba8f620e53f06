"""Starting, stopping and surviving: signals, drain, startup errors, descriptor shortage."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import connect, echo_server, exchange, recv_all, recv_exactly
from tcpfwd.vocabulary import End

# Tests with live sessions: drain, grace and descriptor accounting differ by relay.
each_relay = pytest.mark.usefixtures("relay_mode")


@each_relay
def test_sigterm_lets_live_sessions_finish_then_exits_zero(run_tcpfwd):
    with echo_server() as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, "--grace-period", "10s")
        address = proxy.address()
        client = connect(address)
        client.sendall(b"before")
        assert recv_exactly(client, 6) == b"before"
        proxy.signal(signal.SIGTERM)
        proxy.wait_for_event("stopping")
        # New connections are refused once the stop has begun...
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=2)
        # ...while the live session keeps working until its client is done.
        client.sendall(b"during")
        assert recv_exactly(client, 6) == b"during"
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
        client.close()
        assert proxy.wait(10) == 0
        (record,) = proxy.access_records(1)
        assert record["end"] == End.CLIENT_CLOSED


@each_relay
def test_sessions_left_after_the_grace_period_are_closed(run_tcpfwd):
    with echo_server() as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, "--grace-period", "500ms")
        client = connect(proxy.address(), timeout=5)
        client.sendall(b"x")
        assert recv_exactly(client, 1) == b"x"
        started = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(10) == 0
        assert 0.4 <= time.monotonic() - started < 5
        with contextlib.suppress(ConnectionResetError):
            assert recv_all(client) == b""
        client.close()
        (record,) = proxy.access_records(1)
        assert record["end"] == End.SHUTDOWN


@each_relay
def test_second_sigint_ends_live_sessions_at_once(run_tcpfwd):
    with echo_server() as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, "--grace-period", "60s")
        client = connect(proxy.address(), timeout=5)
        client.sendall(b"x")
        assert recv_exactly(client, 1) == b"x"
        proxy.signal(signal.SIGINT)
        proxy.wait_for_event("stopping")
        proxy.signal(signal.SIGINT)
        assert proxy.wait(5) == 0
        client.close()


def test_port_in_use_is_one_clear_line_and_exit_one(run_tcpfwd):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proxy = run_tcpfwd(f"127.0.0.1:{port}", "127.0.0.1:9", ready=None)
        assert proxy.wait(10) == 1
        assert proxy.events == [
            f"tcpfwd: cannot listen on 127.0.0.1:{port}: Address already in use"
        ]


def test_permission_denied_on_a_privileged_port_exits_one(run_tcpfwd):
    # Without CAP_NET_BIND_SERVICE (dropped even for root) ports below 1024 are refused.
    prefix = ["setpriv", "--bounding-set=-net_bind_service"] if os.geteuid() == 0 else []
    proxy = run_tcpfwd("127.0.0.1:1", "127.0.0.1:9", ready=None, prefix=prefix)
    assert proxy.wait(10) == 1
    assert proxy.events[-1] == "tcpfwd: cannot listen on 127.0.0.1:1: Permission denied"


@each_relay
@pytest.mark.relay_fallback_allowed
def test_at_the_descriptor_limit_clients_wait_in_the_queue_and_are_served_later(run_tcpfwd):
    with echo_server() as backend:
        proxy = run_tcpfwd(
            "127.0.0.1:0", backend.address, prefix=["prlimit", "--nofile=64:64", "--"]
        )
        capacity = proxy.capacity()
        assert 4 <= capacity < 30
        address = proxy.address()
        first = [connect(address, timeout=5) for _ in range(capacity)]
        for client in first:
            client.sendall(b"x")
            assert recv_exactly(client, 1) == b"x"
        waiting = [connect(address, timeout=5) for _ in range(capacity)]
        for client in waiting:
            client.sendall(b"y")
        proxy.wait_for_event("descriptor limit reached")
        cpu_before = proxy.cpu_seconds()
        time.sleep(1.0)
        assert proxy.cpu_seconds() - cpu_before < 0.3, "the daemon spins at the limit"
        for client in first:
            client.close()
        # The queued clients were never dropped: they are served once sessions end.
        for client in waiting:
            assert recv_exactly(client, 1) == b"y"
            client.close()
        assert exchange(address, b"after", timeout=10) == b"after"
        records = proxy.access_records(2 * capacity + 1)
        assert all(r["end"] == End.CLIENT_CLOSED for r in records)


def test_accept_backs_off_instead_of_spinning_when_descriptors_run_out():
    probe = Path(__file__).with_name("fd_shortage_probe.py")
    result = subprocess.run(
        [sys.executable, str(probe)], capture_output=True, text=True, timeout=60, check=True
    )
    report = json.loads(result.stdout)
    assert report["starved_cpu"] < 0.3, "the accept loop spins while descriptors are short"
    assert report["accepted"] == 10, "queued connections were lost"
    assert "accept on 127.0.0.1:" in result.stderr


def test_module_and_console_script_both_run():
    for command in ([sys.executable, "-m", "tcpfwd", "--version"], ["tcpfwd", "--version"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
        assert result.stdout.startswith("tcpfwd ")
