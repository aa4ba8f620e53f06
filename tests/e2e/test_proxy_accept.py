"""accept_proxy against a running tcpfwd: good headers are believed only from trusted
sources, and every bad one closes its own connection, logged, without a backend."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from peers import CLIENT_IP, RecordingBackend, client_from
from support import (
    closed_without_reply,
    connect,
    echo_server,
    exchange,
    open_descriptors,
    recv_all,
    wait_until,
)
from tcpfwd.proxy_protocol import (
    TLV,
    TLV_UNIQUE_ID,
    V2_SIGNATURE,
    decode,
    encode_v1,
    encode_v2,
)
from tcpfwd.vocabulary import End, Reject

TRUSTED = ["--accept-proxy", "--trusted-source", "127.0.0.1/32"]
CLAIMED = ("192.0.2.7", 40123)
DESTINATION = ("198.51.100.1", 25)


# --- good headers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        encode_v1(CLAIMED, DESTINATION),
        encode_v2(CLAIMED, DESTINATION),
        encode_v2(CLAIMED, DESTINATION, tlvs=[TLV(TLV_UNIQUE_ID, b"lb-42")], crc32c=True),
    ],
    ids=["v1", "v2", "v2+tlvs"],
)
def test_header_names_the_client_and_only_what_follows_reaches_the_backend(run_tcpfwd, header):
    with RecordingBackend() as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, *TRUSTED)
        with connect(proxy.address()) as client:
            peer_port = client.getsockname()[1]
            # Header and data in one segment: the data must not be lost with the header.
            client.sendall(header + b"HELO after the header\r\n")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"HELO after the header\r\n"
        assert backend.recording().data == b"HELO after the header\r\n"
        (record,) = proxy.access_records(1)
    assert record["client"] == "192.0.2.7:40123"
    assert record["via"] == f"127.0.0.1:{peer_port}"
    assert record["from_client"] == str(len(b"HELO after the header\r\n"))


def test_header_sent_a_byte_at_a_time_within_the_timeout_is_accepted(run_tcpfwd):
    header = encode_v2(CLAIMED, DESTINATION, crc32c=True)
    with echo_server() as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, *TRUSTED)
        with connect(proxy.address()) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for byte in header:
                client.sendall(bytes([byte]))
                time.sleep(0.005)
            client.sendall(b"data")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"data"
        (record,) = proxy.access_records(1)
    assert record["client"] == "192.0.2.7:40123"


def test_local_header_means_the_connection_itself(run_tcpfwd):
    with echo_server() as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, *TRUSTED)
        with connect(proxy.address()) as client:
            port = client.getsockname()[1]
            client.sendall(encode_v2(command="LOCAL") + b"check")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"check"
        (record,) = proxy.access_records(1)
    assert record["client"] == f"127.0.0.1:{port}"
    assert record["via"] == "-"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_decoded_client_is_what_the_backend_header_carries(run_tcpfwd, version):
    with RecordingBackend() as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, *TRUSTED, "--send-proxy", version)
        with connect(proxy.address()) as client:
            client.sendall(encode_v1(CLAIMED, DESTINATION) + b"payload")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client).endswith(b"payload")
        header, rest = decode(backend.recording().data)
    assert header.source == CLAIMED
    assert header.destination == DESTINATION
    assert header.version == int(version[1])
    assert rest == b"payload"


def test_optional_mode_relays_a_trusted_client_without_a_header(run_tcpfwd):
    with echo_server() as backend:
        proxy = run_tcpfwd(
            "127.0.0.1:0",
            backend.address,
            "--accept-proxy-optional",
            "--trusted-source",
            "127.0.0.1",
        )
        # "PRO" could begin a header; "PROBE" cannot: all of it is session data.
        assert exchange(proxy.address(), b"PROBE no header here") == b"PROBE no header here"
        assert exchange(proxy.address(), encode_v1(CLAIMED, DESTINATION) + b"x") == b"x"
        first, second = proxy.access_records(2)
    assert first["via"] == "-"
    assert first["client"].startswith("127.0.0.1:")
    assert second["client"] == "192.0.2.7:40123"


def test_optional_mode_gives_a_silent_client_the_backend_after_the_timeout(run_tcpfwd):
    with echo_server(b"220 ready\r\n") as backend:
        proxy = run_tcpfwd(
            "127.0.0.1:0",
            backend.address,
            "--accept-proxy-optional",
            "--trusted-source",
            "127.0.0.1",
            "--proxy-header-timeout",
            "300ms",
        )
        with connect(proxy.address()) as client:
            started = time.monotonic()
            assert client.recv(64) == b"220 ready\r\n"
            assert time.monotonic() - started >= 0.3


# --- bad input ------------------------------------------------------------------------


def _v2_with_bad_crc() -> bytes:
    header = bytearray(encode_v2(CLAIMED, DESTINATION, crc32c=True))
    header[-1] ^= 0xFF
    return bytes(header)


def _v2_with_wrong_signature() -> bytes:
    header = bytearray(encode_v2(CLAIMED, DESTINATION))
    header[5] ^= 0x01
    return bytes(header)


BAD_HEADERS = {
    "garbage": (b"GET / HTTP/1.0\r\n\r\n", "not a PROXY protocol header"),
    "wrong_v2_signature": (_v2_with_wrong_signature(), "v2: bad signature"),
    "bad_crc32c": (_v2_with_bad_crc(), "v2: bad CRC32C"),
    "oversized_v2": (V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 4000), "exceeds"),
    "oversized_v1": (b"PROXY TCP4 " + b"1" * 120, "longer than 107"),
    "unknown_v1_protocol": (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
    "udp_addresses": (encode_v2(CLAIMED, DESTINATION, transport="DGRAM"), "over UDP"),
}


@pytest.mark.parametrize("name", BAD_HEADERS)
def test_bad_header_closes_the_connection_without_a_backend(run_tcpfwd, name):
    payload, reason = BAD_HEADERS[name]
    with echo_server() as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, *TRUSTED)
        with connect(proxy.address()) as client:
            client.sendall(payload + b"and then data")
            assert closed_without_reply(client)
        (record,) = proxy.access_records(1)
        event = proxy.wait_for_event(f"({Reject.BAD_PROXY_HEADER}), the latest from 127.0.0.1:")
        assert backend.accepted == 0
    assert record["end"] == Reject.BAD_PROXY_HEADER
    assert record["backend"] == "-"
    assert reason in event
    assert "turned away 1 connection(s)" in event


def test_truncated_header_is_reported_when_the_client_closes(run_tcpfwd):
    with echo_server() as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, *TRUSTED)
        with connect(proxy.address()) as client:
            client.sendall(encode_v2(CLAIMED, DESTINATION)[:20])
            client.shutdown(socket.SHUT_WR)
            assert closed_without_reply(client)
        (record,) = proxy.access_records(1)
        event = proxy.wait_for_event(Reject.BAD_PROXY_HEADER)
        assert backend.accepted == 0
    assert record["end"] == Reject.BAD_PROXY_HEADER
    assert "truncated header (20 of 28 bytes)" in event


def test_slow_drip_header_times_out(run_tcpfwd):
    with echo_server() as backend:
        proxy = run_tcpfwd(
            "127.0.0.1:0", backend.address, *TRUSTED, "--proxy-header-timeout", "500ms"
        )
        with connect(proxy.address()) as client:
            started = time.monotonic()
            closed = False
            for byte in encode_v1(CLAIMED, DESTINATION):
                try:
                    client.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.05)
            assert closed or closed_without_reply(client)
            assert time.monotonic() - started < 3
        (record,) = proxy.access_records(1)
        event = proxy.wait_for_event(Reject.PROXY_HEADER_TIMEOUT)
        assert backend.accepted == 0
    assert record["end"] == Reject.PROXY_HEADER_TIMEOUT
    assert "no complete header within 0.5s" in event


def test_untrusted_source_is_refused_even_with_a_valid_header(run_tcpfwd):
    with echo_server() as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, *TRUSTED)
        with client_from(proxy.address()) as client:
            client.sendall(encode_v1(CLAIMED, DESTINATION) + b"data")
            assert closed_without_reply(client)
        event = proxy.wait_for_event(Reject.UNTRUSTED_SOURCE)
        assert backend.accepted == 0
    # Turned away before a byte is read: no session, so no access line; the claim is
    # never believed: the log names the peer, not the header's address.
    assert proxy.access == []
    assert f"from {CLIENT_IP}:" in event
    assert CLAIMED[0] not in event


def test_a_client_that_connects_and_leaves_silently_is_not_an_error(run_tcpfwd):
    with echo_server() as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, *TRUSTED)
        connect(proxy.address()).close()
        proxy.access_records(1)
        # After a first session: the loop opens a few descriptors of its own lazily.
        before = open_descriptors(proxy.pid)
        for _ in range(10):
            connect(proxy.address()).close()
        records = proxy.access_records(11)
        assert backend.accepted == 0
        # Nothing of those sessions is left open (closing takes a loop turn after the log).
        wait_until(lambda: open_descriptors(proxy.pid) <= before, "sockets to close", 3)
    assert {r["end"] for r in records} == {End.CLIENT_CLOSED}
    assert not [e for e in proxy.events if "turned away" in e]


def test_bad_clients_do_not_disturb_concurrent_good_sessions(run_tcpfwd):
    """Every kind of bad input at once, while good sessions stream through."""
    with echo_server() as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, *TRUSTED, "--proxy-header-timeout", "1s")
        address = proxy.address()
        good_results: list[bytes] = []
        bad_closed: list[bool] = []

        def good(index: int) -> None:
            with connect(address) as client:
                client.sendall(encode_v2(("192.0.2.9", 1000 + index), DESTINATION))
                for chunk in range(20):
                    client.sendall(b"%d:%d;" % (index, chunk))
                    time.sleep(0.02)
                client.shutdown(socket.SHUT_WR)
                good_results.append(recv_all(client))

        def bad(payload: bytes, source: str = "127.0.0.1", drip: bool = False) -> None:
            with client_from(address, source) as client:
                for byte in payload if drip else [payload]:
                    try:
                        client.sendall(bytes([byte]) if drip else payload)
                    except OSError:
                        break
                    if drip:
                        time.sleep(0.1)
                bad_closed.append(closed_without_reply(client))

        threads = [threading.Thread(target=good, args=(i,)) for i in range(5)]
        threads += [threading.Thread(target=bad, args=(p,)) for p, _ in BAD_HEADERS.values()]
        threads.append(
            threading.Thread(target=bad, args=(encode_v1(CLAIMED, DESTINATION), CLIENT_IP))
        )
        threads.append(
            threading.Thread(
                target=bad, args=(encode_v1(CLAIMED, DESTINATION),), kwargs={"drip": True}
            )
        )
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        # The untrusted peer is turned away before it becomes a session: no line.
        records = proxy.access_records(len(threads) - 1)
        proxy.wait_for_event(Reject.UNTRUSTED_SOURCE)
        assert backend.accepted == 5
    assert sorted(good_results) == sorted(
        b"".join(b"%d:%d;" % (i, c) for c in range(20)) for i in range(5)
    )
    assert bad_closed == [True] * (len(BAD_HEADERS) + 2)
    ends = sorted(r["end"] for r in records)
    assert ends.count(End.CLIENT_CLOSED) == 5
    assert ends.count(Reject.BAD_PROXY_HEADER) == len(BAD_HEADERS)
    assert ends.count(Reject.UNTRUSTED_SOURCE) == 0
    assert ends.count(Reject.PROXY_HEADER_TIMEOUT) == 1


def test_a_flood_of_bad_headers_is_logged_as_one_line_with_a_count(run_tcpfwd):
    with echo_server() as backend:
        proxy = run_tcpfwd("127.0.0.1:0", backend.address, *TRUSTED)
        for _ in range(30):
            with connect(proxy.address()) as client:
                client.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert closed_without_reply(client)
        with client_from(proxy.address()) as untrusted:
            assert closed_without_reply(untrusted)
        records = proxy.access_records(30)
        proxy.wait_for_event(Reject.UNTRUSTED_SOURCE)
        assert backend.accepted == 0
    assert {r["end"] for r in records} == {Reject.BAD_PROXY_HEADER}
    # One line per cause and service in a window: the first connection's, with a count.
    warnings = [e for e in proxy.events if "turned away" in e]
    assert len(warnings) == 2, warnings
    assert f"turned away 1 connection(s) ({Reject.BAD_PROXY_HEADER})" in warnings[0]
