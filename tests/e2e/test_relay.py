"""Bytes both ways, unchanged, with flow control and half-close, through a real tcpfwd.

Every test here runs once per relay (copy and splice): both keep the same contract.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from support import (
    RST_ON_CLOSE,
    ThreadedServer,
    blackhole,
    connect,
    echo_server,
    recv_all,
    recv_exactly,
)
from tcpfwd.vocabulary import End

pytestmark = pytest.mark.usefixtures("relay_mode")


def test_client_half_close_reaches_backend_which_can_still_answer(run_tcpfwd):
    def answer_after_eof(conn: socket.socket) -> None:
        request = recv_all(conn)
        conn.sendall(b"got " + request)
        conn.shutdown(socket.SHUT_WR)

    with ThreadedServer(answer_after_eof) as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address)
        with connect(proxy.address()) as client:
            client.sendall(b"question")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"got question"
        (record,) = proxy.access_records(1)
        assert record["end"] == End.CLIENT_CLOSED


def test_backend_half_close_reaches_client_which_can_still_send(run_tcpfwd):
    received: queue.Queue[bytes] = queue.Queue()

    def speak_then_listen(conn: socket.socket) -> None:
        conn.sendall(b"bye")
        conn.shutdown(socket.SHUT_WR)
        received.put(recv_all(conn))

    with ThreadedServer(speak_then_listen) as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address)
        with connect(proxy.address()) as client:
            assert recv_all(client) == b"bye"
            client.sendall(b"still talking after your EOF")
            client.shutdown(socket.SHUT_WR)
            assert received.get(timeout=10) == b"still talking after your EOF"
        (record,) = proxy.access_records(1)
        assert record["end"] == End.BACKEND_CLOSED


def test_backend_reset_closes_the_client_promptly(run_tcpfwd):
    def reset(conn: socket.socket) -> None:
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_ON_CLOSE)
        conn.close()

    with ThreadedServer(reset) as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address)
        with connect(proxy.address(), timeout=3) as client:
            client.sendall(b"x")
            started = time.monotonic()
            with contextlib.suppress(ConnectionResetError):
                assert recv_all(client) == b""
            assert time.monotonic() - started < 2
        (record,) = proxy.access_records(1)
        assert record["end"] == End.BACKEND_RESET


def test_client_reset_closes_the_backend_promptly(run_tcpfwd):
    backend_saw_end = threading.Event()

    def wait_for_end(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        with contextlib.suppress(OSError):
            recv_all(conn)
        backend_saw_end.set()

    with ThreadedServer(wait_for_end) as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address)
        client = connect(proxy.address())
        assert recv_exactly(client, 5) == b"hello"
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_ON_CLOSE)
        client.close()
        assert backend_saw_end.wait(2)
        (record,) = proxy.access_records(1)
        assert record["end"] == End.CLIENT_RESET


def test_early_data_goes_first_even_to_a_backend_slow_to_read(run_tcpfwd):
    early = os.urandom(240_000)
    late = os.urandom(2_000_000)

    def slow_echo(conn: socket.socket) -> None:
        time.sleep(0.3)
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)

    with blackhole() as hole, ThreadedServer(slow_echo) as backend:
        proxy = run_tcpfwd("127.0.0.1:0", hole, backend.address, "--connect-timeout", "300ms")
        with connect(proxy.address(), timeout=30) as client:
            client.sendall(early)  # while the bouncer still waits on the blackhole

            def send_the_rest() -> None:
                client.sendall(late)
                client.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send_the_rest)
            sender.start()
            echoed = recv_all(client)
            sender.join()
        assert echoed == early + late
        (record,) = proxy.access_records(1)
        assert record["from_client"] == str(len(early) + len(late))


def test_random_data_over_many_parallel_sessions_arrives_intact(run_tcpfwd):
    with echo_server() as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address)
        address = proxy.address()

        def roundtrip(seed: int) -> bool:
            payload = os.urandom(512 * 1024 + seed)
            with connect(address, timeout=30) as client:
                sender = threading.Thread(
                    target=lambda: (client.sendall(payload), client.shutdown(socket.SHUT_WR))
                )
                sender.start()
                echoed = recv_all(client)
                sender.join()
            return hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()

        with ThreadPoolExecutor(max_workers=40) as pool:
            results = list(pool.map(roundtrip, range(80)))
        assert all(results)
        records = proxy.access_records(80)
        assert all(r["end"] == End.CLIENT_CLOSED for r in records)


def test_gigabyte_to_a_slow_reader_keeps_bouncer_memory_bounded_and_idle(run_tcpfwd):
    # Flow control has two failure modes: reading on regardless grows memory (the copy
    # relay buffers it), or waking up for a source it cannot drain burns CPU (the splice
    # relay's pipe is bounded by the kernel, so it would spin instead). Check both.
    total = 1 << 30
    block = os.urandom(1 << 20)
    stall = 0.25

    def firehose(conn: socket.socket) -> None:
        for _ in range(total // len(block)):
            conn.sendall(block)
        conn.shutdown(socket.SHUT_WR)

    with ThreadedServer(firehose) as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address)
        baseline = proxy.rss_bytes()
        peak = baseline
        stalls = 0
        stalled_cpu = 0.0
        digest = hashlib.sha256()
        received = 0
        with connect(proxy.address(), timeout=60) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
            next_stall = 0
            while True:
                if received >= next_stall:
                    # Stop reading for a while: the backend keeps pushing at full speed.
                    cpu_before = proxy.cpu_seconds()
                    time.sleep(stall)
                    stalled_cpu += proxy.cpu_seconds() - cpu_before
                    stalls += 1
                    peak = max(peak, proxy.rss_bytes())
                    next_stall += 128 << 20
                data = client.recv(1 << 20)
                if not data:
                    break
                digest.update(data)
                received += len(data)
        assert received == total
        expected = hashlib.sha256()
        for _ in range(total // len(block)):
            expected.update(block)
        assert digest.digest() == expected.digest()
        assert peak - baseline < 48 * 1024 * 1024, f"RSS grew by {(peak - baseline) >> 20} MiB"
        # Filling the buffers at the start of a stall takes milliseconds; then nothing.
        assert stalled_cpu < 0.3 * stalls * stall, (
            f"{stalled_cpu:.2f}s of CPU while the reader stalled for {stalls * stall:.2f}s"
        )


def test_idle_session_is_closed_after_idle_timeout(run_tcpfwd):
    with echo_server() as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, "--idle-timeout", "400ms")
        with connect(proxy.address(), timeout=5) as client:
            client.sendall(b"x")
            assert recv_exactly(client, 1) == b"x"
            started = time.monotonic()
            with contextlib.suppress(ConnectionResetError):
                assert recv_all(client) == b""
            waited = time.monotonic() - started
        assert 0.3 <= waited < 2.0
        (record,) = proxy.access_records(1)
        assert record["end"] == End.IDLE_TIMEOUT


def test_active_session_outlives_idle_timeout(run_tcpfwd):
    with echo_server() as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, "--idle-timeout", "400ms")
        with connect(proxy.address(), timeout=5) as client:
            for _ in range(12):
                client.sendall(b"tick")
                assert recv_exactly(client, 4) == b"tick"
                time.sleep(0.1)
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b""
        (record,) = proxy.access_records(1)
        assert record["end"] == End.CLIENT_CLOSED


def _sockets_of(pid: int, port: int) -> list[str]:
    """``ss`` lines (with timers) of the given process's TCP sockets to or from ``port``."""
    out = subprocess.run(
        ["ss", "-tnopH", "state", "established", f"( sport = :{port} or dport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if f"pid={pid}," in line]


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
@pytest.mark.parametrize("keepalive", [True, False])
def test_keepalive_is_on_both_sides_of_a_session_that_lasts(run_tcpfwd, keepalive):
    with echo_server() as backend:
        options = [] if keepalive else ["--no-keepalive"]
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, *options)
        listen_port = proxy.address()[1]
        with connect(proxy.address()) as client:
            client.sendall(b"x")
            assert recv_exactly(client, 1) == b"x"
            # The backend side is switched on once the session has lived a second or two.
            time.sleep(2.5)
            client_side = _sockets_of(proxy.pid, listen_port)
            backend_side = _sockets_of(proxy.pid, backend.port)
    assert len(client_side) == 1 and len(backend_side) == 1
    for line in client_side + backend_side:
        assert ("timer:(keepalive" in line) == keepalive, line
