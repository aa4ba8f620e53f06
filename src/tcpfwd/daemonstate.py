"""What every service of the daemon shares, across reloads.

`DaemonState` holds the data plane's reactor and pipes, the access log, the operator's
backend states, the live sessions and how many may be live at once, and the addresses
of tcpfwd's own outgoing connections (`OwnConnections`: a connection that arrives from
one of them is tcpfwd talking to itself), and the one throttled log of turned-away
clients (`RejectLog`).

Places are shared fairly: each service keeps a reserve of the daemon's session capacity
that the others cannot take (``reserved_connections``), so a service flooded by
clients, or looping through another box, cannot starve the rest; a service that has
used up what it may take stops accepting until places free up, and its new clients wait
in its listen queue, as every client does at full capacity.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from .accesslog import AccessLog
from .sockdiag import socket_exists
from .splice import PipePool
from .vocabulary import AdminState, HostPort, Reject

if TYPE_CHECKING:
    from .reactor import Reactor
    from .service import ServiceRuntime

log = logging.getLogger("tcpfwd")

RECENT_FAILOVERS: Final = 50

# A turned-away connection is logged at most this often per service and cause.
REJECT_LOG_INTERVAL: Final = 10.0

# TCP keepalive towards a backend is switched on once a session has lived this long
# (one to two of these): it only matters after its idle time (a minute by default),
# and the many short sessions are spared four system calls each.
KEEPALIVE_AFTER: Final = 1.0


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


class Outgoing(Protocol):
    """One of tcpfwd's own connections to a backend: an attempt, then its session."""

    @property
    def remote(self) -> HostPort: ...

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
        self.by_local: dict[HostPort, Outgoing] = {}
        # Local addresses that several of our connections share, with all of them.
        self.shared: dict[HostPort, list[Outgoing]] = {}

    def add(self, local: HostPort, owner: Outgoing) -> None:
        first = self.by_local.setdefault(local, owner)
        if first is not owner:
            self.shared.setdefault(local, [first]).append(owner)

    def hand_over(self, local: HostPort, old: Outgoing, new: Outgoing) -> None:
        """The connection from ``local`` is now ``new``'s (an attempt became a session)."""
        shared = self.shared.get(local)
        if shared is not None:
            shared[shared.index(old)] = new
            self.by_local[local] = shared[0]
        elif self.by_local.get(local) is old:
            self.by_local[local] = new

    def discard(self, local: HostPort, owner: Outgoing) -> None:
        shared = self.shared.get(local)
        if shared is not None:
            shared.remove(owner)
            self.by_local[local] = shared[0]
            if len(shared) == 1:
                del self.shared[local]
            return
        if self.by_local.get(local) is owner:
            del self.by_local[local]

    def is_loop(self, peer: HostPort, arrived_on: HostPort, now: float) -> bool:
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
