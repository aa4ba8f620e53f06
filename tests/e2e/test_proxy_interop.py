"""PROXY protocol against real receivers and senders: HAProxy, nginx and Postfix.

Every client connects from 127.0.0.2 while tcpfwd and the peers connect from
127.0.0.1, so a peer (or tcpfwd) can only report 127.0.0.2 if a PROXY header carried
it there. Peers run in the foreground on loopback ports (see ``peers.py``).
"""

from __future__ import annotations

import socket

import pytest

from peers import CLIENT_IP, client_from, haproxy, nginx_stream, postfix, smtp_hello
from support import echo_server, free_port, recv_all
from tcpfwd.proxy_protocol import encode_v2
from tcpfwd.vocabulary import End

SEND_OPTIONS = {
    "v1": ["--send-proxy", "v1"],
    "v2": ["--send-proxy", "v2"],
    "v2+tlvs": ["--send-proxy", "v2", "--proxy-unique-id", "--proxy-crc32c"],
}
HAPROXY_LOG = "pp ci=%ci cp=%cp fi=%fi fp=%fp uid=%[fc_pp_unique_id]"


def exchange_from_client(address: tuple[str, int], payload: bytes) -> tuple[bytes, int]:
    """Send ``payload`` from 127.0.0.2 and half-close: (reply, the client's port)."""
    with client_from(address) as sock:
        port = sock.getsockname()[1]
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock), port


# --- tcpfwd sends ---------------------------------------------------------------------


@pytest.mark.parametrize("version", SEND_OPTIONS)
def test_haproxy_accept_proxy_sees_the_original_client(run_tcpfwd, tmp_path, version):
    port = free_port()
    with echo_server() as echo:
        config = (
            "frontend fe\n"
            f"    bind 127.0.0.1:{port} accept-proxy\n"
            f'    log-format "{HAPROXY_LOG}"\n'
            "    default_backend be\n"
            "backend be\n"
            f"    server echo {echo.address}\n"
        )
        with haproxy(tmp_path, config, port) as peer:
            proxy = run_tcpfwd("127.0.0.1:0", f"127.0.0.1:{port}", *SEND_OPTIONS[version])
            reply, client_port = exchange_from_client(proxy.address(), b"through haproxy")
            assert reply == b"through haproxy"
            line = peer.wait_for_line(r"pp ci=.*").group(0)
            (record,) = proxy.access_records(1)
    listen_port = proxy.address()[1]
    assert f"ci={CLIENT_IP} cp={client_port} fi=127.0.0.1 fp={listen_port} " in line
    expected_uid = record["session"] if version == "v2+tlvs" else "-"
    assert line.endswith(f"uid={expected_uid}")


def test_haproxy_refuses_a_header_whose_crc32c_is_wrong(tmp_path):
    """So the v2+TLVs pass above means our CRC32C was checked and right."""
    port = free_port()
    with echo_server() as echo:
        config = (
            "frontend fe\n"
            f"    bind 127.0.0.1:{port} accept-proxy\n"
            "    default_backend be\n"
            "backend be\n"
            f"    server echo {echo.address}\n"
        )
        with haproxy(tmp_path, config, port):
            header = bytearray(encode_v2((CLIENT_IP, 1000), ("127.0.0.1", port), crc32c=True))
            good = bytes(header)
            header[-1] ^= 0xFF
            replies = []
            for attempt in (bytes(header), good):
                with client_from(("127.0.0.1", port)) as sock:
                    try:
                        sock.sendall(attempt + b"ping")
                        sock.shutdown(socket.SHUT_WR)
                        replies.append(recv_all(sock))
                    except OSError:  # refused: closed or reset, maybe before the shutdown
                        replies.append(b"")
    assert replies == [b"", b"ping"]


