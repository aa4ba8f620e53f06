"""Listening sockets before anything serves on them: which to open, and from where.

A configured listen address gets its sockets from, in this order: a supervisor that
bound them for its worker; systemd (socket activation), when one of its sockets serves
that address; or a fresh bind. Opening is all or nothing: the first address that cannot
be bound closes what was opened before it, so a configuration (at start or on reload)
is served as a whole or not at all.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from typing import TypeVar

from .config import Address, Config, ServiceConfig
from .listener import ListenError, open_listening_sockets
from .systemd import inherited_sockets

log = logging.getLogger("tcpfwd")

# What identifies a listening address across reloads: the address itself, except that
# "any port" (0) is a different socket for every service that asks for one.
ListenKey = tuple[str, Address]

Opened = TypeVar("Opened")


def listen_key(service: str, address: Address) -> ListenKey:
    return (service if address.port == 0 else "", address)


def listen_addresses(config: Config) -> dict[ListenKey, tuple[ServiceConfig, Address]]:
    """Every listen address of ``config`` by its key, with the service that has it."""
    return {
        listen_key(service.name, address): (service, address)
        for service in config.services
        for address in service.listen
    }


def socket_name(sock: socket.socket) -> str:
    try:
        return str(sock.getsockname())
    except OSError:
        return f"fd {sock.fileno()}"


def close_sockets(sockets: Iterable[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def serves(sock: socket.socket, address: Address) -> bool:
    """Whether an inherited listening socket is the one for a configured address."""
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return False
    if port != address.port:
        return False
    if not address.host:
        return host in ("0.0.0.0", "::")
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return any(info[4][0] == host for info in infos)


class Inherited:
    """Listening sockets passed by systemd, until a configured address claims them."""

    def __init__(self, sockets: list[socket.socket] | None = None) -> None:
        self._sockets = sockets or []

    @classmethod
    def from_systemd(cls) -> Inherited:
        return cls(inherited_sockets())

    def take(self, address: Address) -> socket.socket | None:
        for sock in self._sockets:
            if serves(sock, address):
                self._sockets.remove(sock)
                return sock
        return None

    def close_unclaimed(self) -> None:
        for sock in self._sockets:
            log.warning(
                "socket %s passed by systemd is not configured; closing it", socket_name(sock)
            )
            sock.close()
        self._sockets = []


def bind_new(
    config: Config,
    existing: Iterable[ListenKey],
    open_address: Callable[[ListenKey, Address, int], Opened],
    close: Callable[[Opened], None],
) -> dict[ListenKey, Opened]:
    """``open_address(key, address, backlog)`` for each address of ``config`` not in
    ``existing``; on the first ListenError, ``close`` what was opened and re-raise."""
    have = set(existing)
    opened: dict[ListenKey, Opened] = {}
    try:
        for key, (service, address) in listen_addresses(config).items():
            if key not in have:
                opened[key] = open_address(key, address, service.settings.backlog)
    except ListenError:
        for each in opened.values():
            close(each)
        raise
    return opened


def open_admin_socket(address: Address) -> socket.socket:
    """The admin endpoint's socket: one is enough for an endpoint meant for one
    management address, even where the name stands for several."""
    first, *extra = open_listening_sockets(address, 64)
    close_sockets(extra)
    return first


# Listening sockets of one address for each worker: a list of sockets per worker.
WorkerGroups = list[list[socket.socket]]


def close_groups(groups: WorkerGroups) -> None:
    for group in groups:
        close_sockets(group)


def bind_for_workers(
    address: Address, backlog: int, count: int, *, reuse_port: bool, inherited: Inherited
) -> WorkerGroups:
    """The sockets each of ``count`` workers listens on for ``address``."""
    sock = inherited.take(address)
    if sock is not None:
        # One inherited socket, one queue, shared by every worker.
        return [[sock] for _ in range(count)]
    if not reuse_port:
        # One queue that whichever worker is free takes from: self-balancing where
        # the workers' CPUs are unequally busy, at the cost of waking them all.
        shared = open_listening_sockets(address, backlog)
        return [shared for _ in range(count)]
    first = open_listening_sockets(address, backlog, reuse_port=True)
    groups = [first]
    try:
        for _ in range(1, count):
            group: list[socket.socket] = []
            groups.append(group)
            for each in first:
                # The first socket's actual port, so "port 0" is one port for all.
                host, port = each.getsockname()[:2]
                group.extend(open_listening_sockets(Address(host, port), backlog, reuse_port=True))
    except ListenError:
        close_groups(groups)
        raise
    return groups
