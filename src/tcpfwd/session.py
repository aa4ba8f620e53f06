"""One client connection from accept to end.

A session wraps the accepted socket (its bytes are held, not lost, while a backend is
chosen), asks the dialer for the first backend that connects in the service's order,
links the two sockets in a relay, waits for it to end, and writes one access line.
Nothing that goes wrong inside a session escapes it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from .accesslog import AccessLog, SessionRecord, format_timestamp
from .config import BackendConfig, ServiceConfig, format_hostport
from .dialer import OUTCOME_OK, Attempt, Connected, Dialer, configure_socket
from .metrics import ServiceStats
from .relay import END_SHUTDOWN, Endpoint, Relay

END_NO_BACKEND: Final = "no_backend"
END_CLIENT_ABORTED: Final = "client_aborted"
END_ERROR: Final = "internal_error"

log = logging.getLogger("tcpfwd")

# Session ids: unique per process start (random prefix) and ordered within it.
_ID_PREFIX = os.urandom(3).hex()
_next_number = itertools.count(1)


def new_session_id() -> str:
    return f"{_ID_PREFIX}-{next(_next_number):x}"


# Why a connection was closed before it became a session; counted per service.
REJECT_DENIED = "denied"
REJECT_SERVICE_LIMIT = "service_limit"
REJECT_CLIENT_LIMIT = "client_limit"
REJECT_GLOBAL_LIMIT = "global_limit"


ADMIN_ENABLED: Final = "enabled"
ADMIN_DRAINING: Final = "draining"
ADMIN_DISABLED: Final = "disabled"
RECENT_FAILOVERS = 50


@dataclass(slots=True)
class DaemonState:
    """What every service shares with the daemon, across reloads."""

    access_log: AccessLog
    # Administrative state by (service, backend); absent means enabled.
    admin_states: dict[tuple[str, str], str] = field(default_factory=dict)
    recent_failovers: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=RECENT_FAILOVERS)
    )


@dataclass(slots=True)
class BackendView:
    """A backend as the status page and metrics see it right now."""

    name: str
    address: str
    up: bool
    admin_state: str
    active: int


class ServiceRuntime:
    """What sessions of one service share: its config, dialer, limits and counters."""

    def __init__(
        self, config: ServiceConfig, daemon: DaemonState, stats: ServiceStats | None = None
    ) -> None:
        self.config = config
        self.name = config.name
        self.settings = config.settings
        self.dialer = Dialer(config.settings)
        self.daemon = daemon
        self.access_log = daemon.access_log
        self.stats = stats or ServiceStats()

    def admin_state(self, backend: str) -> str:
        return self.daemon.admin_states.get((self.name, backend), ADMIN_ENABLED)

    def plan(self, client: tuple[str, int]) -> Sequence[BackendConfig]:
        """The order in which to try the backends for this client."""
        states = self.daemon.admin_states
        if not states:
            return self.config.backends
        return [b for b in self.config.backends if (self.name, b.name) not in states]

    def backend_views(self) -> list[BackendView]:
        return [
            BackendView(
                name=backend.name,
                address=str(backend.address),
                up=True,
                admin_state=self.admin_state(backend.name),
                active=self.stats.backend(backend.name).active,
            )
            for backend in self.config.backends
        ]

    def admit(self, client_ip: str) -> str | None:
        """Why a connection from ``client_ip`` must be closed at once, or None to serve it."""
        settings = self.settings
        if settings.allow or settings.deny:
            address = ipaddress.ip_address(client_ip.split("%", 1)[0])
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            if any(address in network for network in settings.deny):
                return REJECT_DENIED
            if settings.allow and not any(address in network for network in settings.allow):
                return REJECT_DENIED
        stats = self.stats
        if settings.max_connections is not None and stats.active >= settings.max_connections:
            return REJECT_SERVICE_LIMIT
        limit = settings.max_connections_per_client
        if limit is not None and stats.per_client.get(client_ip, 0) >= limit:
            return REJECT_CLIENT_LIMIT
        return None

    def session_started(self, client_ip: str) -> None:
        stats = self.stats
        stats.active += 1
        stats.per_client[client_ip] = stats.per_client.get(client_ip, 0) + 1

    def session_ended(self, client_ip: str, record: SessionRecord) -> None:
        stats = self.stats
        stats.active -= 1
        remaining = stats.per_client.get(client_ip, 1) - 1
        if remaining:
            stats.per_client[client_ip] = remaining
        else:
            stats.per_client.pop(client_ip, None)
        stats.ends[record.end] += 1
        stats.bytes_from_client += record.from_client
        stats.bytes_from_backend += record.from_backend
        failed = False
        for attempt in record.attempts:
            stats.backend(attempt.backend).attempts[attempt.outcome] += 1
            failed = failed or attempt.outcome != OUTCOME_OK
        if record.backend is not None:
            backend = stats.backend(record.backend)
            backend.sessions += 1
            backend.active -= 1
        if record.connect_time is not None:
            stats.connect_seconds.observe(record.connect_time)
        if failed:
            self.daemon.recent_failovers.append(
                {
                    "time": format_timestamp(record.started),
                    "session": record.session,
                    "service": self.name,
                    "client": record.client,
                    "failed": [
                        {"backend": a.backend, "address": a.address, "outcome": a.outcome}
                        for a in record.attempts
                        if a.outcome != OUTCOME_OK
                    ],
                    "backend": record.backend,
                }
            )


class Session:
    __slots__ = (
        "_client",
        "_client_gone",
        "_on_done",
        "_relay",
        "_sock",
        "_task",
        "listener",
        "peer",
        "record",
        "service",
    )

    def __init__(
        self,
        service: ServiceRuntime,
        listener: str,
        sock: socket.socket,
        peer: tuple[str, int],
    ) -> None:
        self.service = service
        self.listener = listener
        self.peer = peer
        self._sock = sock
        self._client: Endpoint | None = None
        self._relay: Relay | None = None
        self._task: asyncio.Task[None] | None = None
        self._client_gone = False
        self.record = SessionRecord(
            session=new_session_id(),
            started=time.time(),
            client=format_hostport(peer[0], peer[1]),
            listener=listener,
            service=service.name,
        )

    def start(self, on_done: Callable[[Session], None]) -> None:
        self.service.session_started(self.peer[0])
        self._on_done = on_done
        self._task = asyncio.get_running_loop().create_task(self._run())

    def abort(self) -> None:
        """End the session now (the grace period after a stop request is over)."""
        if self._relay is not None:
            self._relay.shutdown(END_SHUTDOWN)
        elif self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        began = time.monotonic()
        record = self.record
        try:
            record.end = await self._serve()
        except asyncio.CancelledError:
            record.end = END_CLIENT_ABORTED if self._client_gone else END_SHUTDOWN
            self._close_all()
        except Exception:
            log.exception("session %s failed", record.session)
            record.end = END_ERROR
            self._close_all()
        record.duration = time.monotonic() - began
        if self._client is not None:
            record.from_client = self._client.received
        if self._relay is not None:
            record.from_backend = self._relay.backend.received
        # Free the session's place before saying it ended: whoever reads the line may
        # rely on the place being free.
        self.service.session_ended(self.peer[0], record)
        self._on_done(self)
        self.service.access_log.emit(record)

    async def _serve(self) -> str:
        loop = asyncio.get_running_loop()
        settings = self.service.settings
        configure_socket(self._sock, settings)
        _transport, client = await loop.connect_accepted_socket(
            lambda: Endpoint("client", settings.buffer_size), sock=self._sock
        )
        self._client = client
        if client.lost:
            return END_CLIENT_ABORTED
        client.on_change = self._client_changed
        connected = await self._dial()
        if connected is None:
            # Every backend failed: close without sending the client a byte.
            if client.transport is not None:
                client.transport.close()
            return END_NO_BACKEND
        record = self.record
        record.backend = connected.backend.name
        self.service.stats.backend(record.backend).active += 1
        record.backend_address = connected.address
        record.local_address = connected.local_address
        relay = Relay(client, connected.endpoint, idle_timeout=settings.idle_timeout)
        self._relay = relay
        relay.start()
        return await asyncio.shield(relay.done)

    async def _dial(self) -> Connected | None:
        attempts: list[Attempt] = self.record.attempts
        started = time.monotonic()
        connected = await self.service.dialer.connect(self.service.plan(self.peer), attempts)
        if connected is not None:
            self.record.connect_time = time.monotonic() - started
        return connected

    def _client_changed(self) -> None:
        client = self._client
        if client is not None and client.lost and not self._client_gone:
            self._client_gone = True
            if self._task is not None:
                self._task.cancel()

    def _close_all(self) -> None:
        if self._relay is not None:
            self._relay.shutdown(END_SHUTDOWN)
        elif self._client is not None:
            self._client.abort()
        else:
            self._sock.close()
