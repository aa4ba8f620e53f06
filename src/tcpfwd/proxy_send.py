"""PROXY headers towards backends: what a session or a health check writes first.

The dialer writes the header in one ``transport.write`` right after the connect and
before anything else (the client's held bytes, or waiting for a greeting: a Postfix
behind ``smtpd_upstream_proxy_protocol`` says nothing until it has the header).

Receivers' quirks that shape what is built here (see also :mod:`.proxy_protocol`):

* Postfix rejects ``PROXY UNKNOWN``, so addresses are always real TCP4/TCP6 ones,
  health checks included (v1 checks carry the check socket's own addresses; v2
  checks send LOCAL, which Postfix 3.5+, HAProxy and nginx accept).
* Postfix peeks at most 536 bytes and nginx reads v1 lines of at most 107 bytes: our
  v1 line is at most 104 bytes, and our v2 header at most 16 + 36 (IPv6 addresses)
  + 3 + 128 (unique id) + 7 (CRC32C) = 190 bytes.
* Source and destination must be of one family. They always are for a client that
  connected to us directly (listeners are IPv6-only on IPv6), but a peer's header may
  not be: an IPv4 address next to an IPv6 one is sent as IPv4-mapped IPv6 (TCP6),
  which Postfix turns back into IPv4; HAProxy does the same for v2. Never UNKNOWN.
* Zone ids (``fe80::1%eth0``) mean nothing to the receiver and cannot be encoded;
  they are dropped.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Final

from .config import SendProxySettings
from .proxy_protocol import TLV, TLV_UNIQUE_ID, UNIQUE_ID_MAX_LENGTH, encode_v1, encode_v2
from .vocabulary import HostPort

__all__ = ["POSTFIX_MAX_HEADER", "SessionHeaders", "header_for", "proxy_header_for_check"]

# Postfix reads the header with one recv(MSG_PEEK) of this many bytes (HAPROXY_HEADER_MAX_LEN).
POSTFIX_MAX_HEADER: Final = 536


def _plain(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(host.split("%", 1)[0])


def _one_family(source: HostPort, destination: HostPort) -> tuple[HostPort, HostPort]:
    """Both addresses in one family: IPv4 becomes IPv4-mapped IPv6 next to IPv6."""
    src, dst = _plain(source[0]), _plain(destination[0])
    if src.version != dst.version:
        if isinstance(src, ipaddress.IPv4Address):
            src = ipaddress.IPv6Address(f"::ffff:{src}")
        if isinstance(dst, ipaddress.IPv4Address):
            dst = ipaddress.IPv6Address(f"::ffff:{dst}")
    return (str(src), source[1]), (str(dst), destination[1])


def header_for(
    settings: SendProxySettings,
    source: HostPort,
    destination: HostPort,
    unique_id: bytes = b"",
) -> bytes:
    """The header announcing a client ``source`` that connected to ``destination``."""
    source, destination = _one_family(source, destination)
    if settings.version == 1:
        return encode_v1(source, destination)
    tlvs = []
    if settings.unique_id and unique_id:
        tlvs.append(TLV(TLV_UNIQUE_ID, unique_id[:UNIQUE_ID_MAX_LENGTH]))
    return encode_v2(source, destination, tlvs=tlvs, crc32c=settings.crc32c)


class SessionHeaders:
    """One session's headers: built at most once per version and TLV choice.

    Backends of one service may differ in ``send_proxy``; a session that fails over
    from one to the next reuses what it built.
    """

    __slots__ = ("_built", "destination", "source", "unique_id")

    def __init__(self, source: HostPort, destination: HostPort, unique_id: bytes) -> None:
        self.source = source
        self.destination = destination
        self.unique_id = unique_id
        self._built: dict[SendProxySettings, bytes] = {}

    def for_backend(self, settings: SendProxySettings) -> bytes:
        header = self._built.get(settings)
        if header is None:
            header = header_for(settings, self.source, self.destination, self.unique_id)
            self._built[settings] = header
        return header


def proxy_header_for_check(settings: SendProxySettings | None, sock: Any) -> bytes:
    """What a health check must write first on ``sock`` (connected) to this backend.

    ``b""`` when the backend expects no header. v2 sends LOCAL ("a health check, not
    a relayed client": the receiver uses the connection's own addresses); v1 has no
    LOCAL and Postfix refuses UNKNOWN, so it names the check's own socket: source =
    ``sock.getsockname()``, destination = ``sock.getpeername()``. ``sock`` is a
    socket or anything with those two methods (e.g. ``transport.get_extra_info``'s
    socket). Write the result in one call before anything else.
    """
    if settings is None:
        return b""
    if settings.version == 2:
        return encode_v2(command="LOCAL", crc32c=settings.crc32c)
    local, peer = sock.getsockname(), sock.getpeername()
    return header_for(settings, (str(local[0]), int(local[1])), (str(peer[0]), int(peer[1])))
