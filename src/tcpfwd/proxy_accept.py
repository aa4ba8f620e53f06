"""PROXY headers from clients: who may send one, reading it, and what it means.

A service with ``accept_proxy`` decides on the raw peer address first: a peer outside
``trusted_sources`` is refused before a byte is read, header or not, so an address it
claims is never believed. A trusted peer's header is read from what the session
receives, fed to the sans-IO :class:`~.proxy_protocol.ProxyDecoder`, and whatever
followed the header is held for the backend: it reaches it untouched, first.

``accept_proxy = "optional"`` lets trusted peers connect without a header. Whether a
header comes is decided on the first bytes: they either start with a PROXY signature
(``PROXY `` or v2's 12 bytes), and are then held to the strict decoder's rules, or they
do not, and are all session data. A trusted peer that sends nothing is taken as having
no header once the header timeout passes, so server-speaks-first protocols (SMTP)
wait that long for their greeting: prefer ``true`` where every peer sends a header.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Final

from .config import IPNetwork
from .proxy_protocol import V2_SIGNATURE, ProxyDecoder, ProxyHeader, ProxyProtocolError
from .vocabulary import HostPort, Reject

# Why a connection was refused, as the access log's end word.

_V1_SIGNATURE: Final = b"PROXY "


class HeaderRejected(Exception):
    """The client's header is unacceptable; ``end`` is the log word, ``reason`` why."""

    def __init__(self, end: Reject, reason: str) -> None:
        super().__init__(f"{end}: {reason}")
        self.end = end
        self.reason = reason


class ClientGone(Exception):
    """The client closed or reset before sending a byte: nothing to complain about.

    (A load balancer's TCP check of our port looks like this.)
    """

    def __init__(self, reset: bool) -> None:
        super().__init__("reset" if reset else "closed")
        self.reset = reset


def is_trusted(host: str, trusted: Sequence[IPNetwork]) -> bool:
    """Whether a peer at ``host`` may send a PROXY header."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack socket shows IPv4 peers this way; the operator wrote them as IPv4.
        mapped = address.ipv4_mapped
        if any(mapped in network for network in trusted):
            return True
    return any(address in network for network in trusted)


def starts_with_header(data: bytes | bytearray) -> bool | None:
    """True if ``data`` begins a PROXY header, False if it cannot, None if too short to say."""
    for signature in (_V1_SIGNATURE, V2_SIGNATURE):
        head = bytes(data[: len(signature)])
        if head == signature:
            return True
        if signature.startswith(head):
            return None
    return False


def addresses_of(header: ProxyHeader) -> tuple[HostPort, HostPort] | None:
    """The (client, destination) a header announces, or None: use the connection's own.

    LOCAL (v2 health checks, v1 UNKNOWN) and families without IP addresses (UNIX,
    UNSPEC) carry no client address that access control or a backend could use.
    """
    if header.command != "PROXY" or header.family not in ("TCP4", "TCP6"):
        return None
    source, destination = header.source, header.destination
    assert isinstance(source, tuple) and isinstance(destination, tuple)
    return source, destination


class HeaderReader:
    """Reads one client's PROXY header out of the bytes the session receives (sans-IO).

    ``feed`` returns None while more bytes are needed, else ``(header, rest)``: the
    header (None: the client sent none, only where optional) and the bytes that followed
    it, which belong to the session. ``feed_eof`` and ``timed_out`` say what the end of
    the bytes, or of the time, means. Raises :class:`HeaderRejected` for a malformed,
    truncated, oversized or too slow header and :class:`ClientGone` if the client left
    without a byte.
    """

    __slots__ = ("_decoder", "_held", "_undecided", "received")

    def __init__(self, *, optional: bool) -> None:
        self._decoder = ProxyDecoder()
        self._undecided = optional
        # Bytes that might still begin a header (optional mode), not yet told apart.
        self._held = b""
        self.received = 0

    def feed(self, data: bytes) -> tuple[ProxyHeader | None, bytes] | None:
        self.received += len(data)
        if self._undecided:
            data = self._held + data
            verdict = starts_with_header(data)
            if verdict is False:
                return None, data
            if verdict is None:
                self._held = data
                return None
            self._undecided = False
            self._held = b""
        try:
            header = self._decoder.feed(data)
        except ProxyProtocolError as error:
            raise HeaderRejected(Reject.BAD_PROXY_HEADER, str(error)) from None
        if header is None:
            return None
        if header.transport == "DGRAM":
            # Addresses of a UDP flow cannot describe this TCP client.
            raise HeaderRejected(
                Reject.BAD_PROXY_HEADER, f"v2: {header.family} over UDP on a TCP connection"
            )
        return header, self._decoder.remainder

    def feed_eof(self, *, reset: bool) -> tuple[None, bytes]:
        if not self.received:
            raise ClientGone(reset=reset)
        if self._undecided:
            # A few bytes that might have become a signature, then EOF: data.
            return None, self._held
        try:
            self._decoder.feed_eof()
        except ProxyProtocolError as error:
            raise HeaderRejected(Reject.BAD_PROXY_HEADER, str(error)) from None
        raise HeaderRejected(Reject.BAD_PROXY_HEADER, "connection ended within the header")

    def timed_out(self, timeout: float) -> tuple[None, bytes]:
        if self._undecided:
            return None, self._held
        raise HeaderRejected(
            Reject.PROXY_HEADER_TIMEOUT,
            f"no complete header within {timeout:g}s ({self.received} bytes received)",
        )
