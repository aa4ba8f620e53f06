"""PROXY headers from clients: who may send one, reading it, and what it means.

A service with ``accept_proxy`` decides on the raw peer address first: a peer outside
``trusted_sources`` is refused before a byte is read, header or not, so an address it
claims is never believed. A trusted peer's header is read out of the client
endpoint's held bytes (the endpoint holds what it reads until the relay links it), fed
to the sans-IO :class:`~.proxy_protocol.ProxyDecoder`, and whatever followed the
header goes back to the front of the held bytes: it reaches the backend untouched.

``accept_proxy = "optional"`` lets trusted peers connect without a header. Whether a
header comes is decided on the first bytes: they either start with a PROXY signature
(``PROXY `` or v2's 12 bytes), and are then held to the strict decoder's rules, or they
do not, and are all session data. A trusted peer that sends nothing is taken as having
no header once the header timeout passes, so server-speaks-first protocols (SMTP)
wait that long for their greeting: prefer ``true`` where every peer sends a header.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from typing import Final

from .config import IPNetwork
from .proxy_protocol import V2_SIGNATURE, ProxyDecoder, ProxyHeader, ProxyProtocolError
from .relay import Endpoint

# Why a connection was refused, as the access log's end word.
END_UNTRUSTED: Final = "untrusted_source"
END_BAD_HEADER: Final = "bad_proxy_header"
END_HEADER_TIMEOUT: Final = "proxy_header_timeout"

_V1_SIGNATURE: Final = b"PROXY "

HostPort = tuple[str, int]


class HeaderRejected(Exception):
    """The client's header is unacceptable; ``end`` is the log word, ``reason`` why."""

    def __init__(self, end: str, reason: str) -> None:
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


async def receive_header(
    endpoint: Endpoint, *, timeout: float, optional: bool = False
) -> tuple[ProxyHeader | None, int]:
    """Read a PROXY header off a client endpoint: ``(header, its length on the wire)``.

    ``(None, 0)``: no header (only when ``optional``). Bytes after the header stay in
    ``endpoint.held``. Raises :class:`HeaderRejected` for a malformed, truncated,
    oversized or too slow header and :class:`ClientGone` if the client left silently.
    """
    loop = asyncio.get_running_loop()
    decoder = ProxyDecoder()
    undecided = optional
    fed = 0
    wake: asyncio.Future[None] = loop.create_future()

    def changed() -> None:
        if not wake.done():
            wake.set_result(None)

    previous = endpoint.on_change
    endpoint.on_change = changed
    try:
        async with asyncio.timeout(timeout):
            while True:
                if undecided:
                    verdict = starts_with_header(endpoint.held)
                    if verdict is False:
                        return None, 0
                    undecided = verdict is None
                if not undecided and endpoint.held:
                    chunk = endpoint.take_held(len(endpoint.held))
                    fed += len(chunk)
                    try:
                        header = decoder.feed(chunk)
                    except ProxyProtocolError as error:
                        raise HeaderRejected(END_BAD_HEADER, str(error)) from None
                    if header is not None:
                        if header.transport == "DGRAM":
                            # Addresses of a UDP flow cannot describe this TCP client.
                            raise HeaderRejected(
                                END_BAD_HEADER, f"v2: {header.family} over UDP on a TCP connection"
                            )
                        # Nothing ran since take_held: held is empty, the rest goes first.
                        endpoint.held[:0] = decoder.remainder
                        return header, decoder.header_length
                if endpoint.lost or endpoint.eof:
                    if fed == 0 and not endpoint.held:
                        raise ClientGone(reset=endpoint.error is not None)
                    if undecided:
                        # A few bytes that might have become a signature, then EOF: data.
                        return None, 0
                    try:
                        decoder.feed_eof()
                    except ProxyProtocolError as error:
                        raise HeaderRejected(END_BAD_HEADER, str(error)) from None
                await wake
                wake = loop.create_future()
    except TimeoutError:
        if undecided:
            return None, 0
        got = fed + len(endpoint.held)
        raise HeaderRejected(
            END_HEADER_TIMEOUT,
            f"no complete header within {timeout:g}s ({got} bytes received)",
        ) from None
    finally:
        endpoint.on_change = previous
