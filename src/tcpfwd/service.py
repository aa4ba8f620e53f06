"""One service at run time, and what every service of the daemon shares.

A `ServiceRuntime` is where policy, health and the operator meet for one service:
``plan()`` orders its backends (`Target`: a backend with everything worked out once),
``admit()`` decides whether a new connection may become a session, and the session's
outcome is counted here when it ends. A reload builds new runtimes for changed
services; sessions in flight keep the one they started with, and the counters
(`ServiceStats`) carry over.

`DaemonState` is what all services share: the data plane's reactor and pipes, the access
log, the operator's backend states, the live sessions and how many may be live at once,
the addresses of tcpfwd's own outgoing connections (a connection that arrives from one
of them is tcpfwd talking to itself), and the one throttled log of turned-away clients.

Admission, in one place and in this order: a connection from one of our own outgoing
connections (a loop); a peer that is not trusted to send a PROXY header where one is
expected; the service's and the daemon's limits; the access lists and the per-client
limit (on the real client: where a PROXY header names it, ``readmit`` applies them
again once it is known). Places are shared fairly: each service keeps a reserve of the
daemon's session capacity that the others cannot take (``reserved_connections``), so a
service flooded by clients, or looping through another box, cannot starve the rest;
a service that has used up what it may take stops accepting until places free up, and
its new clients wait in its listen queue, as every client does at full capacity.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from .accesslog import AccessLog, AttemptResult, SessionRecord, format_timestamp
from .config import BackendConfig, ServiceConfig, format_hostport
from .dialer import HEDGE_FACTOR, HEDGE_FLOOR, SocketOptions, keepalive_options
from .health import BackendHealth
from .metrics import BackendStats, ServiceStats, outcome_label
from .monitor import HealthMonitor
from .policy import Candidate, Scheduler
from .proxy_accept import is_trusted
from .relay import CHUNK
from .resolver import Resolver, is_ip_literal
from .sockdiag import socket_exists
from .splice import PipePool, choose_relay
from .vocabulary import AcceptProxy, AdminState, Outcome, Policy, Reject, RelayMode

if TYPE_CHECKING:
    from .reactor import RawSocket, Reactor

log = logging.getLogger("tcpfwd")

# Why a connection was closed before it became a session; counted per service.
# The peer is one of tcpfwd's own connections to a backend: the backend is tcpfwd.

RECENT_FAILOVERS: Final = 50

# A turned-away connection is logged at most this often per service and cause.
REJECT_LOG_INTERVAL: Final = 10.0

# TCP keepalive towards a backend is switched on once a session has lived this long
# (one to two of these): it only matters after its idle time (a minute by default),
# and the many short sessions are spared four system calls each.
KEEPALIVE_AFTER: Final = 1.0

# "auto": copy until a direction has moved this much, then splice it (a short session
# does not pay for a pipe); "splice": splice from the first byte.
SPLICE_AFTER_AUTO: Final = 256 << 10
NEVER: Final = 1 << 62


@dataclass(slots=True)
class BackendView:
    """A backend as the status page and metrics see it right now."""

    name: str
    address: str
    up: bool
    admin_state: str
    active: int
    # An attempt to it is overdue: new sessions try it after the others.
    suspect: bool = False


class Target:
    """One backend of one service, as its sessions use it."""

    __slots__ = (
        "config",
        "health",
        "host",
        "literal",
        "name",
        "overdue",
        "port",
        "send_proxy",
        "shown",
        "slowest",
        "stats",
    )

    def __init__(
        self, config: BackendConfig, health: BackendHealth | None, stats: BackendStats
    ) -> None:
        self.config = config
        self.name = config.name
        self.host = config.address.host
        self.port = config.address.port
        # How the backend appears in the log: as configured.
        self.shown = str(config.address)
        self.health = health
        self.stats = stats
        self.send_proxy = config.send_proxy
        # The slowest answer of late (a decaying maximum): what its hedge delay follows.
        self.slowest = 0.0
        # Attempts to it past their hedge delay without an answer: while there are any,
        # it is suspect, and new sessions try it after the others.
        self.overdue = 0
        # An IP literal needs no resolver: its one address, worked out once (written as
        # the kernel writes it, so that it compares equal to a socket's own address).
        self.literal: tuple[tuple[str, int], ...] | None = (
            ((str(ipaddress.ip_address(self.host)), self.port),)
            if is_ip_literal(self.host)
            else None
        )

    def __repr__(self) -> str:
        return f"Target({self.name})"


class RejectLog:
    """Turned-away connections, logged at most every ``REJECT_LOG_INTERVAL`` seconds per
    service and cause, with the count since the last line: a flood from one source must
    not flood the log."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[tuple[str, Reject], list[Any]] = {}

    def note(self, service: str, cause: Reject, peer: str, reason: str) -> None:
        entry = self._entries.get((service, cause))
        if entry is None:
            entry = self._entries[(service, cause)] = [0, -REJECT_LOG_INTERVAL]
        entry[0] += 1
        now = time.monotonic()
        if now - entry[1] >= REJECT_LOG_INTERVAL:
            log.warning(
                "service %s turned away %d connection(s) (%s), the latest from %s: %s",
                service,
                entry[0],
                cause,
                peer,
                reason,
            )
            entry[0] = 0
            entry[1] = now


