"""Greeting failover for server-speaks-first protocols, against a real tcpfwd process."""

from __future__ import annotations

import socket

from support import (
    closing_server,
    connect,
    echo_server,
    exchange,
    failed_attempts,
    greeter_server,
    recv_all,
    recv_exactly,
    silent_server,
    write_config,
)
from tcpfwd.vocabulary import Outcome

LIVE_GREETING = b"220 live.example ESMTP\r\n"


def _outcomes(record):
    return [attempt.split("/")[-2] for attempt in failed_attempts(record)]


def test_only_the_live_backends_greeting_reaches_clients(run_tcpfwd):
    with (
        closing_server() as closer,
        greeter_server(b"421 too busy\r\n") as busy,
        silent_server() as silent,
        echo_server(LIVE_GREETING) as live,
    ):
        proxy = run_tcpfwd(
            "127.0.0.1:0",
            closer.address,
            busy.address,
            silent.address,
            live.address,
            "--greeting",
            "smtp",
            "--greeting-timeout",
            "300ms",
            "--no-passive-health",
            "--no-hedge",
        )
        # Without passive health (and strictly one attempt at a time) every client meets
        # all three bad backends first.
        for _ in range(5):
            with connect(proxy.address()) as client:
                client.shutdown(socket.SHUT_WR)
                assert recv_all(client) == LIVE_GREETING
        for record in proxy.access_records(5):
            assert _outcomes(record) == [
                Outcome.GREETING_CLOSED,
                f"{Outcome.GREETING_MISMATCH}:421",
                Outcome.GREETING_TIMEOUT,
            ]
            assert record["backend"] == live.address


def test_with_passive_health_clients_skip_the_backends_that_greeted_badly(run_tcpfwd):
    with (
        closing_server() as closer,
        greeter_server(b"421 too busy\r\n") as busy,
        silent_server() as silent,
        echo_server(LIVE_GREETING) as live,
    ):
        proxy = run_tcpfwd(
            "127.0.0.1:0",
            closer.address,
            busy.address,
            silent.address,
            live.address,
            "--greeting",
            "smtp",
            "--greeting-timeout",
            "300ms",
        )
        for _ in range(20):
            assert exchange(proxy.address(), b"") == LIVE_GREETING
        first, *rest = proxy.access_records(20)
        assert len(_outcomes(first)) == 3
        assert all(r["failed"] == "-" for r in rest)


def test_greeting_timeout_is_its_own_setting(run_tcpfwd, tmp_path):
    with silent_server() as silent, echo_server(LIVE_GREETING) as live:
        config = write_config(
            tmp_path,
            f"""
            [services.default]
            listen = "127.0.0.1:0"
            backends = ["{silent.address}", "{live.address}"]
            greeting = {{ expect = "^220 ", timeout = "200ms" }}
            hedge = false
            """,
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        assert exchange(proxy.address(), b"") == LIVE_GREETING
        (record,) = proxy.access_records(1)
        (attempt,) = failed_attempts(record)
        assert attempt.split("/")[-2] == Outcome.GREETING_TIMEOUT
        # The event loop's timers tick in whole milliseconds; the attempt is measured finer.
        assert 198 <= float(attempt.split("/")[-1].rstrip("ms")) < 1000


def test_a_failed_greeting_marks_the_backend_down(run_tcpfwd):
    with greeter_server(b"554 go away\r\n") as refuser, echo_server(LIVE_GREETING) as live:
        proxy = run_tcpfwd("127.0.0.1:0", refuser.address, live.address, "--greeting", "smtp")
        for _ in range(10):
            assert exchange(proxy.address(), b"") == LIVE_GREETING
        first, *rest = proxy.access_records(10)
        assert _outcomes(first) == [f"{Outcome.GREETING_MISMATCH}:554"]
        assert all(r["failed"] == "-" for r in rest)
        proxy.wait_for_event(
            f"backend default/{refuser.address} is down: {Outcome.GREETING_MISMATCH}:554 (passive)"
        )


def test_client_bytes_sent_before_the_greeting_are_delivered_after_it(run_tcpfwd):
    with greeter_server(b"421 busy\r\n") as busy, echo_server(LIVE_GREETING) as live:
        proxy = run_tcpfwd("127.0.0.1:0", busy.address, live.address, "--greeting", "^220")
        with connect(proxy.address()) as client:
            # Pipelined early (a misbehaving client): held, and never shown to the busy one.
            client.sendall(b"EHLO early\r\n")
            assert recv_exactly(client, len(LIVE_GREETING)) == LIVE_GREETING
            assert recv_exactly(client, 12) == b"EHLO early\r\n"


def test_multiline_greeting_is_forwarded_whole(run_tcpfwd):
    greeting = b"220-live.example ESMTP\r\n220-more\r\n220 ready\r\n"
    with echo_server(greeting) as live:
        proxy = run_tcpfwd("127.0.0.1:0", live.address, "--greeting", "smtp")
        assert exchange(proxy.address(), b"QUIT\r\n") == greeting + b"QUIT\r\n"


def test_without_a_greeting_setting_a_busy_greeting_is_relayed(run_tcpfwd):
    with greeter_server(b"421 too busy\r\n") as busy, echo_server(LIVE_GREETING) as live:
        proxy = run_tcpfwd("127.0.0.1:0", busy.address, live.address)
        assert exchange(proxy.address(), b"") == b"421 too busy\r\n"
