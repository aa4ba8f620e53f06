"""send_proxy: the header a backend receives first, and what health checks send, on real
sockets. Building the headers is tested in tests/unit/test_proxy_send.py."""

from __future__ import annotations

import socket

import pytest

from peers import CLIENT_IP, RecordingBackend, client_from, postfix
from support import connect, free_port, recv_all, recv_exactly, refused_port
from tcpfwd.config import SendProxySettings
from tcpfwd.proxy_protocol import ProxyDecoder, decode, encode_v1
from tcpfwd.proxy_send import proxy_header_for_check

V1 = SendProxySettings(1)
V2_TLVS = SendProxySettings(2, unique_id=True, crc32c=True)


# --- a health check's header, from its own connection ----------------------------------


def test_check_headers_are_local_for_v2_and_the_sockets_own_addresses_for_v1():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), source_address=(CLIENT_IP, 0)) as s:
            assert proxy_header_for_check(None, s) == b""
            v2, _ = decode(proxy_header_for_check(V2_TLVS, s))
            assert v2.command == "LOCAL"
            v1, _ = decode(proxy_header_for_check(V1, s))
            assert v1.source == s.getsockname()
            assert v1.destination == s.getpeername()


# --- what a backend receives from a running tcpfwd ------------------------------------


def test_v1_header_is_the_first_thing_the_backend_reads(run_tcpfwd):
    with RecordingBackend(reply=b"220 speaks first\r\n") as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, "--send-proxy", "v1")
        with client_from(proxy.address()) as client:
            port = client.getsockname()[1]
            assert recv_exactly(client, 18) == b"220 speaks first\r\n"
            client.sendall(b"EHLO me\r\n")
            client.shutdown(socket.SHUT_WR)
            recv_all(client)
        recording = backend.recording()
    expected = encode_v1((CLIENT_IP, port), proxy.address())
    # Receivers parse the header out of their first read: it must all be there.
    assert recording.first_recv.startswith(expected)
    assert recording.data == expected + b"EHLO me\r\n"


def test_v2_header_carries_the_session_id_and_a_valid_crc(run_tcpfwd):
    with RecordingBackend() as backend:
        proxy = run_tcpfwd(
            "127.0.0.1:0",
            backend.address,
            "--send-proxy",
            "v2",
            "--proxy-unique-id",
            "--proxy-crc32c",
        )
        with client_from(proxy.address()) as client:
            port = client.getsockname()[1]
            client.sendall(b"data")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client).endswith(b"data")
        recording = backend.recording()
        (record,) = proxy.access_records(1)
    decoder = ProxyDecoder()
    header = decoder.feed(recording.first_recv)
    assert header is not None
    assert header.source == (CLIENT_IP, port)
    assert header.destination == proxy.address()
    assert header.unique_id == record["session"].encode()
    assert header.tlvs[-1].type == 0x03  # CRC32C, verified by the decoder
    assert recording.data[decoder.header_length :] == b"data"
    # The client's byte count is what it sent, not what the header added.
    assert record["from_client"] == "4"


def test_ipv6_clients_get_a_tcp6_header(run_tcpfwd):
    with RecordingBackend() as backend:
        proxy = run_tcpfwd("[::1]:0", backend.address, "--send-proxy", "v1")
        with socket.create_connection(proxy.address(), timeout=10) as client:
            port = client.getsockname()[1]
            client.sendall(b"x")
            client.shutdown(socket.SHUT_WR)
            recv_all(client)
        header, _ = decode(backend.recording().data)
    assert header.family == "TCP6"
    assert header.source == ("::1", port)


def test_backend_may_override_the_services_send_proxy(run_tcpfwd, tmp_path):
    with refused_port() as dead, RecordingBackend() as plain, RecordingBackend() as v2:
        config = tmp_path / "tcpfwd.toml"
        config.write_text(
            "[services.smtp]\n"
            'listen = "127.0.0.1:0"\n'
            'send_proxy = "v1"\n'
            "backends = [\n"
            f'  {{ address = "{dead}", send_proxy = "v2" }},\n'
            f'  {{ address = "{plain.address}", send_proxy = "off" }},\n'
            "]\n"
            "[services.other]\n"
            'listen = "127.0.0.1:0"\n'
            'send_proxy = "v1"\n'
            f'backends = [{{ address = "{v2.address}", send_proxy = {{ version = "v2" }} }}]\n'
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        for service in ("smtp", "other"):
            with connect(proxy.address(service)) as client:
                client.sendall(b"raw")
                client.shutdown(socket.SHUT_WR)
                recv_all(client)
        assert plain.recording().data == b"raw"
        header, rest = decode(v2.recording().data)
    assert header.version == 2
    assert rest == b"raw"


@pytest.mark.parametrize("settings", [V1, V2_TLVS], ids=["v1", "v2"])
def test_check_header_is_accepted_by_postfix(tmp_path, settings):
    port = free_port()
    smtpd = f"127.0.0.1:{port} inet n - n - - smtpd -o smtpd_upstream_proxy_protocol=haproxy\n"
    with postfix(tmp_path, smtpd, ports=(port,)) as mail:
        with client_from(("127.0.0.1", port)) as check:
            check.sendall(proxy_header_for_check(settings, check))
            assert check.recv(1024).startswith(b"220 ")
            check.sendall(b"QUIT\r\n")
            assert b"221 " in recv_all(check)
        mail.wait_for_log(rf"connect from unknown\[{CLIENT_IP}\]")
