"""The contract of ordered, per-connection failover, against a real tcpfwd process."""

from __future__ import annotations

import socket
import time

import pytest

from support import (
    RST_ON_CLOSE,
    blackhole,
    connect,
    echo_server,
    exchange,
    recv_all,
    recv_exactly,
    refused_port,
)
from tcpfwd.vocabulary import End, Outcome

# For the tests where bytes flow (held early bytes, greetings, byte counts): both relays.
each_relay = pytest.mark.usefixtures("relay_mode")


@each_relay
def test_first_backend_is_used_when_it_is_up(run_tcpfwd):
    with echo_server(b"one\n") as first, echo_server(b"two\n") as second:
        proxy = run_tcpfwd("127.0.0.1:0", first.address, second.address)
        assert exchange(proxy.address(), b"ping") == b"one\nping"
        assert first.accepted == 1
        assert second.accepted == 0


def test_second_backend_used_when_first_refuses(run_tcpfwd):
    with refused_port() as dead, echo_server(b"two\n") as live:
        proxy = run_tcpfwd("127.0.0.1:0", dead, live.address)
        assert exchange(proxy.address(), b"ping") == b"two\nping"
        (record,) = proxy.access_records(1)
        assert record["backend"] == live.address
        assert record["failed"].startswith(f"{dead}/{Outcome.REFUSED}/")


def test_without_passive_health_every_connection_tries_the_list_again_in_order(run_tcpfwd):
    with refused_port() as dead, echo_server(b"two\n") as live:
        proxy = run_tcpfwd("127.0.0.1:0", dead, live.address, "--no-passive-health")
        for _ in range(5):
            assert exchange(proxy.address(), b"x") == b"two\nx"
        records = proxy.access_records(5)
        assert all(r["failed"].startswith(f"{dead}/{Outcome.REFUSED}/") for r in records)


def test_unresolvable_hostname_is_skipped(run_tcpfwd):
    with echo_server(b"live\n") as live:
        proxy = run_tcpfwd("127.0.0.1:0", "no-such-host.invalid:25", live.address)
        assert exchange(proxy.address(), b"x") == b"live\nx"
        (record,) = proxy.access_records(1)
        assert record["failed"].startswith(f"no-such-host.invalid:25/{Outcome.DNS}/")


def test_hostname_backend_is_resolved_at_connect_time(run_tcpfwd):
    with echo_server(b"named\n") as live:
        proxy = run_tcpfwd("127.0.0.1:0", f"localhost:{live.port}")
        assert exchange(proxy.address(), b"x") == b"named\nx"
        (record,) = proxy.access_records(1)
        assert record["backend_addr"] == f"127.0.0.1:{live.port}"


def test_connect_timeout_moves_on_to_the_next_backend(run_tcpfwd):
    with blackhole() as hole, echo_server(b"live\n") as live:
        # Strictly one attempt at a time: the timeout, not a hedge, moves on.
        proxy = run_tcpfwd(
            "127.0.0.1:0", hole, live.address, "--connect-timeout", "300ms", "--no-hedge"
        )
        started = time.monotonic()
        assert exchange(proxy.address(), b"x") == b"live\nx"
        assert time.monotonic() - started >= 0.3
        (record,) = proxy.access_records(1)
        assert record["failed"].startswith(f"{hole}/{Outcome.TIMEOUT}/")


def test_failover_timeout_bounds_the_whole_sequence(run_tcpfwd):
    with blackhole() as hole1, blackhole() as hole2, echo_server() as live:
        proxy = run_tcpfwd(
            "127.0.0.1:0",
            hole1,
            hole2,
            live.address,
            "--connect-timeout",
            "400ms",
            "--failover-timeout",
            "600ms",
            "--no-hedge",
        )
        with connect(proxy.address()) as client:
            assert recv_all(client) == b""
        (record,) = proxy.access_records(1)
        assert record["end"] == End.NO_BACKEND
        assert Outcome.FAILOVER_TIMEOUT in record["failed"]
        assert live.accepted == 0