Address = tuple[str, int]


class Outgoing(Protocol):
    """One of tcpfwd's own connections to a backend: an attempt, then its session."""

    @property
    def remote(self) -> Address: ...

    def is_new(self, now: float) -> bool:
        """Still connecting, or just connected and nothing heard back yet."""


# A connection of ours counts as new for this long after it connected, at most.
NEW_CONNECTION: Final = 1.0


class OwnConnections:
    """tcpfwd's own connections to backends, by their local address.

    A connection accepted from one of these local addresses may be tcpfwd talking to
    itself: certainly so when it arrived on the very address that connection of ours
    was made to (a backend that is one of our listeners); and so when that connection
    of ours is new and no socket on this host has the two addresses the arrival shows
    (a box in the path, NAT or port forward, sent ours back: the kernel knows our
    socket by the address it connected to). A local address alone would not say so:
    the kernel gives one local port to several connections to different destinations,
    and a client on this host may well come from a port that a connection of ours to
    another host also uses; its own socket then has those two addresses.
    """

    __slots__ = ("by_local", "shared")

    def __init__(self) -> None:
        # One connection per local address (of several, any).
        self.by_local: dict[Address, Outgoing] = {}
        # Local addresses that several of our connections share, with all of them.
        self.shared: dict[Address, list[Outgoing]] = {}

    def add(self, local: Address, owner: Outgoing) -> None:
        first = self.by_local.setdefault(local, owner)
        if first is not owner:
            self.shared.setdefault(local, [first]).append(owner)

    def hand_over(self, local: Address, old: Outgoing, new: Outgoing) -> None:
        """The connection from ``local`` is now ``new``'s (an attempt became a session)."""
        shared = self.shared.get(local)
        if shared is not None:
            shared[shared.index(old)] = new
            self.by_local[local] = shared[0]
        elif self.by_local.get(local) is old:
            self.by_local[local] = new

    def discard(self, local: Address, owner: Outgoing) -> None:
        shared = self.shared.get(local)
        if shared is not None:
            shared.remove(owner)
            self.by_local[local] = shared[0]
            if len(shared) == 1:
                del self.shared[local]
            return
        if self.by_local.get(local) is owner:
            del self.by_local[local]

    def is_loop(self, peer: Address, arrived_on: Address, now: float) -> bool:
        """Whether a connection from ``peer`` that arrived on ``arrived_on`` is ours."""
        shared = self.shared.get(peer)
        owners = shared if shared is not None else [self.by_local[peer]]
        if any(o.remote == arrived_on for o in owners):
            return True
        if not any(o.is_new(now) for o in owners):
            return False
        # A client on this host that happens to use the same local port has a socket
        # of its own with these two addresses; ours, sent back by a box in the path,
        # has the address it connected to before translation: no socket has these.
        return socket_exists(peer, arrived_on) is False

    def __len__(self) -> int:
        return len(self.by_local) + sum(len(s) - 1 for s in self.shared.values())


