"""No client waits for a dead backend: hedged attempts and suspect backends.

An attempt with no answer after its backend's hedge delay has the next backend tried
beside it; the first to answer wins, the loser is closed untouched, and while an attempt
is overdue new sessions try that backend last.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import pytest

from support import (
    LOOPBACK,
    ThreadedServer,
    admin_url,
    blackhole,
    connect,
    echo_server,
    exchange,
    failed_attempts,
    get_json,
    metric_samples,
    recv_all,
    recv_exactly,
    silent_server,
    write_config,
)
from tcpfwd.vocabulary import Outcome

LIVE_GREETING = b"220 live.example ESMTP\r\n"


async def _first_bytes_after(address: tuple[str, int], count: int, rate: float) -> list[float]:
    """Open ``count`` connections at ``rate`` a second (open loop); how long each took to
    get its first bytes."""

    async def one(delay: float) -> float:
        await asyncio.sleep(delay)
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(*address)
        try:
            async with asyncio.timeout(10):
                assert await reader.readexactly(5) == b"live\n"
        finally:
            writer.close()
        return time.monotonic() - started

    return list(await asyncio.gather(*(one(i / rate) for i in range(count))))


def test_a_blackholed_first_backend_costs_at_most_one_session_a_wait(run_tcpfwd):
    """The target: 50 connections a second for 3 s, default settings, no checks."""
    with blackhole() as hole, echo_server(b"live\n") as live:
        proxy = run_tcpfwd("127.0.0.1:0", hole, live.address, "--connect-timeout", "1s")
        took = asyncio.run(_first_bytes_after(proxy.address(), 150, 50.0))
        records = proxy.access_records(150)
    slow = [t for t in took if t > 0.3]
    print(f"hedging: {len(slow)} of 150 sessions took more than 0.3 s; slowest {max(took):.3f} s")
    assert len(slow) <= 1
    assert all(r["backend"] == live.address for r in records)
    # Those that met the blackhole first hedged; the rest found it suspect, then down.
    hedged = [r for r in records if f"/{Outcome.OVERTAKEN}/" in r["failed"]]
    assert 1 <= len(hedged) < 20
    assert not [r for r in records if f"/{Outcome.TIMEOUT}/" in r["failed"]]


def test_without_hedging_attempts_stay_strictly_one_at_a_time(run_tcpfwd):
    with blackhole() as hole, echo_server(b"live\n") as live:
        proxy = run_tcpfwd(
            "127.0.0.1:0", hole, live.address, "--connect-timeout", "500ms", "--no-hedge"
        )
        started = time.monotonic()
        assert exchange(proxy.address(), b"x") == b"live\nx"
        assert time.monotonic() - started >= 0.5
        (record,) = proxy.access_records(1)
    assert f"{hole}/{Outcome.TIMEOUT}/" in record["failed"]


def test_a_backend_that_never_greets_costs_no_client_after_the_first_a_wait(run_tcpfwd):
    with silent_server() as silent, echo_server(LIVE_GREETING) as live:
        proxy = run_tcpfwd("127.0.0.1:0", silent.address, live.address, "--greeting", "smtp")
        took = []
        for _ in range(20):
            started = time.monotonic()
            with connect(proxy.address()) as client:
                assert recv_exactly(client, len(LIVE_GREETING)) == LIVE_GREETING
            took.append(time.monotonic() - started)
        first, *rest = proxy.access_records(20)
    # The first waits its hedge delay (0.1 s with nothing learnt yet) and the live
    # backend's greeting; nobody after it waits at all.
    assert took[0] < 0.3
    assert all(t < 0.1 for t in took[1:]), took
    assert "greeting" not in first["failed"] and f"/{Outcome.OVERTAKEN}/" in first["failed"]
    assert all(r["backend"] == live.address for r in [first, *rest])


def test_the_hedge_that_loses_is_closed_before_any_client_byte_or_header(run_tcpfwd):
    """The first backend answers late (its listen queue frees up after a while): by
    then a hedge to the second has won, and the late one is closed untouched."""
    heard: list[bytes] = []
    arrived = threading.Event()

    def record(conn: socket.socket) -> None:
        conn.settimeout(5)
        heard.append(recv_all(conn))
        arrived.set()

    late = ThreadedServer(record, dormant=True)
    with late, echo_server(b"live\n") as live:
        # A full listen queue drops SYNs: the connect waits for a retransmission.
        late.sock.listen(0)
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((LOOPBACK, late.port))
        time.sleep(0.2)
        proxy = run_tcpfwd(
            "127.0.0.1:0",
            late.address,
            live.address,
            "--connect-timeout",
            "5s",
            "--send-proxy",
            "v1",
        )
        with connect(proxy.address()) as client:
            client.sendall(b"secret")
            assert recv_exactly(client, 5) == b"live\n"
            # Make room in the first backend's queue: its SYN gets through on retry.
            late.dormant = True
            late._thread.start()
            for filler in fillers:
                filler.close()
            assert arrived.wait(10), "the late attempt never connected"
        (record,) = proxy.access_records(1)
    # The late backend got nothing at all: no client byte, no PROXY header.
    assert heard == [b""]
    assert f"/{Outcome.OVERTAKEN}/" in record["failed"]
    assert record["backend"] == live.address


def test_an_overdue_backend_is_suspect_then_down_and_hedges_are_counted(run_tcpfwd, tmp_path):
    with blackhole() as hole, echo_server(b"live\n") as live:
        config = write_config(
            tmp_path,
            f"""
            [admin]
            listen = "127.0.0.1:0"
            [services.mail]
            listen = "127.0.0.1:0"
            backends = [{{ address = "{hole}", name = "dead" }},
                        {{ address = "{live.address}", name = "live" }}]
            connect_timeout = "3s"
            """,
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        url = admin_url(proxy)
        with connect(proxy.address("mail")) as client:
            assert recv_exactly(client, 5) == b"live\n"
            # Its overtaken attempt is still trying: the backend is suspect for now.
            status = get_json(url + "/status")
            (service,) = status["services"]
            dead = next(b for b in service["backends"] if b["name"] == "dead")
            assert dead["suspect"] is True
            # New sessions go straight to the live one.
            started = time.monotonic()
            assert exchange(proxy.address("mail"), b"") == b"live\n"
            assert time.monotonic() - started < 0.1
        # The overtaken attempt times out: passive health hears of it.
        proxy.wait_for_event(f"backend mail/dead is down: {Outcome.TIMEOUT} (passive)", timeout=10)
        metrics = metric_samples(url)
        records = proxy.access_records(2)
    mail = ("service", "mail")
    assert metrics[("tcpfwd_backend_hedges_total", (("backend", "dead"), mail))] == 1
    assert metrics[("tcpfwd_backend_hedge_wins_total", (("backend", "live"), mail))] == 1
    # The first session hedged; the second (which ended first) went straight to live.
    assert sorted(r["failed"] == "-" for r in records) == [False, True]
    assert any("dead/" in r["failed"] and f"/{Outcome.OVERTAKEN}/" in r["failed"] for r in records)


@pytest.mark.parametrize("hedge", ["true", "false"])
def test_a_first_backend_that_answers_in_time_keeps_the_order(run_tcpfwd, tmp_path, hedge):
    with echo_server(b"first\n") as first, echo_server(b"second\n") as second:
        config = write_config(
            tmp_path,
            f"""
            [services.mail]
            listen = "127.0.0.1:0"
            backends = ["{first.address}", "{second.address}"]
            hedge = {hedge}
            """,
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        for _ in range(20):
            assert exchange(proxy.address("mail"), b"") == b"first\n"
        records = proxy.access_records(20)
    assert second.accepted == 0
    assert all(failed_attempts(r) == [] for r in records)
