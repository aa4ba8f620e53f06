"""send_proxy: the header built for each backend, and its limits (no sockets); what a
backend receives from a running tcpfwd is tested in tests/e2e/test_proxy_send.py."""

from __future__ import annotations

from tcpfwd.config import SendProxySettings
from tcpfwd.proxy_protocol import V1_MAX_LENGTH, decode
from tcpfwd.proxy_send import POSTFIX_MAX_HEADER, SessionHeaders, header_for

V1 = SendProxySettings(1)
V2 = SendProxySettings(2)
V2_TLVS = SendProxySettings(2, unique_id=True, crc32c=True)


def test_the_longest_v1_line_fits_nginx_and_postfix():
    widest = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = header_for(V1, (widest, 65535), (widest, 65535))
    assert len(line) <= V1_MAX_LENGTH


def test_the_longest_v2_header_fits_postfix_peek():
    widest = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    header = header_for(V2_TLVS, (widest, 65535), (widest, 65535), b"x" * 500)
    assert len(header) <= POSTFIX_MAX_HEADER
    decoded, _ = decode(header)
    assert decoded.unique_id == b"x" * 128


def test_mixed_families_become_ipv4_mapped_ipv6_never_unknown():
    for settings in (V1, V2):
        header, _ = decode(header_for(settings, ("192.0.2.1", 1000), ("2001:db8::1", 25)))
        assert header.family == "TCP6"
        assert header.source == ("::ffff:c000:201", 1000)
        assert header.destination == ("2001:db8::1", 25)


def test_zone_ids_are_dropped():
    header, _ = decode(header_for(V1, ("fe80::1%eth0", 1000), ("fe80::2%eth0", 25)))
    assert header.source == ("fe80::1", 1000)


def test_unique_id_is_sent_only_when_asked_for():
    with_id, _ = decode(header_for(V2_TLVS, ("192.0.2.1", 1), ("192.0.2.2", 2), b"s-1"))
    without, _ = decode(header_for(V2, ("192.0.2.1", 1), ("192.0.2.2", 2), b"s-1"))
    assert with_id.unique_id == b"s-1"
    assert without.tlvs == ()


def test_session_headers_are_built_once_per_setting():
    headers = SessionHeaders(("192.0.2.1", 1), ("192.0.2.2", 2), b"id")
    assert headers.for_backend(V1) is headers.for_backend(SendProxySettings(1))
    assert headers.for_backend(V1) != headers.for_backend(V2)