class DaemonState:
    """What every service shares with the daemon, across reloads."""

    def __init__(self, access_log: AccessLog, pipes: PipePool | None = None) -> None:
        self.access_log = access_log
        # Idle pipes of the splice relay, shared by every service.
        self.pipes = pipes if pipes is not None else PipePool(keep=0)
        # The data plane's epoll and timers; set once the event loop runs.
        self.reactor: Reactor | None = None
        # Administrative state by (service, backend); absent means enabled.
        self.admin_states: dict[tuple[str, str], AdminState] = {}
        self.recent_failovers: deque[dict[str, Any]] = deque(maxlen=RECENT_FAILOVERS)
        # Live sessions (of every service, old runtimes included).
        self.sessions: set[Any] = set()
        # Sessions the descriptors allow; the global max_connections turns away beyond.
        self.capacity = 1 << 30
        self.max_connections: int | None = None
        # Every connection we have open to a backend (or are opening).
        self.outgoing = OwnConnections()
        self.rejects = RejectLog()
        # The current services, for their fair shares of the capacity.
        self.services: Sequence[ServiceRuntime] = ()
        # Told when a service may accept again, or must stop (True: hold); None: all.
        self.on_hold: Callable[[ServiceRuntime | None, bool], None] = _no_hold
        # Told when the last live session has ended.
        self.on_idle: Callable[[], None] | None = None
        self._all_held = False
        self._held: set[ServiceRuntime] = set()
        # Sessions joined in this keepalive period and in the one before, and whether
        # the next period is timed.
        self._young: list[Any] = []
        self._older: list[Any] = []
        self._growing = False

    def grow_up(self, session: Any) -> None:
        """Tell ``session`` once it has lived for ``KEEPALIVE_AFTER`` (up to twice that):
        one timer for all of them, instead of one per session."""
        self._young.append(session)
        if not self._growing and self.reactor is not None:
            self._growing = True
            self.reactor.loop.call_later(KEEPALIVE_AFTER, self._grown)

    def _grown(self) -> None:
        older, self._older, self._young = self._older, self._young, []
        for session in older:
            session.grown_up()
        if self._older and self.reactor is not None:
            self.reactor.loop.call_later(KEEPALIVE_AFTER, self._grown)
        else:
            self._growing = False

    # --- places ----------------------------------------------------------------------

    def set_services(self, services: Sequence[ServiceRuntime]) -> None:
        """The current services: their reserves are worked out from the capacity."""
        self.services = tuple(services)
        count = len(self.services)
        for service in self.services:
            wanted = service.settings.reserved_connections
            if wanted is None:
                # Half of the places are split evenly; the other half is first come.
                service.reserve = self.capacity // (2 * count) if count > 1 else 0
            else:
                service.reserve = wanted
        self.recheck()

    def allowance(self, service: ServiceRuntime) -> int:
        """How many sessions ``service`` may have now: the capacity less what the other
        services have reserved and not used."""
        unused = 0
        for other in self.services:
            if other is not service and other.reserve:
                unused += max(0, other.reserve - other.stats.active)
        return self.capacity - unused

    def session_started(self, session: Any, service: ServiceRuntime) -> None:
        sessions = self.sessions
        sessions.add(session)
        if len(sessions) >= self.capacity:
            if not self._all_held:
                self._all_held = True
                self.on_hold(None, True)
        elif (
            len(self.services) > 1
            and service not in self._held
            and service.stats.active >= self.allowance(service)
        ):
            self._held.add(service)
            self.on_hold(service, True)

    def session_ended(self, session: Any) -> None:
        sessions = self.sessions
        sessions.discard(session)
        if self._all_held or self._held:
            self.recheck()
        if not sessions and self.on_idle is not None:
            self.on_idle()

    def recheck(self) -> None:
        """Let services that were held accept again where places have freed up."""
        if self._all_held and len(self.sessions) < self.capacity:
            self._all_held = False
            self.on_hold(None, False)
        for service in list(self._held):
            if service not in self.services or service.stats.active < self.allowance(service):
                self._held.discard(service)
                self.on_hold(service, False)

    def is_held(self, service: ServiceRuntime) -> bool:
        return self._all_held or service in self._held


def _no_hold(service: ServiceRuntime | None, hold: bool) -> None:
    pass


