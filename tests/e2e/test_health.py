"""Passive and active health, hold mode and policies, against a real tcpfwd process."""

from __future__ import annotations

import socket

import pytest

from support import (
    ThreadedServer,
    blackhole,
    connect,
    echo_handler,
    echo_server,
    event_time,
    exchange,
    failed_attempts,
    recv_all,
    recv_exactly,
    refused_port,
    write_config,
)
from tcpfwd.vocabulary import CheckKind, End, Outcome

# --- passive health ---------------------------------------------------------------------


def _paid_a_timeout(records) -> int:
    return sum(any(f"/{Outcome.TIMEOUT}/" in a for a in failed_attempts(r)) for r in records)


def test_blackholed_first_backend_costs_at_most_one_client_a_timeout(run_tcpfwd):
    with blackhole() as hole, echo_server(b"live\n") as live:
        proxy = run_tcpfwd("127.0.0.1:0", hole, live.address, "--connect-timeout", "1s")
        for i in range(200):
            payload = b"%d" % i
            assert exchange(proxy.address(), payload) == b"live\n" + payload
            if i % 20 == 19:
                # Checked as we go, so a regression fails in seconds, not 200 timeouts.
                assert _paid_a_timeout(proxy.access_records(i + 1)) <= 1
        records = proxy.access_records(200)
        paid = _paid_a_timeout(records)
        print(f"blackhole: {paid} of 200 connections paid a connect timeout")
        assert paid <= 1
        assert all(r["backend"] == live.address for r in records)
        proxy.wait_for_event(f"backend default/{hole} is down: {Outcome.TIMEOUT} (passive)")


def test_two_dead_backends_before_a_live_one_every_connection_succeeds(run_tcpfwd):
    with refused_port() as dead1, refused_port() as dead2, echo_server(b"live\n") as live:
        proxy = run_tcpfwd("127.0.0.1:0", dead1, dead2, live.address)
        for _ in range(50):
            assert exchange(proxy.address(), b"x") == b"live\nx"
        first, *rest = proxy.access_records(50)
        assert [a.split("/")[-2] for a in failed_attempts(first)] == [
            Outcome.REFUSED,
            Outcome.REFUSED,
        ]
        # Both are down now: later connections go straight to the live one.
        assert all(r["failed"] == "-" and r["backend"] == live.address for r in rest)


def test_every_state_change_is_logged_once_with_its_reason(run_tcpfwd):
    with refused_port() as dead, echo_server() as live:
        proxy = run_tcpfwd("127.0.0.1:0", dead, live.address)
        for _ in range(5):
            exchange(proxy.address(), b"x")
        proxy.access_records(5)
        proxy.wait_for_event(f"backend default/{dead} is down: {Outcome.REFUSED} (passive)")
        assert sum(f"backend default/{dead} is" in e for e in proxy.events) == 1


def test_when_every_backend_is_down_all_are_still_tried_in_order(run_tcpfwd):
    with refused_port() as dead, ThreadedServer(echo_handler(), dormant=True) as late:
        proxy = run_tcpfwd("127.0.0.1:0", dead, late.address)
        with connect(proxy.address()) as client:
            assert recv_all(client) == b""
        proxy.wait_for_event(f"backend default/{late.address} is down")
        late.open()
        # Both are marked down (the probe has not yet run): fail open, in configured order.
        assert exchange(proxy.address(), b"x") == b"x"
        records = proxy.access_records(2)
        assert records[1]["failed"].startswith(f"{dead}/{Outcome.REFUSED}/")
        assert records[1]["backend"] == late.address


# --- recovery -----------------------------------------------------------------------------

INTERVAL = 0.5
RISE = 2


def _recovery_seconds(proxy, backend: ThreadedServer) -> float:
    proxy.wait_for_event(f"backend default/{backend.address} is down")
    opened = backend.open()
    line = proxy.wait_for_event(f"backend default/{backend.address} is up", timeout=10)
    return event_time(line) - opened


@pytest.mark.parametrize("check", [CheckKind.TCP, CheckKind.NONE])
def test_a_backend_that_returns_is_used_again_within_rise_times_interval(run_tcpfwd, check):
    with (
        ThreadedServer(echo_handler(b"one\n"), dormant=True) as first,
        echo_server(b"two\n") as second,
    ):
        proxy = run_tcpfwd(
            "127.0.0.1:0",
            first.address,
            second.address,
            "--check",
            check,
            "--check-interval",
            f"{INTERVAL}s",
        )
        if check == CheckKind.NONE:
            # Only a client's failed attempt can take it down; the recovery probe brings it back.
            assert exchange(proxy.address(), b"x") == b"two\nx"
        recovery = _recovery_seconds(proxy, first)
        print(f"recovery ({check}): {recovery:.3f}s")
        # Up to `rise` jittered intervals (+10%), plus time to run the checks and log.
        assert recovery <= RISE * INTERVAL * 1.1 + 0.3
        assert exchange(proxy.address(), b"y") == b"one\ny"


# --- hold mode ----------------------------------------------------------------------------


