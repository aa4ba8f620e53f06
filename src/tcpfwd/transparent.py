"""Transparent mode: connect to a backend from the client's own address.

With ``transparent = true`` the socket towards the backend is made with
``IP_TRANSPARENT`` (IPv4) or ``IPV6_TRANSPARENT`` (IPv6), which lets it be bound to an
address that is not the host's: the client's (the one a trusted PROXY header names,
when one was accepted). The backend then sees the client as its peer, as with HAProxy's
``usesrc clientip`` or nginx's ``proxy_bind $remote_addr transparent``. The port is the
kernel's choice, made at connect time (``IP_BIND_ADDRESS_NO_PORT``), so that one busy
client address shares ports across backends instead of holding one per connection.

Replies to that address come back only if the operator's routing brings them here and
the host delivers them locally (the ``-m socket`` mark, an ``ip rule`` and a local
route table; see docs/transparent.md): without that, connects time out.

The kernel allows ``IP_TRANSPARENT`` to a process with ``CAP_NET_ADMIN`` (recent
kernels also accept ``CAP_NET_RAW``). Whether this process may is decided once, at
start and on reload (`capability_problem`), so that a missing capability is one clear
error rather than a failure of every connection. A bind that still fails is an attempt
failure with its own reason, ``transparent_bind``: it says nothing about the backend,
so it does not mark the backend down.

Nothing here knows about sessions or event loops: the dialer connects the socket.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket

from .config import Config

__all__ = [
    "TransparentBindError",
    "capability_problem",
    "has_transparent_capability",
    "transparent_services",
    "transparent_socket",
]

# The attempt outcome of a failed transparent bind, as the access log and metrics show it.

# From linux/capability.h.
CAP_NET_ADMIN = 12
# From linux/in.h and linux/in6.h; Python 3.11's socket module lacks some of them.
IP_TRANSPARENT: int = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT: int = getattr(socket, "IPV6_TRANSPARENT", 75)
IP_BIND_ADDRESS_NO_PORT: int = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

GRANT_HINT = (
    "grant it (systemd: AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE) "
    "or run tcpfwd as root without global.user"
)


class TransparentBindError(OSError):
    """The backend socket could not be made transparent or bound to the client's address.

    An ``OSError`` (with the errno behind it), so that code handling connect failures
    in general still handles it; told apart by its type, its reason word being
    ``Outcome.TRANSPARENT_BIND``.
    """


def _family_name(family: int) -> str:
    return "IPv6" if family == socket.AF_INET6 else "IPv4"


def _source_for(family: int, client_ip: str) -> str:
    """The client's address as ``family`` can bind it (IPv4-mapped IPv6 unwrapped)."""
    plain, _, zone = client_ip.partition("%")
    try:
        address = ipaddress.ip_address(plain)
    except ValueError:
        raise TransparentBindError(
            errno.EINVAL, f"client address {client_ip!r} is not an IP address"
        ) from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack peer or a PROXY header may name an IPv4 client this way.
        address = address.ipv4_mapped
        zone = ""
    wanted = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    if wanted != family:
        raise TransparentBindError(
            errno.EAFNOSUPPORT,
            f"client {client_ip} is {_family_name(wanted)} but the backend is "
            f"{_family_name(family)}: a connection cannot have one source of each family",
        )
    return f"{address}%{zone}" if zone else str(address)


def transparent_socket(family: int, client_ip: str) -> socket.socket:
    """A non-blocking TCP socket of ``family`` bound to ``client_ip``, not yet connected.

    The port is chosen by the kernel when the socket connects. Raises
    `TransparentBindError` when the address does not fit the family, when the process
    may not set the transparent option, or when the bind fails.
    """
    source = _source_for(family, client_ip)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        except OSError as error:
            raise TransparentBindError(
                error.errno,
                f"cannot set the transparent option: {error.strerror} (it needs CAP_NET_ADMIN)",
            ) from None
        # Where the kernel lacks it, the port is chosen at bind time instead: fine.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        try:
            sock.bind((source, 0))
        except OSError as error:
            raise TransparentBindError(
                error.errno, f"cannot bind to client address {client_ip}: {error.strerror}"
            ) from None
    except BaseException:
        sock.close()
        raise
    return sock


# --- may this process do it? ----------------------------------------------------------


def effective_capabilities(status_path: str = "/proc/self/status") -> int | None:
    """The ``CapEff`` mask of this process, or None where it cannot be read."""
    try:
        with open(status_path) as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _kernel_allows() -> bool:
    """Ask the kernel itself, on a socket that is closed at once and never used."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
    except OSError:
        return False
    return True


def has_transparent_capability() -> bool:
    """Whether this process may make transparent sockets.

    ``CAP_NET_ADMIN`` in the effective set settles it. Without it (or without a
    readable ``/proc``) the kernel is asked directly, since some kernels also accept
    ``CAP_NET_RAW`` and containers may map capabilities in ways ``CapEff`` cannot show.
    """
    caps = effective_capabilities()
    if caps is not None and caps & (1 << CAP_NET_ADMIN):
        return True
    return _kernel_allows()


def transparent_services(config: Config) -> list[str]:
    """Names of the services with at least one transparent backend."""
    return [s.name for s in config.services if any(b.transparent for b in s.backends)]


def capability_problem(config: Config) -> str | None:
    """One line saying what to grant, if ``config`` needs transparent sockets and this
    process cannot make them; None otherwise."""
    services = transparent_services(config)
    if not services or has_transparent_capability():
        return None
    return (
        f"transparent mode (service{'s' * (len(services) > 1)} {', '.join(services)}) "
        f"needs CAP_NET_ADMIN, which this process (uid {os.geteuid()}) does not have: "
        f"{GRANT_HINT}"
    )