class ServiceRuntime:
    """What the sessions of one service share: config, targets, scheduler, health,
    limits, counters."""

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
        settings = self.settings = config.settings
        self.daemon = daemon
        self.resolver = resolver
        self.access_log = daemon.access_log
        # Counters, live counts included, outlive a reload of the service.
        self.stats = stats or ServiceStats()
        self.scheduler = Scheduler(settings.policy)
        self._monitor = monitor
        health = monitor.register(config)
        self.targets = tuple(
            Target(backend, entry, self.stats.backend(backend.name))
            for backend, entry in zip(config.backends, health, strict=True)
        )
        self._by_name = {target.name: target for target in self.targets}
        self.relay = choose_relay(settings.relay)
        # Where splicing starts, in bytes moved by one direction.
        if self.relay == RelayMode.COPY:
            self.splice_after = NEVER
        elif settings.relay == RelayMode.SPLICE:
            self.splice_after = 0
        else:
            self.splice_after = SPLICE_AFTER_AUTO
        self.needs_destination = any(t.send_proxy is not None for t in self.targets)
        # What the dialer and the relay need of the settings, worked out once.
        self.chunk = min(CHUNK, settings.buffer_size)
        self.source_address = (
            (settings.source_address, 0) if settings.source_address is not None else None
        )
        # Set on each backend socket before it connects: Nagle off from the first byte.
        self.nodelay = settings.nodelay
        self.backend_options: SocketOptions = (
            ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),) if settings.nodelay else ()
        )
        self.keepalive_options = keepalive_options(
            settings.keepalive,
            settings.keepalive_idle,
            settings.keepalive_interval,
            settings.keepalive_count,
        )
        # Accepted sockets inherit these from their listening socket (Linux and the BSDs
        # copy the options of the listener into each connection it accepts).
        self.listen_options: SocketOptions = self.backend_options + self.keepalive_options
        greeting = settings.greeting
        self.greeting_pattern = greeting.pattern if greeting else None
        self.per_client_limit = settings.max_connections_per_client
        self.checks_addresses = settings.accept_proxy == AcceptProxy.OFF and bool(
            settings.allow or settings.deny or self.per_client_limit is not None
        )
        # Hedged attempts (see dialer.Dial): whether, when, and how many run now.
        self.hedges = settings.hedge
        self._hedge_delay = settings.hedge_delay
        self._hedge_cap = settings.connect_timeout / 2
        self.hedging = 0
        # Nothing to judge but the daemon's own limits (the usual case).
        self.open_door = (
            settings.accept_proxy == AcceptProxy.OFF
            and settings.max_connections is None
            and not self.checks_addresses
        )
        self.reserve = 0
        # Failover with nothing down, full, draining or disabled has one answer, the
        # configured order: worked out once here rather than per connection. Services
        # where a backend has max_connections never take the shortcut (fullness is live).
        self._all_up_order: tuple[Target, ...] | None = None
        if self.scheduler.policy is Policy.FAILOVER and all(
            b.max_connections is None for b in config.backends
        ):
            order = Scheduler(Policy.FAILOVER).order(self._candidates_all_up())
            self._all_up_order = tuple(self.targets[i] for i in order)
        # Sessions in relay, for the idle sweep (only services with an idle timeout).
        self.relaying: set[Any] = set()
        self._sweeping = False

    def _candidates_all_up(self) -> list[Candidate]:
        return [
            Candidate(index=i, tier=b.tier, weight=b.weight, name=b.name)
            for i, b in enumerate(self.config.backends)
        ]

    def hedge_delay(self, target: Target) -> float:
        """How long an attempt to ``target`` may go unanswered before a hedge starts:
        as configured, or a multiple of its slowest answers of late, with a floor (and
        no more than half the connect timeout, or the hedge would come too late)."""
        fixed = self._hedge_delay
        if fixed is not None:
            return fixed
        return min(max(HEDGE_FLOOR, HEDGE_FACTOR * target.slowest), self._hedge_cap)

    def suspect(self, target: Target) -> bool:
        """An attempt to it is overdue (only where its health is kept at all)."""
        return target.overdue > 0 and target.health is not None and self.hedges

    def admin_state(self, backend: str) -> AdminState:
        return self.daemon.admin_states.get((self.name, backend), AdminState.ENABLED)

    def target(self, name: str) -> Target | None:
        return self._by_name.get(name)

    def plan(self, client_ip: str) -> Sequence[Target]:
        """The order in which to try the backends for this client."""
        states = self.daemon.admin_states
        shortcut = self._all_up_order
        if shortcut is not None and not states:
            for target in shortcut:
                health = target.health
                if health is not None and (not health.up or target.overdue):
                    break
            else:
                return shortcut
        targets = self.targets
        candidates = []
        for i, target in enumerate(targets):
            backend = target.config
            health = target.health
            active = target.stats.active
            candidates.append(
                Candidate(
                    index=i,
                    tier=backend.tier,
                    weight=backend.weight,
                    # Suspect (an attempt overdue) counts as down: tried after the others.
                    up=health is None or (health.up and not (target.overdue and self.hedges)),
                    available=(backend.max_connections is None or active < backend.max_connections)
                    and (not states or (self.name, target.name) not in states),
                    active=active,
                    name=target.name,
                )
            )
        return [targets[i] for i in self.scheduler.order(candidates, client_ip)]

    def backend_views(self) -> list[BackendView]:
        return [
            BackendView(
                name=target.name,
                address=target.shown,
                up=target.health is None or target.health.is_up,
                admin_state=self.admin_state(target.name),
                active=target.stats.active,
                suspect=self.suspect(target),
            )
            for target in self.targets
        ]

    # --- what the dialer reports -------------------------------------------------------

    def acquire(self, target: Target) -> bool:
        """A place on ``target`` for one attempt (its max_connections); False: full."""
        stats = target.stats
        limit = target.config.max_connections
        if limit is not None and stats.active >= limit:
            return False
        stats.active += 1
        return True

    def release(self, target: Target) -> None:
        target.stats.active -= 1

    def succeeded(self, target: Target) -> None:
        health = target.health
        # An up backend without failures in a row has nothing to learn from a success.
        if health is not None and (not health.up or health.consecutive_failures):
            self._monitor.passive_success(self.name, target.name)

    def failed(self, target: Target, reason: str) -> None:
        if target.health is not None:
            self._monitor.passive_failure(self.name, target.name, reason)

    # --- admission -------------------------------------------------------------------

    def admit(
        self, peer: tuple[str, int], sock: RawSocket, listening: Address | None
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

    def turned_away(self, cause: Reject, peer: tuple[str, int], reason: str) -> None:
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

    def session_ended(
        self, counted: str | None, record: SessionRecord, target: Target | None
    ) -> None:
        """Count a session that ended (``target``: the backend it was joined to)."""
        stats = self.stats
        stats.active -= 1
        if counted is not None:
            self._uncount(counted)
        stats.ends[record.end] += 1
        failed = record.failed
        if failed:
            for attempt in failed:
                # A fixed set of words: no backend can mint counters (the access line
                # keeps the detail).
                stats.backend(attempt.backend).attempts[outcome_label(attempt.outcome)] += 1
            self._note_failover(record, failed)
        if target is not None:
            stats.bytes_from_client += record.from_client
            stats.bytes_from_backend += record.from_backend
            backend = target.stats
            backend.active -= 1
            backend.attempts[Outcome.OK] += 1
            backend.sessions += 1
        connect = record.connect_time
        if connect is not None:
            # Histogram.observe, inline: once per session.
            histogram = stats.connect_seconds
            histogram.counts[bisect_left(histogram.bounds, connect)] += 1
            histogram.count += 1
            histogram.total += connect

    def _note_failover(self, record: SessionRecord, failed: Sequence[AttemptResult]) -> None:
        self.daemon.recent_failovers.append(
            {
                "time": format_timestamp(record.started),
                "session": record.session,
                "service": self.name,
                "client": record.client,
                "failed": [
                    {"backend": a.backend, "address": a.address, "outcome": a.outcome}
                    for a in failed
                ],
                "backend": record.backend,
            }
        )

    # --- sessions in relay -----------------------------------------------------------

    def watch_idle(self, session: Any) -> None:
        """Sessions of a service with an idle timeout are swept for inactivity."""
        self.relaying.add(session)
        if not self._sweeping:
            self._sweeping = True
            reactor = self.daemon.reactor
            assert reactor is not None and self.settings.idle_timeout is not None
            reactor.loop.call_later(self.settings.idle_timeout / 4, self._sweep)

    def _sweep(self) -> None:
        # Quarter steps: a session idle for four sweeps in a row has been idle for at
        # least the timeout, and is closed at most a quarter of it late.
        for session in list(self.relaying):
            session.idle_check()
        if self.relaying:
            reactor = self.daemon.reactor
            assert reactor is not None and self.settings.idle_timeout is not None
            reactor.loop.call_later(self.settings.idle_timeout / 4, self._sweep)
        else:
            self._sweeping = False


def _is_own(daemon: DaemonState, peer: Address, sock: RawSocket, listening: Address | None) -> bool:
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
