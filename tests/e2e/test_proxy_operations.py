"""PROXY protocol meeting health checks and access control."""

from __future__ import annotations

import socket

import pytest

from peers import RecordingBackend
from support import closed_without_reply, connect, echo_server, recv_all
from tcpfwd.proxy_protocol import decode, encode_v1
from tcpfwd.vocabulary import Reject


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_health_checks_of_a_proxy_backend_send_a_header_first(run_tcpfwd, tmp_path, version):
    with RecordingBackend() as backend:
        config = tmp_path / "t.toml"
        config.write_text(
            f"""
[services.mail]
listen = "127.0.0.1:0"
backends = ["{backend.address}"]
send_proxy = "{version}"
health = {{ check = "tcp", interval = "200ms", timeout = "1s" }}
"""
        )
        run_tcpfwd("run", "--config", str(config))
        header, rest = decode(backend.recording(0).first_recv)
        assert rest == b""
        if version == "v2":
            # "A health check, not a relayed client": no addresses to believe.
            assert header.command == "LOCAL"
        else:
            # v1 has no LOCAL (and Postfix refuses UNKNOWN): the check's own socket.
            assert header.command == "PROXY"
            assert header.source is not None
            assert header.source[0] == "127.0.0.1"
            assert header.destination == ("127.0.0.1", backend.port)


def test_access_lists_judge_the_client_a_trusted_header_names(run_tcpfwd, tmp_path):
    with echo_server(b"hi\n") as backend:
        config = tmp_path / "t.toml"
        config.write_text(
            f"""
[services.mail]
listen = "127.0.0.1:0"
backends = ["{backend.address}"]
accept_proxy = true
trusted_sources = ["127.0.0.1/32"]
deny = ["192.0.2.0/24"]
max_connections_per_client = 1
"""
        )
        proxy = run_tcpfwd("run", "--config", str(config), "--log-format", "json")
        address = proxy.address("mail")
        # The load balancer itself (127.0.0.1) is not what the list judges...
        with connect(address) as denied:
            denied.sendall(encode_v1(("192.0.2.7", 40000), ("198.51.100.1", 25)) + b"x")
            assert closed_without_reply(denied)
        assert backend.accepted == 0
        # ...the client its header names is.
        with connect(address) as allowed:
            allowed.sendall(encode_v1(("198.51.100.9", 40000), ("198.51.100.1", 25)) + b"x")
            allowed.shutdown(socket.SHUT_WR)
            assert recv_all(allowed) == b"hi\nx"
        # The per-client limit counts the named client, not the load balancer: one
        # session per client, while two different clients share the balancer's address.
        first = connect(address)
        first.sendall(encode_v1(("198.51.100.10", 1), ("198.51.100.1", 25)))
        assert first.recv(3) == b"hi\n"
        second = connect(address)
        second.sendall(encode_v1(("198.51.100.11", 1), ("198.51.100.1", 25)))
        assert second.recv(3) == b"hi\n"
        with connect(address) as third:
            third.sendall(encode_v1(("198.51.100.10", 2), ("198.51.100.1", 25)))
            assert closed_without_reply(third)
        first.close()
        second.close()
        records = proxy.access_records(5)
        ends = sorted(r["end"] for r in records)
        assert ends.count(Reject.DENIED) == 1
        assert ends.count(Reject.CLIENT_LIMIT) == 1