@pytest.mark.parametrize("version", SEND_OPTIONS)
def test_nginx_stream_proxy_protocol_sees_the_original_client(run_tcpfwd, tmp_path, version):
    port = free_port()
    server = (
        "server {\n"
        f"    listen 127.0.0.1:{port} proxy_protocol;\n"
        '    return "$proxy_protocol_addr $proxy_protocol_port '
        '$proxy_protocol_server_addr $proxy_protocol_server_port $remote_addr\\n";\n'
        "}\n"
    )
    with nginx_stream(tmp_path, server, port):
        proxy = run_tcpfwd("127.0.0.1:0", f"127.0.0.1:{port}", *SEND_OPTIONS[version])
        with client_from(proxy.address()) as sock:
            client_port = sock.getsockname()[1]
            reply = recv_all(sock)
    listen_port = proxy.address()[1]
    assert reply == f"{CLIENT_IP} {client_port} 127.0.0.1 {listen_port} 127.0.0.1\n".encode()


@pytest.mark.parametrize("version", SEND_OPTIONS)
def test_postfix_smtpd_logs_the_original_client(run_tcpfwd, tmp_path, version):
    port = free_port()
    smtpd = f"127.0.0.1:{port} inet n - n - - smtpd -o smtpd_upstream_proxy_protocol=haproxy\n"
    with postfix(tmp_path, smtpd, ports=(port,)) as mail:
        proxy = run_tcpfwd("127.0.0.1:0", f"127.0.0.1:{port}", *SEND_OPTIONS[version])
        reply = smtp_hello(proxy.address())
        assert reply.startswith(b"220 "), reply
        assert b"221 " in reply
        mail.wait_for_log(rf"smtpd\[\d+\]: connect from unknown\[{CLIENT_IP}\]")


# --- tcpfwd accepts -------------------------------------------------------------------

HAPROXY_SENDERS = {
    "v1": "send-proxy",
    "v2": "send-proxy-v2",
    "v2+tlvs": "send-proxy-v2 proxy-v2-options crc32c,unique-id",
}


def haproxy_sender(port: int, target: int, server_options: str) -> str:
    return (
        "frontend fe\n"
        f"    bind 127.0.0.1:{port}\n"
        "    unique-id-format %{+X}o%ci-%cp\n"
        "    default_backend be\n"
        "backend be\n"
        f"    server tcpfwd 127.0.0.1:{target} {server_options}\n"
    )


@pytest.mark.parametrize("version", HAPROXY_SENDERS)
def test_tcpfwd_accepts_haproxy_send_proxy(run_tcpfwd, tmp_path, version):
    port, target = free_port(), free_port()
    with echo_server() as echo:
        proxy = run_tcpfwd(
            f"127.0.0.1:{target}",
            echo.address,
            "--accept-proxy",
            "--trusted-source",
            "127.0.0.1",
        )
        with haproxy(tmp_path, haproxy_sender(port, target, HAPROXY_SENDERS[version]), port):
            reply, client_port = exchange_from_client(("127.0.0.1", port), b"via haproxy")
            (record,) = proxy.access_records(1)
    assert reply == b"via haproxy"
    assert record["client"] == f"{CLIENT_IP}:{client_port}"
    assert record["via"].startswith("127.0.0.1:")
    assert record["from_client"] == str(len(b"via haproxy"))
    assert record["end"] == End.CLIENT_CLOSED


def test_tcpfwd_accepts_nginx_stream_proxy_protocol(run_tcpfwd, tmp_path):
    port, target = free_port(), free_port()
    server = (
        "server {\n"
        f"    listen 127.0.0.1:{port};\n"
        f"    proxy_pass 127.0.0.1:{target};\n"
        "    proxy_protocol on;\n"
        # Pass the client's EOF on instead of ending the session (nginx 1.21.4+).
        "    proxy_half_close on;\n"
        "}\n"
    )
    with echo_server() as echo:
        proxy = run_tcpfwd(
            f"127.0.0.1:{target}", echo.address, "--accept-proxy", "--trusted-source", "127.0.0.1"
        )
        with nginx_stream(tmp_path, server, port):
            reply, client_port = exchange_from_client(("127.0.0.1", port), b"via nginx")
            (record,) = proxy.access_records(1)
    assert reply == b"via nginx"
    assert record["client"] == f"{CLIENT_IP}:{client_port}"
    assert record["via"].startswith("127.0.0.1:")


# --- both directions at once ----------------------------------------------------------


