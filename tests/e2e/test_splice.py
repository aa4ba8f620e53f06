"""What only the splice relay has: its selection, its pipes, and their reuse.

The behaviour both relays share (half-close, resets, integrity, flow control, idle
timeout) is tested once for each in test_relay.py and test_failover.py; the pipe pool
on its own in tests/unit/test_splice.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from support import (
    RST_ON_CLOSE,
    SPLICE_AVAILABLE,
    ThreadedServer,
    connect,
    echo_server,
    exchange,
    open_descriptors,
    recv_all,
    recv_exactly,
    wait_until,
)
from tcpfwd.splice import PIPE_POOL_MAX
from tcpfwd.vocabulary import End, RelayMode

pytestmark = pytest.mark.skipif(not SPLICE_AVAILABLE, reason="no splice(2) here")


def test_auto_relay_copies_short_sessions_and_splices_bulk_ones(run_tcpfwd):
    bulk = os.urandom(4 << 20)
    with echo_server() as backend:
        auto = run_tcpfwd("127.0.0.1:0", backend.address)
        copy = run_tcpfwd("127.0.0.1:0", backend.address, "--relay", "copy")
        for proxy in (auto, copy):
            assert exchange(proxy.address(), b"which?") == b"which?"
            assert exchange(proxy.address(), bulk) == bulk
        assert [r["relay"] for r in auto.access_records(2)] == [RelayMode.COPY, RelayMode.SPLICE]
        assert [r["relay"] for r in copy.access_records(2)] == [RelayMode.COPY, RelayMode.COPY]


def test_a_pipe_left_with_bytes_is_never_given_to_another_session(run_tcpfwd):
    # The first session ends (idle timeout) while a pipe still holds backend bytes the
    # client never read; the next session must see only its own bytes.
    flooding = threading.Event()

    def flood_or_echo(conn: socket.socket) -> None:
        first = conn.recv(5)
        if first == b"flood":
            flooding.set()
            with contextlib.suppress(OSError):
                while True:
                    conn.sendall(b"F" * 65536)
            return
        conn.sendall(first)
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)

    with ThreadedServer(flood_or_echo) as backend:
        proxy = run_tcpfwd(
            "127.0.0.1:0", backend.address, "--relay", "splice", "--idle-timeout", "300ms"
        )
        stuck = connect(proxy.address())
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"flood")
        assert flooding.wait(5)
        (first,) = proxy.access_records(1, timeout=10)
        stuck.close()
        assert first["end"] == End.IDLE_TIMEOUT
        assert int(first["from_backend"]) > 0
        for i in range(4):
            payload = b"hello %d " % i * 1000
            assert exchange(proxy.address(), payload) == payload
        records = proxy.access_records(5)
        assert [r["relay"] for r in records] == [RelayMode.SPLICE] * 5


def test_descriptors_return_to_a_bound_after_many_sessions(run_tcpfwd):
    # Sessions end every way a spliced session can: both sides close, client reset,
    # backend reset, idle timeout. Whatever the way, the session's sockets and pipes go:
    # only the pool's few idle pipes may remain, and a second round reuses them.
    def serve(conn: socket.socket) -> None:
        command = conn.recv(5)
        if command == b"reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_ON_CLOSE)
            return
        if command == b"sleep":
            time.sleep(1.0)
            return
        conn.sendall(command)
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)

    with ThreadedServer(serve) as backend:
        proxy = run_tcpfwd(
            "127.0.0.1:0", backend.address, "--relay", "splice", "--idle-timeout", "300ms"
        )
        address = proxy.address()
        # The event loop opens some descriptors of its own on first use (io_uring).
        assert exchange(address, b"warm up") == b"warm up"
        proxy.access_records(1)
        baseline = open_descriptors(proxy.pid)
        # Only the pool's idle pipes, two descriptors each, may stay open.
        bound = baseline + 2 * PIPE_POOL_MAX

        def session(kind: int) -> None:
            with connect(address, timeout=10) as client:
                if kind == 0:
                    client.sendall(b"echo!" + os.urandom(200_000))
                    client.shutdown(socket.SHUT_WR)
                    assert len(recv_all(client)) == 200_005
                elif kind == 1:
                    client.sendall(b"echo!")
                    assert recv_exactly(client, 5) == b"echo!"
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_ON_CLOSE)
                elif kind == 2:
                    client.sendall(b"reset")
                    with contextlib.suppress(ConnectionResetError):
                        recv_all(client)
                else:
                    client.sendall(b"sleep")
                    with contextlib.suppress(ConnectionResetError):
                        recv_all(client)

        def round_of_sessions(count: int, logged: int) -> int:
            with ThreadPoolExecutor(max_workers=20) as pool:
                list(pool.map(session, [i % 4 for i in range(count)]))
            proxy.access_records(logged, timeout=10)
            # The loop closes a transport's own descriptor on its next turn: give it one.
            wait_until(
                lambda: open_descriptors(proxy.pid) <= bound, "descriptors within the bound", 5
            )
            return open_descriptors(proxy.pid)

        after_first = round_of_sessions(80, logged=81)
        ends = {r["end"] for r in proxy.access_records(81)[1:]}
        assert ends >= {End.CLIENT_CLOSED, End.CLIENT_RESET, End.BACKEND_RESET, End.IDLE_TIMEOUT}
        after_second = round_of_sessions(80, logged=161)
        assert after_first <= bound
        assert after_second <= after_first


@pytest.mark.skipif(not SPLICE_AVAILABLE, reason="splice(2) is Linux-only")
def test_idle_spliced_sessions_hold_no_pipes(run_tcpfwd):
    """A direction takes a pipe only while bytes are in flight: idle sessions keep just
    their two sockets, so splicing costs no session capacity."""
    with echo_server() as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, "--relay", "splice")
        address = proxy.address()
        assert exchange(address, b"warm up") == b"warm up"
        proxy.access_records(1)
        baseline = open_descriptors(proxy.pid)
        clients = []
        for _ in range(50):
            client = connect(address)
            client.sendall(os.urandom(100_000))
            clients.append(client)
        for client in clients:
            recv_exactly(client, 100_000)
        # Everything echoed: every session is idle now, holding its two sockets only
        # (the pool may keep a few empty pipes for the next busy moment).
        held = open_descriptors(proxy.pid) - baseline
        # Pipes held per session would make it 6 each: 300 and more.
        assert held <= 2 * 50 + 2 * PIPE_POOL_MAX, f"{held} descriptors for 50 idle sessions"
        for client in clients:
            client.close()
        records = proxy.access_records(51)
        assert all(r["relay"] == RelayMode.SPLICE for r in records[1:])


@pytest.mark.relay_fallback_allowed
def test_at_a_low_descriptor_limit_no_accepted_client_is_dropped_and_health_is_untouched(
    run_tcpfwd,
):
    """More idle spliced clients than descriptors allow: the extra ones wait in the
    listen queue; none is accepted and then failed, and a shortage is never the
    backend's fault."""
    with echo_server() as backend:
        proxy = run_tcpfwd(
            "127.0.0.1:0",
            backend.address,
            "--relay",
            "splice",
            prefix=["prlimit", "--nofile=1024:1024", "--"],
        )
        capacity = proxy.capacity()
        address = proxy.address()
        clients = []
        for _ in range(700):
            client = socket.create_connection(address, timeout=10)
            client.sendall(os.urandom(1000))
            clients.append(client)
        served = clients[:capacity]
        for client in served:
            assert len(recv_exactly(client, 1000)) == 1000
        proxy.wait_for_event("descriptor limit reached")
        # Places freed: the queued clients are served, in turn.
        for client in served:
            client.close()
        for client in clients[capacity:]:
            assert len(recv_exactly(client, 1000)) == 1000
            client.close()
        records = proxy.access_records(700, timeout=30)
    assert capacity < 700
    assert all(r["failed"] == "-" for r in records), [r for r in records if r["failed"] != "-"]
    assert all(r["end"] == End.CLIENT_CLOSED for r in records)
    assert not [e for e in proxy.events if " is down" in e]
