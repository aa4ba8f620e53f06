"""One client connection from accept to end.

A session wraps the accepted socket (its bytes are held, not lost, while a backend is
chosen), asks the dialer for the first backend that connects in the service's order,
links the two sockets in a relay, waits for it to end, and writes one access line.
Nothing that goes wrong inside a session escapes it.

With ``accept_proxy`` the session first checks that the peer is trusted and reads its
PROXY header; from then on the header's client address is the session's client (for
the backend order, the log line and the header sent on), and the peer is shown as
``via``. With ``send_proxy`` the dialer writes the header before any client byte.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from .accesslog import AccessLog, SessionRecord, format_timestamp
from .config import (
    ACCEPT_PROXY_OFF,
    ACCEPT_PROXY_OPTIONAL,
    BackendConfig,
    ServiceConfig,
    format_hostport,
)
from .dialer import OUTCOME_OK, Attempt, Connected, Dialer, configure_socket
from .metrics import ServiceStats
from .monitor import HealthMonitor
from .policy import Candidate, PolicyName, Scheduler
from .proxy_accept import (
    END_UNTRUSTED,
    ClientGone,
    HeaderRejected,
    addresses_of,
    is_trusted,
    receive_header,
)
from .proxy_send import SessionHeaders
from .relay import END_CLIENT_CLOSED, END_SHUTDOWN, BaseRelay, Endpoint, Relay
from .resolver import Resolver
from .splice import RELAY_SPLICE, PipePool, choose_relay, take_over

END_NO_BACKEND: Final = "no_backend"
END_CLIENT_ABORTED: Final = "client_aborted"
END_ERROR: Final = "internal_error"

# Hold mode: pauses between passes over the backends, doubling up to the maximum.
HOLD_FIRST_PAUSE = 0.25
HOLD_MAX_PAUSE = 2.0
# A session line lists at most this many attempts; a long hold counts the rest.
MAX_LOGGED_ATTEMPTS = 32

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
    # Idle pipes of the splice relay, shared by every service.
    pipes: PipePool = field(default_factory=lambda: PipePool(keep=0))
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
    """What sessions of one service share: config, dialer, scheduler, health, limits, counts.

    ``plan()`` is where policy, health and the operator meet: the scheduler orders the
    backends from their tier, weight, health and live session counts; down backends come
    last (fail open); full, draining and disabled ones are left out.
    """

    def __init__(
        self,
        config: ServiceConfig,
        daemon: DaemonState,
        monitor: HealthMonitor,
        resolver: Resolver,
        stats: ServiceStats | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.settings = config.settings
        self.dialer = Dialer(config.settings, resolver)
        self.daemon = daemon
        self.access_log = daemon.access_log
        # Counters, live counts included, outlive a reload of the service.
        self.stats = stats or ServiceStats()
        self.scheduler = Scheduler(PolicyName(config.settings.policy))
        self._monitor = monitor
        self._health = monitor.register(config)
        self._backend_stats = [self.stats.backend(b.name) for b in config.backends]
        self.relay = choose_relay(config.settings.relay)
        # Failover with nothing down, full, draining or disabled has one answer, the
        # configured order: worked out once here rather than per connection. Services
        # where a backend has max_connections never take the shortcut (fullness is live).
        self._all_up_order: tuple[BackendConfig, ...] | None = None
        if self.scheduler.policy is PolicyName.FAILOVER and all(
            b.max_connections is None for b in config.backends
        ):
            everyone = [
                Candidate(index=i, tier=b.tier, weight=b.weight, name=b.name)
                for i, b in enumerate(config.backends)
            ]
            order = Scheduler(PolicyName.FAILOVER).order(everyone)
            self._all_up_order = tuple(config.backends[i] for i in order)

    def admin_state(self, backend: str) -> str:
        return self.daemon.admin_states.get((self.name, backend), ADMIN_ENABLED)

    def plan(self, client: tuple[str, int]) -> list[BackendConfig]:
        """The order in which to try the backends for this client."""
        states = self.daemon.admin_states
        shortcut = self._all_up_order
        if (
            shortcut is not None
            and not states
            and all(health is None or health.is_up for health in self._health)
        ):
            return list(shortcut)
        backends = self.config.backends
        candidates = [
            Candidate(
                index=i,
                tier=backend.tier,
                weight=backend.weight,
                up=health is None or health.is_up,
                available=(
                    backend.max_connections is None or stats.active < backend.max_connections
                )
                and (not states or (self.name, backend.name) not in states),
                active=stats.active,
                name=backend.name,
            )
            for i, (backend, health, stats) in enumerate(
                zip(backends, self._health, self._backend_stats, strict=True)
            )
        ]
        return [backends[i] for i in self.scheduler.order(candidates, client[0])]

    def backend_views(self) -> list[BackendView]:
        return [
            BackendView(
                name=backend.name,
                address=str(backend.address),
                up=health is None or health.is_up,
                admin_state=self.admin_state(backend.name),
                active=stats.active,
            )
            for backend, health, stats in zip(
                self.config.backends, self._health, self._backend_stats, strict=True
            )
        ]

    def new_relay(self, client: Endpoint, backend: Endpoint) -> BaseRelay:
        """The service's relay for two endpoints; copy where splice declines this session."""
        idle_timeout = self.settings.idle_timeout
        if self.relay == RELAY_SPLICE:
            spliced = take_over(client, backend, self.daemon.pipes, idle_timeout=idle_timeout)
            if spliced is not None:
                return spliced
        return Relay(client, backend, idle_timeout=idle_timeout)

    # --- AttemptGate: the dialer reports here ----------------------------------------

    def acquire(self, backend: BackendConfig) -> bool:
        stats = self.stats.backend(backend.name)
        if backend.max_connections is not None and stats.active >= backend.max_connections:
            return False
        stats.active += 1
        return True

    def release(self, backend: BackendConfig) -> None:
        self.stats.backend(backend.name).active -= 1

    def succeeded(self, backend: BackendConfig) -> None:
        self._monitor.passive_success(self.name, backend.name)

    def failed(self, backend: BackendConfig, reason: str) -> None:
        self._monitor.passive_failure(self.name, backend.name, reason)

    # --- admission and accounting ----------------------------------------------------

    def admit(self, client_ip: str) -> str | None:
        """Why a connection from ``client_ip`` must be closed at once, or None to serve it.

        Where clients come through a PROXY header, ``client_ip`` is the sender of the
        header (a load balancer): the access lists and the per-client limit wait for the
        header to name the real client (``readmit``).
        """
        settings = self.settings
        stats = self.stats
        if settings.max_connections is not None and stats.active >= settings.max_connections:
            return REJECT_SERVICE_LIMIT
        if settings.accept_proxy != ACCEPT_PROXY_OFF:
            return None
        if self._denied(client_ip):
            return REJECT_DENIED
        limit = settings.max_connections_per_client
        if limit is not None and stats.per_client.get(client_ip, 0) >= limit:
            return REJECT_CLIENT_LIMIT
        return None

    def readmit(self, counted_ip: str, client_ip: str) -> str | None:
        """A PROXY header named the real client: count it instead, and apply the access
        lists and the per-client limit to it. Why it must be closed, or None."""
        stats = self.stats
        if counted_ip != client_ip:
            self._uncount(counted_ip)
            stats.per_client[client_ip] = stats.per_client.get(client_ip, 0) + 1
        if self._denied(client_ip):
            return REJECT_DENIED
        limit = self.settings.max_connections_per_client
        if limit is not None and stats.per_client[client_ip] > limit:
            return REJECT_CLIENT_LIMIT
        return None

    def _denied(self, client_ip: str) -> bool:
        settings = self.settings
        if not settings.allow and not settings.deny:
            return False
        address = ipaddress.ip_address(client_ip.split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if any(address in network for network in settings.deny):
            return True
        return bool(settings.allow) and not any(address in net for net in settings.allow)

    def _uncount(self, client_ip: str) -> None:
        per_client = self.stats.per_client
        remaining = per_client.get(client_ip, 1) - 1
        if remaining:
            per_client[client_ip] = remaining
        else:
            per_client.pop(client_ip, None)

    def session_started(self, client_ip: str) -> None:
        stats = self.stats
        stats.active += 1
        stats.per_client[client_ip] = stats.per_client.get(client_ip, 0) + 1

    def session_ended(self, client_ip: str, record: SessionRecord) -> None:
        stats = self.stats
        stats.active -= 1
        self._uncount(client_ip)
        stats.ends[record.end] += 1
        stats.bytes_from_client += record.from_client
        stats.bytes_from_backend += record.from_backend
        failed = False
        for attempt in record.attempts:
            stats.backend(attempt.backend).attempts[attempt.outcome] += 1
            failed = failed or attempt.outcome != OUTCOME_OK
        if record.backend is not None:
            stats.backend(record.backend).sessions += 1
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
        "_began",
        "_client",
        "_client_gone",
        "_connected",
        "_header_bytes",
        "_holding",
        "_on_done",
        "_relay",
        "_sock",
        "_task",
        "client_address",
        "destination",
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
        # Who the client is and what it connected to: the peer and our socket's own
        # address, unless a trusted PROXY header says otherwise.
        self.client_address = peer
        self.destination: tuple[str, int] | None = None
        self._header_bytes = 0
        self._sock = sock
        self._client: Endpoint | None = None
        self._relay: BaseRelay | None = None
        self._connected: BackendConfig | None = None
        self._holding = False
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
        self._began = time.monotonic()
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
        record = self.record
        try:
            end = await self._serve()
        except asyncio.CancelledError:
            end = END_CLIENT_ABORTED if self._client_gone else END_SHUTDOWN
            self._close_all()
        except Exception:
            log.exception("session %s failed", record.session)
            end = END_ERROR
            self._close_all()
        if end is None:
            # The relay runs on its own, driven by loop callbacks: the session needs no
            # task while it does, only to be told when it ends (no shield, no wake-up).
            assert self._relay is not None
            self._relay.done.add_done_callback(self._relay_done)
            return
        self._finish(end)

    def _relay_done(self, done: asyncio.Future[str]) -> None:
        self._finish(done.result())

    def _finish(self, end: str) -> None:
        record = self.record
        record.end = end
        if self._connected is not None:
            self.service.release(self._connected)
        record.duration = time.monotonic() - self._began
        if self._client is not None:
            # What the client sent for the backend: its PROXY header is not relayed.
            record.from_client = self._client.received - self._header_bytes
        if self._relay is not None:
            record.from_backend = self._relay.backend.received
        # Free the session's place before saying it ended: whoever reads the line may
        # rely on the place being free.
        self.service.session_ended(self.client_address[0], record)
        self._on_done(self)
        self.service.access_log.emit(record)

    async def _serve(self) -> str | None:
        """How the session ended, or None once a relay runs (it says so when it ends)."""
        loop = asyncio.get_running_loop()
        settings = self.service.settings
        accept_proxy = settings.accept_proxy != ACCEPT_PROXY_OFF
        if accept_proxy and not is_trusted(self.peer[0], settings.trusted_sources):
            # Decided on the raw peer before reading a byte: its claims are never heard.
            self._sock.close()
            return self._reject(END_UNTRUSTED, "not in trusted_sources")
        configure_socket(self._sock, self.service.dialer.socket_options)
        transport, client = await loop.connect_accepted_socket(
            lambda: Endpoint("client", settings.buffer_size), sock=self._sock
        )
        self._client = client
        if client.lost:
            return END_CLIENT_ABORTED
        sockname = transport.get_extra_info("sockname")
        if sockname:
            self.destination = (str(sockname[0]), int(sockname[1]))
        if accept_proxy:
            refused = await self._receive_proxy_header(client)
            if refused is not None:
                return refused
        client.on_change = self._client_changed
        connected = await self._dial()
        if connected is None:
            # Every backend failed: close without sending the client a byte.
            if client.transport is not None:
                client.transport.close()
            return END_NO_BACKEND
        self._connected = connected.backend
        record = self.record
        record.backend = connected.backend.name
        record.backend_address = connected.address
        record.local_address = connected.local_address
        relay = self.service.new_relay(client, connected.endpoint)
        record.relay = relay.kind
        self._relay = relay
        relay.start()
        return None

    async def _receive_proxy_header(self, client: Endpoint) -> str | None:
        """Read the client's PROXY header and adopt its addresses; the end word if refused."""
        settings = self.service.settings
        try:
            header, length = await receive_header(
                client,
                timeout=settings.proxy_header_timeout,
                optional=settings.accept_proxy == ACCEPT_PROXY_OPTIONAL,
            )
        except HeaderRejected as rejected:
            client.abort()
            return self._reject(rejected.end, rejected.reason)
        except ClientGone as gone:
            # Half-closed sockets stay open (for the relay's sake): close this one here.
            client.abort()
            return END_CLIENT_ABORTED if gone.reset else END_CLIENT_CLOSED
        self._header_bytes = length
        addresses = addresses_of(header) if header is not None else None
        if addresses is not None:
            self.client_address, self.destination = addresses
            self.record.client = format_hostport(*self.client_address)
            self.record.via = format_hostport(*self.peer)
        cause = self.service.readmit(self.peer[0], self.client_address[0])
        if cause is not None:
            client.abort()
            return self._reject(cause, "refused for the client the header names")
        return None

    def _reject(self, end: str, reason: str) -> str:
        counts = self.service.stats.rejected
        counts[end] += 1
        log.warning(
            "session %s: %s from %s on %s (service %s): %s; %d so far",
            self.record.session,
            end,
            format_hostport(*self.peer),
            self.listener,
            self.service.name,
            reason,
            counts[end],
        )
        return end

    async def _dial(self) -> Connected | None:
        """One pass over the plan; in hold mode, passes until one connects or time is up."""
        service = self.service
        record = self.record
        started = time.monotonic()
        hold = service.settings.hold_timeout
        pause = HOLD_FIRST_PAUSE
        attempts: list[Attempt] = record.attempts
        headers = None
        if self.destination is not None:
            headers = SessionHeaders(
                self.client_address, self.destination, record.session.encode("ascii")
            )
        while True:
            connected = await service.dialer.connect(
                service.plan(self.client_address), attempts, service, headers=headers
            )
            if len(attempts) > MAX_LOGGED_ATTEMPTS:
                # Keep the first pass and the latest attempts: the story's start and end.
                record.attempts_omitted += len(attempts) - MAX_LOGGED_ATTEMPTS
                del attempts[MAX_LOGGED_ATTEMPTS // 2 : len(attempts) - MAX_LOGGED_ATTEMPTS // 2]
            waited = time.monotonic() - started
            if connected is not None:
                record.connect_time = waited
                if record.held is not None:
                    record.held = waited
                return connected
            if hold is None or waited >= hold:
                if hold is not None:
                    record.held = waited
                return None
            # Held: the client waits, its bytes kept; its leaving cancels this task.
            record.held = waited
            self._holding = True
            self._client_changed()
            await asyncio.sleep(min(pause, hold - waited))
            pause = min(pause * 2, HOLD_MAX_PAUSE)

    def _client_changed(self) -> None:
        client = self._client
        if client is None or self._client_gone:
            return
        # While held, an EOF counts as leaving too (as HAProxy's abortonclose): a client
        # that has heard nothing from us and stopped sending is almost always gone, and
        # a FIN cannot be told from a half-close without writing to it.
        if client.lost or (client.eof and self._holding):
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