@pytest.mark.parametrize("outgoing", ["v1", "v2+tlvs"])
def test_haproxy_to_tcpfwd_to_postfix_keeps_the_original_client(run_tcpfwd, tmp_path, outgoing):
    port, target, smtp_port = free_port(), free_port(), free_port()
    smtpd = f"127.0.0.1:{smtp_port} inet n - n - - smtpd -o smtpd_upstream_proxy_protocol=haproxy\n"
    with postfix(tmp_path, smtpd, ports=(smtp_port,)) as mail:
        proxy = run_tcpfwd(
            f"127.0.0.1:{target}",
            f"127.0.0.1:{smtp_port}",
            "--accept-proxy",
            "--trusted-source",
            "127.0.0.1/32",
            *SEND_OPTIONS[outgoing],
        )
        sender = haproxy_sender(port, target, HAPROXY_SENDERS["v2+tlvs"])
        with haproxy(tmp_path, sender, port):
            reply = smtp_hello(("127.0.0.1", port))
            assert reply.startswith(b"220 "), reply
            mail.wait_for_log(rf"smtpd\[\d+\]: connect from unknown\[{CLIENT_IP}\]")
            (record,) = proxy.access_records(1)
    assert record["client"].startswith(f"{CLIENT_IP}:")


def smtp_send(address: tuple[str, int], recipient: str) -> bytes:
    """Deliver one message over SMTP from 127.0.0.2; the server's replies."""
    with client_from(address) as sock:
        replies = [sock.recv(1024)]
        for line in (
            b"EHLO client.test",
            b"MAIL FROM:<sender@client.test>",
            f"RCPT TO:<{recipient}>".encode(),
            b"DATA",
            b"Subject: through tcpfwd\r\n\r\nhello\r\n.",
            b"QUIT",
        ):
            sock.sendall(line + b"\r\n")
            replies.append(sock.recv(1024))
        return b"".join(replies)


def test_postfix_delivers_through_tcpfwd_to_a_proxy_protocol_smtpd(run_tcpfwd, tmp_path):
    """The original use case: a relay's transport map points at tcpfwd, which sends the
    mail on to the internal server with a header naming the relay (bound to 127.0.0.3).

    One Postfix instance plays both parts: "relay-in" (port ``relay_port``) accepts the
    message and hands example.test to ``relay:[127.0.0.1]:<tcpfwd>``; "mailserver"
    (``server_port``, PROXY protocol) receives it from tcpfwd and discards it.
    """
    relay_port, server_port, tcpfwd_port = free_port(), free_port(), free_port()
    services = (
        f"127.0.0.1:{relay_port} inet n - n - - smtpd -o syslog_name=postfix/relay-in\n"
        f"127.0.0.1:{server_port} inet n - n - - smtpd -o syslog_name=postfix/mailserver"
        " -o smtpd_upstream_proxy_protocol=haproxy -o content_filter=discard:\n"
    )
    main_cf = (
        f"transport_maps = inline:{{example.test=relay:[127.0.0.1]:{tcpfwd_port}}}\n"
        "relay_domains = example.test\n"
        "smtp_bind_address = 127.0.0.3\n"
    )
    with postfix(tmp_path, services, main_cf, ports=(relay_port, server_port)) as mail:
        proxy = run_tcpfwd(
            f"127.0.0.1:{tcpfwd_port}", f"127.0.0.1:{server_port}", *SEND_OPTIONS["v2+tlvs"]
        )
        replies = smtp_send(("127.0.0.1", relay_port), "user@example.test")
        assert b"250 2.0.0 Ok: queued" in replies, replies
        mail.wait_for_log(r"postfix/relay-in/smtpd\[\d+\]: connect from unknown\[127\.0\.0\.2\]")
        mail.wait_for_log(r"postfix/mailserver/smtpd\[\d+\]: connect from unknown\[127\.0\.0\.3\]")
        mail.wait_for_log(
            rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{tcpfwd_port}.*status=sent", timeout=20
        )
        (record,) = proxy.access_records(1)
    assert record["client"].startswith("127.0.0.3:")
