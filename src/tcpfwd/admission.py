"""Whether a new connection may become a session of a service, and who it counts as.

In one place and in this order: a connection from one of our own outgoing connections
(a loop); a peer that is not trusted to send a PROXY header where one is expected; the
service's and the daemon's limits; the access lists and the per-client limit (on the
real client: where a PROXY header names it, ``readmit`` applies them again once it is
known). A connection turned away is counted by cause and logged, throttled.
"""

from __future__ import annotations

import ipaddress
import time
from typing import TYPE_CHECKING

from .config import ServiceSettings, format_hostport
from .metrics import ServiceStats
from .proxy_accept import is_trusted
from .vocabulary import AcceptProxy, HostPort, Reject

if TYPE_CHECKING:
    from .daemonstate import DaemonState
    from .reactor import RawSocket


class Admission:
    """The admission and per-client accounting of a `~.service.ServiceRuntime`."""

    name: str
    settings: ServiceSettings
    daemon: DaemonState
    stats: ServiceStats
    per_client_limit: int | None
    # Nothing to judge but the daemon's own limits (the usual case).
    open_door: bool
    # Access lists or a per-client limit apply to the peer itself (no PROXY header).
    checks_addresses: bool

    def admit(
        self, peer: HostPort, sock: RawSocket, listening: HostPort | None
    ) -> tuple[Reject, str] | None:
        """Why a connection from ``peer`` must be turned away (cause, reason), or None.

        Where clients come through a PROXY header, the peer is the header's sender (a
        load balancer): the access lists and the per-client limit wait for the header
        to name the real client (``readmit``).
        """
        daemon = self.daemon
        if peer in daemon.outgoing.by_local and _is_own(daemon, peer, sock, listening):
            return Reject.LOOP, (
                "it is tcpfwd's own connection to a backend: a backend of this daemon "
                "leads back to one of its listeners"
            )
        limit = daemon.max_connections
        if self.open_door:
            if limit is not None and len(daemon.sessions) >= limit:
                return Reject.GLOBAL_LIMIT, f"global max_connections = {limit}"
            return None
        settings = self.settings
        if settings.accept_proxy != AcceptProxy.OFF and not is_trusted(
            peer[0], settings.trusted_sources
        ):
            # Decided on the raw peer before reading a byte: its claims are never heard.
            return Reject.UNTRUSTED_SOURCE, "not in trusted_sources"
        stats = self.stats
        if settings.max_connections is not None and stats.active >= settings.max_connections:
            return Reject.SERVICE_LIMIT, f"max_connections = {settings.max_connections}"
        if limit is not None and len(daemon.sessions) >= limit:
            return Reject.GLOBAL_LIMIT, f"global max_connections = {limit}"
        if self.checks_addresses:
            return self._judge(peer[0], 0)
        return None

    def readmit(
        self, counted: str | None, client_ip: str
    ) -> tuple[str | None, tuple[Reject, str] | None]:
        """A PROXY header named the real client: the address now counted for it, and why
        it must be turned away (cause, reason), or None."""
        if counted is not None:
            self._uncount(counted)
            counted = None
        if self.per_client_limit is not None:
            self._count(client_ip)
            counted = client_ip
        return counted, self._judge(client_ip, 1)

    def _judge(self, client_ip: str, already: int) -> tuple[Reject, str] | None:
        """Access lists and the per-client limit; ``already``: this client is counted."""
        settings = self.settings
        if settings.allow or settings.deny:
            address = ipaddress.ip_address(client_ip.split("%", 1)[0])
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            if any(address in network for network in settings.deny):
                return Reject.DENIED, "in deny"
            if settings.allow and not any(address in net for net in settings.allow):
                return Reject.DENIED, "not in allow"
        limit = self.per_client_limit
        if limit is not None and self.stats.per_client.get(client_ip, 0) - already >= limit:
            return Reject.CLIENT_LIMIT, f"max_connections_per_client = {limit}"
        return None

    def turned_away(self, cause: Reject, peer: HostPort, reason: str) -> None:
        self.stats.rejected[cause] += 1
        self.daemon.rejects.note(self.name, cause, format_hostport(peer[0], peer[1]), reason)

    # --- accounting ------------------------------------------------------------------

    def _count(self, client_ip: str) -> None:
        per_client = self.stats.per_client
        per_client[client_ip] = per_client.get(client_ip, 0) + 1

    def _uncount(self, client_ip: str) -> None:
        per_client = self.stats.per_client
        remaining = per_client.get(client_ip, 1) - 1
        if remaining:
            per_client[client_ip] = remaining
        else:
            per_client.pop(client_ip, None)

    def session_started(self, client_ip: str) -> str | None:
        """Count a new session's client for the per-client limit (the session itself is
        counted in ``stats.active``); the address counted, if any."""
        if self.per_client_limit is not None:
            self._count(client_ip)
            return client_ip
        return None


def _is_own(
    daemon: DaemonState, peer: HostPort, sock: RawSocket, listening: HostPort | None
) -> bool:
    """Whether a connection from ``peer`` (the local address of one of ours) is one of
    ours come back. Rarely asked: only when a peer shares a local address with one of
    our own connections."""
    arrived_on = listening
    if arrived_on is None:
        try:
            name = sock.getsockname()
        except OSError:
            return False
        arrived_on = (name[0], name[1])
    return daemon.outgoing.is_loop(peer, arrived_on, time.monotonic())
