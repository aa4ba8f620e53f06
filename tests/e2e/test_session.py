"""The session state machine in-process: socketpairs for clients, real backends on loopback.

What the end-to-end tests check through the real command (failover, half-close, resets,
limits) is checked here on the session itself, where its state (bytes held, pipes,
registrations) can be looked at while it runs.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import tracemalloc

import pytest

from plane import CLIENT, Plane, read_until_eof
from support import RST_ON_CLOSE, SPLICE_AVAILABLE, ThreadedServer, echo_server, refused_port
from tcpfwd.proxy_protocol import encode_v1
from tcpfwd.relay import CHUNK
from tcpfwd.vocabulary import End, Outcome, RelayMode


async def test_a_session_joins_its_client_to_the_first_backend_and_logs_one_record():
    with echo_server(b"hi\n") as backend:
        plane = Plane(backends=[backend.address])
        try:
            client, _session = plane.pair()
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(client, b"ping")
            client.shutdown(socket.SHUT_WR)
            assert await read_until_eof(client) == b"hi\nping"
            (record,) = await plane.ended(1)
        finally:
            plane.close()
    assert record.backend == backend.address
    assert record.from_client == 4
    assert record.from_backend == 7
    assert record.end == End.CLIENT_CLOSED
    assert record.client == "192.0.2.10:40000"
    assert not plane.daemon.sessions
    assert plane.service.stats.active == 0
    assert not plane.reactor.handlers, "descriptors left registered"
    assert len(plane.daemon.outgoing) == 0


async def test_failover_to_the_second_backend_records_the_first_failure():
    with refused_port() as dead, echo_server() as live:
        plane = Plane(backends=[dead, live.address])
        try:
            client, _session = plane.pair()
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(client, b"x")
            client.shutdown(socket.SHUT_WR)
            assert await read_until_eof(client) == b"x"
            (record,) = await plane.ended(1)
        finally:
            plane.close()
    assert [(a.address, a.outcome) for a in record.failed] == [(dead, Outcome.REFUSED)]
    assert record.backend == live.address


async def test_bytes_held_for_the_backend_go_first_even_when_they_take_many_writes():
    # The PROXY header's remainder is held by the session until the backend is joined;
    # the backend takes it slowly (tiny buffers), and what the client sends next must
    # wait behind it.
    early = os.urandom(60_000)
    late = os.urandom(1 << 20)
    received = bytearray()
    done = threading.Event()

    def slow_reader(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        time.sleep(0.2)
        while data := conn.recv(1024):
            received.extend(data)
        done.set()

    with ThreadedServer(slow_reader) as backend:
        plane = Plane(
            backends=[backend.address], accept_proxy=True, trusted_sources=["192.0.2.0/24"]
        )
        try:
            client, _session = plane.pair()
            loop = asyncio.get_running_loop()
            header = encode_v1(("198.51.100.7", 5555), ("203.0.113.1", 25))
            await loop.sock_sendall(client, header + early)
            await loop.sock_sendall(client, late)
            client.shutdown(socket.SHUT_WR)
            await asyncio.to_thread(done.wait, 30)
            (record,) = await plane.ended(1, timeout=30)
        finally:
            plane.close()
    assert bytes(received) == early + late
    assert record.client == "198.51.100.7:5555"
    assert record.via == "192.0.2.10:40000"
    assert record.from_client == len(early) + len(late)


async def test_a_slow_reader_keeps_at_most_one_chunk_waiting_in_the_session():
    release = threading.Event()
    got = bytearray()

    def stalled(conn: socket.socket) -> None:
        release.wait(20)
        while data := conn.recv(65536):
            got.extend(data)

    payload = os.urandom(16 << 20)
    with ThreadedServer(stalled) as backend:
        plane = Plane(backends=[backend.address], relay=RelayMode.COPY)
        try:
            client, session = plane.pair()
            loop = asyncio.get_running_loop()
            sending = loop.create_task(loop.sock_sendall(client, payload))
            peak = 0
            for _ in range(50):
                await asyncio.sleep(0.01)
                if session.stage == 4:  # relaying
                    pending = session.up.pending
                    peak = max(peak, len(pending) if pending is not None else 0)
            # The backend reads nothing: the client is held back by TCP, not buffered.
            assert not sending.done()
            assert peak <= CHUNK
            release.set()
            await sending
            client.shutdown(socket.SHUT_WR)
            await read_until_eof(client)
            await plane.ended(1, timeout=30)
        finally:
            plane.close()
    assert bytes(got) == payload


async def test_a_half_close_each_way_is_passed_on_and_the_other_way_still_flows():
    seen_eof = threading.Event()

    def answer_after_eof(conn: socket.socket) -> None:
        data = b""
        while chunk := conn.recv(100):
            data += chunk
        seen_eof.set()
        conn.sendall(b"got " + data)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)

    with ThreadedServer(answer_after_eof) as backend:
        plane = Plane(backends=[backend.address])
        try:
            client, _session = plane.pair()
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(client, b"question")
            client.shutdown(socket.SHUT_WR)
            assert await read_until_eof(client) == b"got question"
            (record,) = await plane.ended(1)
        finally:
            plane.close()
    assert seen_eof.is_set()
    assert record.end == End.CLIENT_CLOSED


async def test_a_backend_reset_resets_the_client():
    def reset(conn: socket.socket) -> None:
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_ON_CLOSE)
        conn.close()

    with ThreadedServer(reset) as backend:
        plane = Plane(backends=[backend.address])
        try:
            listener = socket.create_server(("127.0.0.1", 0))
            user = socket.create_connection(listener.getsockname())
            accepted, _ = listener.accept()
            listener.close()
            plane.session(accepted, CLIENT)
            user.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(user, b"boom")
            reset = False
            async with asyncio.timeout(5):
                try:
                    while await loop.sock_recv(user, 100):
                        pass
                except ConnectionResetError:
                    reset = True
            assert reset, "the client saw an orderly close, not the backend's reset"
            (record,) = await plane.ended(1)
        finally:
            user.close()
            plane.close()
    assert record.end == End.BACKEND_RESET


@pytest.mark.skipif(not SPLICE_AVAILABLE, reason="no splice(2) here")
async def test_auto_relay_copies_a_short_session_and_splices_once_a_direction_is_bulk():
    bulk = os.urandom(4 << 20)
    with echo_server() as backend:
        plane = Plane(backends=[backend.address])
        plane.daemon.pipes.keep = 8
        loop = asyncio.get_running_loop()
        try:
            for number, payload in enumerate((b"short", bulk), start=1):
                client, _session = plane.pair()
                await loop.sock_sendall(client, payload)
                client.shutdown(socket.SHUT_WR)
                assert await read_until_eof(client) == payload
                client.close()
                await plane.ended(number)
        finally:
            plane.close()
        # Pipes given back once drained wait in the pool: the bulk session used some.
        pipes_used = len(plane.daemon.pipes)
    short, long = plane.records
    assert short.relay == RelayMode.COPY
    assert long.relay == RelayMode.SPLICE
    assert pipes_used > 0, "the bulk session never took a pipe"


async def test_a_client_turned_away_gets_a_fin_even_with_unread_bytes():
    # Closing a socket with bytes not read sends a reset, which can overtake what the
    # client has not read yet: the session reads and drops them first.
    for _ in range(20):
        with refused_port() as dead:
            plane = Plane(backends=[dead])
            listener = socket.create_server(("127.0.0.1", 0))
            user = socket.create_connection(listener.getsockname())
            accepted, _ = listener.accept()
            listener.close()
            try:
                user.sendall(b"HELO example.com\r\n" * 10)
                await asyncio.sleep(0.01)
                plane.session(accepted, CLIENT)
                user.setblocking(False)
                async with asyncio.timeout(5):
                    # A FIN: a reset would raise.
                    assert await asyncio.get_running_loop().sock_recv(user, 100) == b""
                (record,) = await plane.ended(1)
            finally:
                user.close()
                plane.close()
            assert record.end == End.NO_BACKEND


async def test_an_idle_session_keeps_little_python_memory():
    # What a held session keeps alive, counted by the allocator: the session, its two
    # flows, its sockets and the addresses the access line needs.
    count = 500
    with echo_server() as backend:
        plane = Plane(backends=[backend.address], keepalive=False)
        loop = asyncio.get_running_loop()
        clients = []
        try:
            warm, _ = plane.pair()
            await loop.sock_sendall(warm, b"w")
            await loop.sock_recv(warm, 1)
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            for _ in range(count):
                client, _session = plane.pair()
                await loop.sock_sendall(client, b"x")
                clients.append(client)
            for client in clients:
                assert await loop.sock_recv(client, 1) == b"x"
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            # Only what the package allocated: the test's own sockets, tasks and the
            # backend's threads are not the session's.
            grown = sum(
                stat.size_diff
                for stat in after.compare_to(before, "filename")
                if "/tcpfwd/" in stat.traceback[0].filename
            )
            per_session = grown / count
        finally:
            for client in clients:
                client.close()
            warm.close()
            plane.close()
    # Today about a kilobyte; the bound catches a per-session buffer or closure coming back.
    assert per_session < 1600, f"{per_session:.0f} bytes per idle session"