def test_all_backends_down_closes_the_client_without_a_byte(run_tcpfwd):
    with refused_port() as dead1, refused_port() as dead2:
        proxy = run_tcpfwd("127.0.0.1:0", dead1, dead2)
        with connect(proxy.address()) as client:
            client.sendall(b"hello?")
            assert recv_all(client) == b""
        (record,) = proxy.access_records(1)
        assert record["end"] == End.NO_BACKEND
        assert record["backend"] == "-"
        assert record["failed"].count(f"/{Outcome.REFUSED}/") == 2


@each_relay
def test_client_data_sent_before_the_backend_connected_is_delivered_in_order(run_tcpfwd):
    with blackhole() as hole, echo_server() as live:
        proxy = run_tcpfwd("127.0.0.1:0", hole, live.address, "--connect-timeout", "500ms")
        with connect(proxy.address()) as client:
            # All of this is sent while the bouncer is still waiting on the blackhole.
            for i in range(100):
                client.sendall(b"line %03d\n" % i)
            client.shutdown(socket.SHUT_WR)
            received = recv_all(client)
        assert received == b"".join(b"line %03d\n" % i for i in range(100))


def test_client_that_leaves_during_failover_is_logged_as_aborted(run_tcpfwd):
    with blackhole() as hole:
        proxy = run_tcpfwd("127.0.0.1:0", hole, "--connect-timeout", "5s")
        client = connect(proxy.address())
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_ON_CLOSE)
        time.sleep(0.2)
        client.close()
        (record,) = proxy.access_records(1, timeout=3)
        assert record["end"] == End.CLIENT_ABORTED


@each_relay
def test_access_line_names_client_listener_backend_and_local_address(run_tcpfwd):
    with echo_server() as live:
        proxy = run_tcpfwd("127.0.0.1:0", live.address)
        listen = proxy.address()
        with socket.create_connection(listen, source_address=("127.0.0.2", 0)) as client:
            client_port = client.getsockname()[1]
            client.sendall(b"12345")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"12345"
        (record,) = proxy.access_records(1)
        assert record["client"] == f"127.0.0.2:{client_port}"
        assert record["listener"] == f"{listen[0]}:{listen[1]}"
        assert record["service"] == "default"
        assert record["backend_addr"] == live.address
        assert record["local"].startswith("127.0.0.1:")
        assert record["from_client"] == "5"
        assert record["from_backend"] == "5"
        assert record["end"] == End.CLIENT_CLOSED


@each_relay
def test_json_access_log_carries_every_attempt(run_tcpfwd):
    with refused_port() as dead, echo_server(b"hi\n") as live:
        proxy = run_tcpfwd("127.0.0.1:0", dead, live.address, "--log-format", "json")
        assert exchange(proxy.address(), b"abc") == b"hi\nabc"
        (record,) = proxy.access_records(1)
        assert [a["outcome"] for a in record["attempts"]] == [Outcome.REFUSED, Outcome.OK]
        assert record["attempts"][0]["address"] == dead
        assert record["backend"] == live.address
        assert record["from_client"] == 3
        assert record["from_backend"] == 6
        assert record["connect_ms"] >= 0


@each_relay
def test_ipv6_listener_and_backend(run_tcpfwd):
    with echo_server(b"six\n", host="::1") as live:
        proxy = run_tcpfwd("[::1]:0", live.address)
        assert proxy.address()[0] == "::1"
        assert exchange(proxy.address(), b"x") == b"six\nx"


@each_relay
def test_backend_greeting_reaches_a_client_that_sends_nothing(run_tcpfwd):
    with echo_server(b"220 ready\r\n") as live:
        proxy = run_tcpfwd("127.0.0.1:0", live.address)
        with connect(proxy.address()) as client:
            assert recv_exactly(client, 11) == b"220 ready\r\n"