def test_held_client_is_served_when_a_backend_returns(run_tcpfwd):
    with ThreadedServer(echo_handler(b"back\n"), dormant=True) as late:
        proxy = run_tcpfwd("127.0.0.1:0", late.address, "--hold-timeout", "10s")
        with connect(proxy.address()) as client:
            client.sendall(b"sent while held")
            proxy.wait_for_event(f"backend default/{late.address} is down")
            late.open()
            assert recv_exactly(client, 20) == b"back\nsent while held"
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b""
        (record,) = proxy.access_records(1)
        assert record["backend"] == late.address
        assert record["held"] != "-" and float(record["held"].rstrip("s")) > 0
        assert f"/{Outcome.REFUSED}/" in record["failed"]
        assert record["end"] == End.CLIENT_CLOSED


def test_held_client_is_closed_cleanly_when_the_hold_expires(run_tcpfwd):
    with refused_port() as dead:
        proxy = run_tcpfwd("127.0.0.1:0", dead, "--hold-timeout", "700ms")
        with connect(proxy.address()) as client:
            client.sendall(b"anyone?")
            # A FIN, not a reset: recv_all raises on a reset.
            assert recv_all(client) == b""
        (record,) = proxy.access_records(1)
        assert record["end"] == End.NO_BACKEND
        assert float(record["held"].rstrip("s")) >= 0.7
        # The list was retried with backoff, not once and not in a busy loop.
        assert 3 <= record["failed"].count(f"/{Outcome.REFUSED}/") <= 10


def test_without_hold_mode_the_client_is_closed_at_once(run_tcpfwd):
    with refused_port() as dead:
        proxy = run_tcpfwd("127.0.0.1:0", dead)
        with connect(proxy.address()) as client:
            assert recv_all(client) == b""
        (record,) = proxy.access_records(1)
        assert record["held"] == "-"
        assert record["failed"].count(f"/{Outcome.REFUSED}/") == 1


def test_client_leaving_during_the_hold_ends_the_session_at_once(run_tcpfwd):
    with refused_port() as dead:
        proxy = run_tcpfwd("127.0.0.1:0", dead, "--hold-timeout", "30s")
        client = connect(proxy.address())
        proxy.wait_for_event(f"backend default/{dead} is down")
        client.close()
        (record,) = proxy.access_records(1, timeout=5)
        assert record["end"] == End.CLIENT_ABORTED
        assert float(record["duration"].rstrip("s")) < 5


# --- policies, tiers, limits ------------------------------------------------------------


def test_round_robin_shares_connections_evenly(run_tcpfwd):
    with echo_server(b"a") as a, echo_server(b"b") as b, echo_server(b"c") as c:
        proxy = run_tcpfwd(
            "127.0.0.1:0", a.address, b.address, c.address, "--policy", "round-robin"
        )
        replies = [exchange(proxy.address(), b"") for _ in range(30)]
        assert sorted(replies) == [b"a"] * 10 + [b"b"] * 10 + [b"c"] * 10


def test_tiers_are_tried_in_order_and_the_policy_orders_within_a_tier(run_tcpfwd, tmp_path):
    with (
        refused_port() as dead,
        echo_server(b"a") as a,
        echo_server(b"b") as b,
        echo_server(b"backup") as backup,
    ):
        config = write_config(
            tmp_path,
            f"""
            [services.mail]
            listen = "127.0.0.1:0"
            policy = "round-robin"
            backends = [
                {{ address = "{backup.address}", name = "backup", tier = 2 }},
                {{ address = "{dead}", name = "dead", tier = 1 }},
                {{ address = "{a.address}", name = "a", tier = 1 }},
                {{ address = "{b.address}", name = "b", tier = 1 }},
            ]
            """,
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        replies = [exchange(proxy.address("mail"), b"") for _ in range(20)]
        assert b"backup" not in replies
        assert abs(replies.count(b"a") - replies.count(b"b")) <= 2


def test_a_later_tier_is_used_when_the_earlier_tier_fails(run_tcpfwd, tmp_path):
    with refused_port() as dead, echo_server(b"backup") as backup:
        config = write_config(
            tmp_path,
            f"""
            [services.mail]
            listen = "127.0.0.1:0"
            backends = [
                {{ address = "{backup.address}", name = "backup", tier = 1 }},
                {{ address = "{dead}", name = "primary" }},
            ]
            """,
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        assert exchange(proxy.address("mail"), b"") == b"backup"
        (record,) = proxy.access_records(1)
        assert record["failed"].startswith(f"primary/{dead}/{Outcome.REFUSED}/")


def test_a_full_backend_is_skipped_like_a_down_one(run_tcpfwd, tmp_path):
    with echo_server(b"first\n") as first, echo_server(b"second\n") as second:
        config = write_config(
            tmp_path,
            f"""
            [services.default]
            listen = "127.0.0.1:0"
            backends = [
                {{ address = "{first.address}", name = "first", max_connections = 1 }},
                "{second.address}",
            ]
            """,
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        with connect(proxy.address()) as held:
            assert recv_exactly(held, 6) == b"first\n"
            assert exchange(proxy.address(), b"x") == b"second\nx"
            (record,) = proxy.access_records(1)
            # Left out of the plan, not tried: no connect to it, nothing to fail.
            assert record["failed"] == "-"
            assert first.accepted == 1
            held.shutdown(socket.SHUT_WR)
            assert recv_all(held) == b""
        # The slot is free again once the first session has ended.
        proxy.access_records(2)
        assert exchange(proxy.address(), b"y") == b"first\ny"
