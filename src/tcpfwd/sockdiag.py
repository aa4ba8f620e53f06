"""Is there a TCP socket on this host with these two addresses? (Linux sock_diag)

Asked by loop detection, rarely: when a connection arrives from the local address of one
of tcpfwd's own connections to a backend but not on the address that connection was
made to. Either a client on this host happens to use the same local port (the kernel
gives one port to connections to different destinations), and then the client's own
socket, from that address to the one it arrived on, exists here; or a box in the path
(NAT, a port forward) sent tcpfwd's connection back to it, and then no socket has those
two addresses: tcpfwd's own has the address it connected to, before translation.

One exact lookup over NETLINK_SOCK_DIAG, as ``ss`` does it, for sockets of this network
namespace; no privilege needed.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from typing import Final

from .vocabulary import HostPort

NETLINK_SOCK_DIAG: Final = 4
SOCK_DIAG_BY_FAMILY: Final = 20
NLM_F_REQUEST: Final = 0x01
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
# Every TCP state.
_ALL_STATES: Final = 0xFFFFFFFF
_NO_COOKIE: Final = 0xFFFFFFFF

_HEADER = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid: sport and
# dport (network order), src and dst (16 bytes each), interface, cookie (two words).
_REQUEST = struct.Struct("=BBBxI2H16s16sI2I")


def _packed(host: str) -> tuple[int, bytes]:
    address = ipaddress.ip_address(host.split("%", 1)[0])
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return family, address.packed.ljust(16, b"\0")


def socket_exists(local: HostPort, remote: HostPort) -> bool | None:
    """Whether a TCP socket with local address ``local`` and remote ``remote`` exists
    here; None when the kernel cannot be asked."""
    try:
        family, source = _packed(local[0])
        remote_family, destination = _packed(remote[0])
    except ValueError:
        return None
    if family != remote_family:
        return False
    request = _REQUEST.pack(
        family,
        socket.IPPROTO_TCP,
        0,
        _ALL_STATES,
        socket.htons(local[1]),
        socket.htons(remote[1]),
        source,
        destination,
        0,
        _NO_COOKIE,
        _NO_COOKIE,
    )
    message = _HEADER.pack(_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as link:
            link.settimeout(1.0)
            link.send(message + request)
            answer = link.recv(65536)
    except (OSError, AttributeError):
        return None
    if len(answer) < _HEADER.size:
        return None
    _length, kind, _flags, _seq, _pid = _HEADER.unpack_from(answer)
    if kind == NLMSG_ERROR:
        code: int = -struct.unpack_from("=i", answer, _HEADER.size)[0]
        if code == errno.ENOENT:
            return False
        return None if code else False
    return bool(kind == SOCK_DIAG_BY_FAMILY)


__all__ = ["socket_exists"]
