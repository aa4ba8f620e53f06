"""One service at run time.

A `ServiceRuntime` is where policy, health and the operator meet for one service:
``plan()`` orders its backends (`Target`: a backend with everything worked out once),
``admit()`` (see `~.admission`) decides whether a new connection may become a session,
and the session's outcome is counted here when it ends. A reload builds new runtimes
for changed services; sessions in flight keep the one they started with, and the
counters (`ServiceStats`) carry over. What all services share is the `DaemonState`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from bisect import bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from .accesslog import AttemptResult, SessionRecord, format_timestamp
from .admission import Admission
from .config import BackendConfig, ServiceConfig
from .dialer import SocketOptions, keepalive_options
from .health import BackendHealth
from .hedging import HEDGE_FACTOR, HEDGE_FLOOR
from .metrics import BackendStats, ServiceStats, outcome_label
from .monitor import HealthMonitor
from .policy import Candidate, Scheduler
from .relay import CHUNK
from .resolver import Resolver, is_ip_literal
from .splice import choose_relay
from .vocabulary import AcceptProxy, AdminState, HostPort, Outcome, Policy, RelayMode

if TYPE_CHECKING:
    from .daemonstate import DaemonState

log = logging.getLogger("tcpfwd")

# "auto": copy until a direction has moved this much, then splice it (a short session
# does not pay for a pipe); "splice": splice from the first byte.
SPLICE_AFTER_AUTO: Final = 256 << 10
NEVER: Final = 1 << 62
# Taken from its enum once (see relay._CLOSED_WORDS).
_OK: Final = Outcome.OK


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
        self.literal: tuple[HostPort, ...] | None = (
            ((str(ipaddress.ip_address(self.host)), self.port),)
            if is_ip_literal(self.host)
            else None
        )

    def __repr__(self) -> str:
        return f"Target({self.name})"


class ServiceRuntime(Admission):
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
        # Clients start with a PROXY header (worked out once: an enum member's lookup is
        # dear on Python 3.11, see relay._CLOSED_WORDS).
        self.expects_header = settings.accept_proxy != AcceptProxy.OFF
        self.checks_addresses = not self.expects_header and bool(
            settings.allow or settings.deny or self.per_client_limit is not None
        )
        # Hedged attempts (see dialer.Dial): whether, when, and how many run now.
        self.hedges = settings.hedge
        self._hedge_delay = settings.hedge_delay
        self._hedge_cap = settings.connect_timeout / 2
        self.hedging = 0
        # Nothing to judge but the daemon's own limits (the usual case).
        self.open_door = (
            not self.expects_header
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
            backend.attempts[_OK] += 1
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
