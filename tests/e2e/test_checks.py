"""Active health checks: each kind on real sockets, and the SMTP check against aiosmtpd."""

from __future__ import annotations

import logging
import re
import smtplib

import pytest

from support import (
    SmtpBackend,
    connect,
    echo_server,
    greeter_server,
    recv_exactly,
    refused_port,
    silent_server,
    split_hostport,
    wait_until,
)
from tcpfwd.checks import CheckResult, Probe, run_check
from tcpfwd.resolver import Resolver
from tcpfwd.vocabulary import CheckKind, Outcome


async def check(probe: Probe, address: str) -> CheckResult:
    host, port = split_hostport(address)
    return await run_check(probe, host, port, resolver=Resolver(), dns_ttl=30.0)


async def test_tcp_check_passes_when_the_connect_does():
    with echo_server() as live:
        assert await check(Probe(CheckKind.TCP, 1.0), live.address) == CheckResult(
            True, CheckKind.TCP
        )


async def test_tcp_check_fails_on_refusal():
    with refused_port() as dead:
        assert await check(Probe(CheckKind.TCP, 1.0), dead) == CheckResult(False, Outcome.REFUSED)


async def test_unresolvable_name_fails_the_check():
    result = await check(Probe(CheckKind.TCP, 2.0), "no-such-host.invalid:25")
    assert result == CheckResult(False, Outcome.DNS)


async def test_send_expect_matches_a_regex_in_the_reply():
    with echo_server(b"+OK hello\r\n") as live:
        probe = Probe(CheckKind.SEND, 1.0, send=b"PING\r\n", expect=re.compile(rb"^\+OK.*\n.*PING"))
        assert (await check(probe, live.address)).ok


async def test_send_expect_fails_when_the_reply_does_not_match():
    with greeter_server(b"-ERR no\r\n") as bad:
        probe = Probe(CheckKind.SEND, 1.0, expect=re.compile(rb"^\+OK"))
        result = await check(probe, bad.address)
        assert result == CheckResult(False, "expect: no match in '-ERR no'")


async def test_a_check_is_bounded_by_its_timeout():
    with silent_server() as silent:
        result = await check(Probe(CheckKind.SEND, 0.2, expect=re.compile(b"x")), silent.address)
        assert result == CheckResult(False, Outcome.TIMEOUT)


@pytest.mark.parametrize(
    ("greeting", "detail"),
    [(b"421 too busy\r\n", "smtp greeting 421"), (b"554 no\r\n", "smtp greeting 554")],
)
async def test_smtp_check_fails_on_an_error_greeting(greeting, detail):
    with greeter_server(greeting) as busy:
        assert await check(Probe(CheckKind.SMTP, 1.0), busy.address) == CheckResult(False, detail)


async def test_smtp_check_fails_on_a_backend_that_is_not_smtp():
    with echo_server(b"SSH-2.0-OpenSSH\r\n") as other:
        assert await check(Probe(CheckKind.SMTP, 1.0), other.address) == CheckResult(
            False, "smtp greeting: not smtp"
        )


async def test_smtp_check_passes_against_a_real_smtp_server():
    with SmtpBackend() as smtp:
        assert await check(Probe(CheckKind.SMTP, 2.0), smtp.address) == CheckResult(
            True, CheckKind.SMTP
        )


def _client_sessions(smtp: SmtpBackend) -> list[list[str]]:
    # Sessions seen whole; the controller's own readiness probe began before we listened.
    return [s for s in smtp.sessions().values() if s[0] == "handling connection"]


def _normalised(session: list[str]) -> list[str]:
    # smtplib writes its commands in lower case; the server treats both alike.
    return [line.lower() for line in session]


def test_smtp_check_leaves_the_same_clean_log_as_a_real_client(run_tcpfwd):
    with SmtpBackend() as smtp:
        # The reference: what the server logs for the stdlib client's EHLO and QUIT.
        with smtplib.SMTP("127.0.0.1", smtp.port, local_hostname="localhost") as client:
            client.ehlo()
        proxy = run_tcpfwd(
            "127.0.0.1:0", smtp.address, "--check", "smtp", "--check-interval", "200ms"
        )
        wait_until(lambda: len(_client_sessions(smtp)) >= 5, "five sessions", 10)
        proxy.stop()
        reference, *checks = _client_sessions(smtp)
        assert {">> b'ehlo localhost'", ">> b'quit'", "<< b'221 bye'"} <= set(
            _normalised(reference)
        )
        assert len(checks) > 2
        for session in checks[:-1]:  # the last may have been cut by the stop
            assert _normalised(session) == _normalised(reference)
        assert not [entry for entry in smtp.log if entry[1] >= logging.WARNING]
        # A check that just dropped the connection would show as "EOF received".
        assert not [s for s in _client_sessions(smtp) if "EOF received" in s]
        assert not any("backend default" in e for e in proxy.events)


def test_active_check_marks_a_busy_smtp_server_down_before_any_client_meets_it(run_tcpfwd):
    with greeter_server(b"421 too busy\r\n") as busy, SmtpBackend() as live:
        proxy = run_tcpfwd(
            "127.0.0.1:0",
            busy.address,
            live.address,
            "--check",
            "smtp",
            "--check-interval",
            "100ms",
        )
        proxy.wait_for_event(f"backend default/{busy.address} is down: smtp greeting 421 (check)")
        with connect(proxy.address()) as client:
            assert recv_exactly(client, 4) == b"220 "
        (record,) = proxy.access_records(1)
        assert record["backend"] == live.address
        assert record["failed"] == "-"
