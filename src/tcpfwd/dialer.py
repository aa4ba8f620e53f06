"""The failover sequence: try a session's backends in order, join the first that connects.

A `Dial` makes one pass over a session's plan; each connection it opens is an `Attempt`
on a raw non-blocking socket, watched by the reactor until it connects, fails or times
out. Each backend is resolved when it is tried (an IP literal needs nothing; a name goes
through the shared cache, and only a cache miss waits on the resolver), and each address
it resolves to is tried in turn. Where the service expects a greeting, "connects" means
the backend's first line arrived and matched: it is kept for the client, whose own bytes
wait in its socket meanwhile; a backend that closes, resets, stays silent or greets
otherwise is a failed attempt like a refusal, and the client, having received nothing,
is moved on transparently.

Every failed attempt is recorded with its reason for the session's log line, and each
backend's outcome feeds passive health, except what says nothing about the backend: a
cut by the failover deadline, or tcpfwd itself running out of descriptors (then the
attempt waits and tries again rather than failing the client).

A backend with ``send_proxy`` gets the session's PROXY header in one write as soon as it
is connected, before any byte of the client and before its greeting is awaited (Postfix
sends none until it has the header).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Protocol

from .config import SendProxySettings, format_hostport
from .reactor import ERR, HUP, IN, RDHUP, RawSocket, Reactor, shared_address
from .relay import BACKEND_EVENTS
from .transparent import TransparentBindError, transparent_socket
from .vocabulary import HostPort, Outcome

if TYPE_CHECKING:
    from .service import ServiceRuntime, Target

log = logging.getLogger("tcpfwd")

# The backend is at its max_connections: skipped without a connect.
# Followed by ":" and the greeting's first word, e.g. "greeting_mismatch:421".
# Overtaken by a hedge: another backend answered first (the access line's word).

# Hedges: the delay is this many times the backend's slowest answer of late (a decaying
# maximum, about its recent p99), and never less than the floor, so that a backend that
# is slow but there (far away) is not hedged on every connection.
HEDGE_FACTOR: Final = 3.0
HEDGE_FLOOR: Final = 0.1
# The slowest answer of late forgets a little with each new answer.
SLOWEST_DECAY: Final = 0.98
# Hedges (and losers still trying) per service at once: an outage must not double the
# load on the next backend's listen queue for long.
MAX_HEDGES_IN_FLIGHT: Final = 64

# Outcomes that say nothing about the backend's health: the failover deadline cut the
# attempt short, or our own socket could not be bound to the client's address.
_NOT_THE_BACKENDS: Final = frozenset({Outcome.FAILOVER_TIMEOUT, Outcome.TRANSPARENT_BIND})

# A greeting's first line must end within this many bytes.
MAX_GREETING_LINE: Final = 512
_GREETING_READ: Final = MAX_GREETING_LINE * 8
_FIRST_WORD = re.compile(rb"[A-Za-z0-9+*.-]{1,16}")

# Below this, an attempt could not even complete a loopback handshake: do not start it.
MIN_ATTEMPT_TIME: Final = 0.001
# Out of descriptors: wait this long before trying again, doubling up to the maximum.
SHORTAGE_PAUSE: Final = 0.05
SHORTAGE_MAX_PAUSE: Final = 1.0

_UNREACHABLE: Final = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
)
# Errors that tell of tcpfwd's own resources, not of the backend.
SHORTAGE_ERRORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_IN_PROGRESS: Final = frozenset({0, errno.EINPROGRESS})
_NONBLOCKING_STREAM: Final = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC

# An attempt still waiting this long tells its session (which then watches its client
# for leaving): most attempts are over long before, and spare the session that.
SLOW_AFTER: Final = 0.05

# Timer kinds.
_RETRY = 1
# Attempt states.
_CONNECTING, _GREETING_WAIT, _OVER = 1, 2, 3


def describe_errno(code: int) -> str:
    """A short, stable word for why a connect failed, as it appears in the log."""
    if code == errno.ECONNREFUSED:
        return Outcome.REFUSED
    if code == errno.ETIMEDOUT:
        return Outcome.TIMEOUT
    if code in _UNREACHABLE:
        return Outcome.UNREACHABLE
    return errno.errorcode.get(code, str(code)).lower()


def describe_failure(error: BaseException) -> str:
    """The same word for an exception (health checks, name resolution)."""
    if isinstance(error, TransparentBindError):
        return Outcome.TRANSPARENT_BIND
    if isinstance(error, TimeoutError):
        return Outcome.TIMEOUT
    if isinstance(error, socket.gaierror):
        return Outcome.DNS
    if isinstance(error, OSError) and error.errno is not None:
        return describe_errno(error.errno)
    return type(error).__name__


SocketOptions = tuple[tuple[int, int, int], ...]


def keepalive_options(keepalive: bool, idle: float, interval: float, count: int) -> SocketOptions:
    """The (level, option, value) triples that turn TCP keepalive on, as configured."""
    if not keepalive:
        return ()
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    if hasattr(socket, "TCP_KEEPIDLE"):
        options += [
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, int(idle)),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, int(interval)),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count),
        ]
    return tuple(options)


def apply_options(sock: RawSocket, options: SocketOptions) -> None:
    try:
        for level, option, value in options:
            sock.setsockopt(level, option, value)
    except OSError:
        # The peer may already be gone; the relay will find out and say so.
        pass


class DialOwner(Protocol):
    """What a dial asks of and tells its session."""

    service: ServiceRuntime

    @property
    def client(self) -> HostPort:
        """The client: its address is the source of transparent connections."""

    def proxy_header(self, settings: SendProxySettings) -> bytes | None:
        """The header for a backend with ``send_proxy`` (None: no client to describe)."""

    def attempt_failed(
        self, target: Target, address: str, outcome: str, elapsed: float
    ) -> None: ...

    def dial_connected(self, attempt: Attempt) -> None: ...

    def dial_slow(self) -> None:
        """An attempt has been waiting a while (``SLOW_AFTER``)."""

    def dial_failed(self) -> None:
        """Every backend of the plan failed (or the failover deadline passed)."""


class Dial:
    """One pass over a session's plan: in order, one attempt at a time, except that an
    attempt with no answer after its backend's hedge delay has the next backend tried
    beside it (hedged attempts). The first to answer wins; of two that answer together,
    the earlier in the order. An attempt that loses is closed before any byte of the
    client reaches it; one still trying goes on, detached, until it answers or fails,
    so that its outcome still tells passive health whether that backend is there.

    A dial lives for a moment per connection: what most dials never change is a class
    attribute, overridden where it changes.
    """

    # Where in the plan, and the addresses of the backend being tried (its place is
    # held while they are set).
    _position = 0
    _addresses: Sequence[HostPort] | None = None
    _next_address = 0
    _reason: str = Outcome.FAILOVER_TIMEOUT
    # The newest attempt, and the older ones a hedge overtook, still trying.
    _attempt: Attempt | None = None
    _racing: list[Attempt] | None = None
    # Attempts that answered in this batch of events, while others raced them.
    _ready: list[Attempt] | None = None
    _resolving: asyncio.Task[None] | None = None
    _pause = SHORTAGE_PAUSE
    # Connected, failed or cancelled: the session has been told.
    over = False

    def __init__(
        self, owner: DialOwner, plan: Sequence[Target], reactor: Reactor, now: float
    ) -> None:
        self.owner = owner
        service = self.service = owner.service
        self.plan = plan
        self.reactor = reactor
        failover_timeout = service.settings.failover_timeout
        self.deadline = None if failover_timeout is None else now + failover_timeout

    def start(self) -> None:
        """The first attempt. The usual one (an IP literal, no limit of connections to
        watch) is started straight away, without the general sequence's bookkeeping."""
        plan = self.plan
        if plan:
            target = plan[0]
            addresses = target.literal
            if addresses is not None and target.config.max_connections is None:
                target.stats.active += 1
                self._addresses = addresses
                self._next_address = 1
                attempt = Attempt(self, target, addresses[0], 0)
                outcome = attempt.start()
                if outcome is None:
                    self._attempt = attempt
                    return
                if self._settle(outcome, addresses):
                    return
        self._next()

    def cancel(self) -> None:
        """The session is over (the client left, the daemon stops): drop everything."""
        self.over = True
        for attempt in self._in_flight():
            attempt.abandon()
            if attempt is not self._attempt:
                self._let_go(attempt)
        self._attempt = self._racing = self._ready = None
        if self._resolving is not None:
            self._resolving.cancel()
            self._resolving = None
        if self._addresses is not None:
            self._addresses = None
            self.service.release(self.plan[self._position])
        self._position = len(self.plan) + 1

    def _in_flight(self) -> list[Attempt]:
        attempts = [] if self._attempt is None else [self._attempt]
        if self._racing:
            attempts += self._racing
        if self._ready:
            attempts += [a for a in self._ready if a is not self._attempt and a not in attempts]
        return attempts

    def _next(self, *, hedge: bool = False) -> None:
        """Start the next attempt of the plan, or tell the session none is left;
        ``hedge``: it is started beside an overdue one."""
        service = self.service
        plan = self.plan
        while True:
            addresses = self._addresses
            if addresses is None:
                if self._position >= len(plan):
                    self._exhausted()
                    return
                target = plan[self._position]
                deadline = self.deadline
                if deadline is not None and deadline <= time.monotonic():
                    self.owner.attempt_failed(target, target.shown, Outcome.FAILOVER_TIMEOUT, 0.0)
                    self._position = len(plan)
                    self._exhausted()
                    return
                if not service.acquire(target):
                    self.owner.attempt_failed(target, target.shown, Outcome.FULL, 0.0)
                    self._position += 1
                    continue
                addresses = target.literal
                if addresses is None:
                    try:
                        addresses = service.resolver.cached(target.host, target.port)
                    except OSError as error:
                        self._unresolved(target, describe_failure(error), 0.0)
                        continue
                    if addresses is None:
                        self._addresses = ()
                        self._resolving = self.reactor.loop.create_task(self._resolve(target))
                        return
                self._addresses = addresses
                self._next_address = 0
                self._reason = Outcome.FAILOVER_TIMEOUT
            target = plan[self._position]
            if self._next_address >= len(addresses):
                self._backend_failed(target)
                continue
            address = addresses[self._next_address]
            self._next_address += 1
            attempt = Attempt(self, target, address, self._position)
            attempt.hedge = hedge
            outcome = attempt.start()
            if outcome is None:
                self._attempt = attempt
                return
            if self._settle(outcome, addresses):
                return

    def _exhausted(self) -> None:
        """No backend left to start: over, unless an overtaken attempt is still trying."""
        if self.over or self._racing or self._ready:
            return
        self.over = True
        self._position = len(self.plan) + 1
        self.owner.dial_failed()

    def _settle(self, outcome: str, addresses: Sequence[HostPort]) -> bool:
        """An attempt failed at once: True if the sequence must wait (a retry is timed)."""
        if outcome in _SHORTAGE_WORDS:
            # Our descriptors, not the backend: try the same address again soon.
            self._next_address -= 1
            self.reactor.call_later(self._pause, self, _RETRY)
            self._pause = min(self._pause * 2, SHORTAGE_MAX_PAUSE)
            return True
        self._reason = outcome
        if outcome == Outcome.FAILOVER_TIMEOUT:
            self._next_address = len(addresses)
        return False

    def _backend_failed(self, target: Target) -> None:
        """Every address of ``target`` failed: give back its place, tell health why."""
        self._addresses = None
        self._position += 1
        self.service.release(target)
        if self._reason not in _NOT_THE_BACKENDS:
            self.service.failed(target, self._reason)

    def _unresolved(self, target: Target, outcome: str, elapsed: float) -> None:
        self.owner.attempt_failed(target, target.shown, outcome, elapsed)
        self._reason = outcome
        self._addresses = ()
        self._next_address = 0

    async def _resolve(self, target: Target) -> None:
        settings = self.service.settings
        started = time.monotonic()
        budget, cut = self.budget(settings.connect_timeout, started)
        try:
            async with asyncio.timeout(budget):
                addresses = await self.service.resolver.resolve(
                    target.host, target.port, settings.dns_ttl
                )
        except (OSError, TimeoutError) as error:
            outcome: str
            if isinstance(error, TimeoutError):
                outcome = Outcome.FAILOVER_TIMEOUT if cut else Outcome.DNS
            else:
                outcome = describe_failure(error)
            self._resolving = None
            self._unresolved(target, outcome, time.monotonic() - started)
            self._safely_next()
            return
        self._resolving = None
        self._addresses = addresses
        self._next_address = 0
        self._reason = Outcome.FAILOVER_TIMEOUT
        self._safely_next()

    def _safely_next(self) -> None:
        try:
            self._next()
        except Exception as error:
            self.on_failure(error)

    def budget(self, timeout: float, now: float) -> tuple[float, bool]:
        """The time a step may take, and whether the failover deadline cut it."""
        deadline = self.deadline
        if deadline is not None and deadline - now < timeout:
            return max(deadline - now, 0.0), True
        return timeout, False

    # --- what attempts report ------------------------------------------------------------

    def attempt_failed(self, attempt: Attempt, outcome: str) -> None:
        if attempt.detached:
            # A loser that went on trying: its end tells health, and nobody else.
            self._let_go(attempt)
            if outcome not in _NOT_THE_BACKENDS:
                self.service.failed(attempt.target, outcome)
            return
        self.owner.attempt_failed(
            attempt.target, attempt.address, outcome, time.monotonic() - attempt.started
        )
        if attempt is not self._attempt:
            # Overtaken by a hedge, and now failed: its backend is done for this session.
            assert self._racing is not None
            self._racing.remove(attempt)
            self._let_go(attempt)
            if outcome not in _NOT_THE_BACKENDS:
                self.service.failed(attempt.target, outcome)
            if self._attempt is None and self._addresses is None:
                self._exhausted()
            return
        self._attempt = None
        self._reason = outcome
        if outcome == Outcome.FAILOVER_TIMEOUT and self._addresses is not None:
            self._next_address = len(self._addresses)
        self._next()

    def attempt_connected(self, attempt: Attempt) -> None:
        """``attempt`` answered (connected, or greeted as expected)."""
        target = attempt.target
        # Its answer time: the hedge delay of the backend follows the slowest of late.
        elapsed = time.monotonic() - attempt.started
        target.slowest = max(elapsed, target.slowest * SLOWEST_DECAY)
        if attempt.detached:
            # It lost; say so to health (it answered) and close it, untouched.
            attempt.abandon()
            self._let_go(attempt)
            self.service.succeeded(target)
            return
        if not self._racing and attempt is self._attempt:
            # The usual case: nothing raced it.
            self._win(attempt)
            return
        ready = self._ready
        if ready is None:
            ready = self._ready = []
            # Decided once every event of this batch is in: of attempts that answered
            # together, the earlier in the order wins.
            self.reactor.after_batch(self._decide)
        ready.append(attempt)

    def _decide(self) -> None:
        ready = self._ready
        self._ready = None
        if not ready or self.over:
            return
        winner = min(ready, key=_RANK)
        now = time.monotonic()
        losers = [a for a in self._in_flight() if a is not winner]
        current = self._attempt
        self._attempt = self._racing = None
        for attempt in losers:
            attempt.detached = True
            self.owner.attempt_failed(
                attempt.target, attempt.address, Outcome.OVERTAKEN, now - attempt.started
            )
            if attempt.state == _OVER:
                # Answered too, later in the order: closed untouched.
                attempt.abandon()
                self._let_go(attempt)
                self.service.succeeded(attempt.target)
            elif not attempt.extra:
                # Still trying: it goes on alone, its outcome for health only.
                attempt.extra = True
                self.service.hedging += 1
        if current is None:
            # No attempt holds the place of the backend being tried: give it back.
            self._release_current(winner)
        if winner.extra:
            winner.extra = False
            self.service.hedging -= 1
        if winner.hedge:
            winner.target.stats.hedge_wins += 1
        self._win(winner)

    def _release_current(self, winner: Attempt) -> None:
        if self._resolving is not None:
            self._resolving.cancel()
            self._resolving = None
        if self._addresses is not None and self._position < len(self.plan):
            if winner.rank != self._position:
                self.service.release(self.plan[self._position])
            self._addresses = None

    def _win(self, attempt: Attempt) -> None:
        self.over = True
        self._attempt = self._racing = None
        self._addresses = None
        self._position = len(self.plan) + 1
        target = attempt.target
        if attempt.overdue:
            target.overdue -= 1
            attempt.overdue = False
        if (
            attempt.state == _OVER
            and not attempt.header_sent
            and target.send_proxy is not None
            and not attempt.send_header()
        ):
            # Connect-only answers get the PROXY header here (only the winner hears it);
            # the attempt failed sending it, and said so.
            return
        health = target.health
        # An up backend without failures in a row has nothing to learn from a success.
        if health is not None and (not health.up or health.consecutive_failures):
            self.service.succeeded(target)
        self.owner.dial_connected(attempt)

    def _let_go(self, attempt: Attempt) -> None:
        """An attempt that no session will use has ended: its backend's place, its
        overdue mark and its share of the hedges go."""
        self.service.release(attempt.target)
        if attempt.overdue:
            attempt.target.overdue -= 1
            attempt.overdue = False
        if attempt.extra:
            attempt.extra = False
            self.service.hedging -= 1

    def overdue(self, attempt: Attempt) -> None:
        """No answer from ``attempt`` after its hedge delay: its backend is suspect for
        new sessions, and the next backend is tried beside it (if hedging may)."""
        attempt.overdue = True
        attempt.target.overdue += 1
        service = self.service
        if (
            attempt is not self._attempt
            or self.over
            or self._position + 1 >= len(self.plan)
            or service.hedging >= MAX_HEDGES_IN_FLIGHT
        ):
            return
        racing = self._racing
        if racing is None:
            racing = self._racing = []
        racing.append(attempt)
        attempt.extra = True
        service.hedging += 1
        attempt.target.stats.hedges += 1
        # The overtaken attempt keeps its backend's place; the next backend is started.
        self._attempt = None
        self._addresses = None
        self._position += 1
        self._next(hedge=True)

    # --- timer (a retry after a shortage) ------------------------------------------------

    def on_timer(self, kind: int) -> None:
        if self._position < len(self.plan) and self._attempt is None and not self.over:
            self._next()

    def on_failure(self, error: BaseException) -> None:
        over = self.over
        self.cancel()
        if not over:
            self.owner.dial_failed()


def _rank(attempt: Attempt) -> int:
    return attempt.rank


_RANK: Final = _rank


_SHORTAGE_WORDS: Final = frozenset(describe_errno(code) for code in SHORTAGE_ERRORS)


class Attempt:
    """One connection to one address of one backend, until it is joined or fails.

    An attempt lives for a moment, once or more per connection: its many flags are
    class attributes that an instance overrides only when one changes, rather than
    slots that every attempt would set.
    """

    state = _CONNECTING
    # What the backend sent before it was joined (its greeting): the client's first.
    greeting = b""
    sock: RawSocket | None = None
    fd = -1
    local: HostPort | None = None
    # The connection had bytes to read when it was joined (its event came already).
    readable = False
    # Made from the client's address (transparent mode).
    transparent = False
    started = 0.0
    # When the step under way (connect, greeting) times out, whether the failover
    # deadline set that, and whether the session has been told the attempt is slow.
    deadline = 0.0
    cut = False
    slow = False
    # Overdue (no answer after the hedge delay), started as a hedge, lost and only
    # telling health now, counted among the service's hedges in flight.
    overdue = False
    hedge = False
    detached = False
    extra = False
    header_sent = False

    def __init__(self, dial: Dial, target: Target, remote: HostPort, rank: int) -> None:
        self.dial = dial
        self.target = target
        self.remote = remote
        # The backend's place in the plan: of attempts that answer together, the lower wins.
        self.rank = rank
        self.address = (
            target.shown if target.literal is not None else format_hostport(remote[0], remote[1])
        )

    def start(self) -> str | None:
        """Connect; None while in progress, else why it failed at once (recorded)."""
        dial = self.dial
        service = dial.service
        settings = service.settings
        started = self.started = time.monotonic()
        budget = settings.connect_timeout
        deadline = dial.deadline
        if deadline is not None and deadline - started < budget:
            budget, self.cut = dial.budget(budget, started)
            if budget < MIN_ATTEMPT_TIME:
                return self._failed_at_once(Outcome.FAILOVER_TIMEOUT)
        remote = self.remote
        family = socket.AF_INET6 if ":" in remote[0] else socket.AF_INET
        try:
            if self.target.config.transparent:
                # From the client's own address (the one a PROXY header named, if any).
                sock: RawSocket = transparent_socket(family, dial.owner.client[0])
                self.transparent = True
            else:
                sock = RawSocket(family, _NONBLOCKING_STREAM)
        except TransparentBindError as error:
            log.debug("transparent bind for %s failed: %s", self.address, error)
            return self._failed_at_once(Outcome.TRANSPARENT_BIND)
        except OSError as error:
            code = error.errno or 0
            if code in SHORTAGE_ERRORS:
                return describe_errno(code)
            return self._failed_at_once(describe_errno(code))
        try:
            if service.nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            source = service.source_address
            if source is not None:
                sock.bind(source)
            code = sock.connect_ex(remote)
        except OSError as error:
            code = error.errno or errno.EIO
        if code not in _IN_PROGRESS:
            sock.close()
            if code in SHORTAGE_ERRORS:
                return describe_errno(code)
            return self._failed_at_once(describe_errno(code))
        self.sock = sock
        fd = self.fd = sock.fileno()
        # Known at once (the kernel chose the port at connect): should the backend be
        # tcpfwd itself, the connection that arrives on its listener is recognised.
        name = sock.getsockname()
        host = name[0]
        local = self.local = (shared_address(host), name[1])
        service.daemon.outgoing.add(local, self)
        reactor = dial.reactor
        # Watched as the relay will watch it: no change of registration when joined.
        reactor.register(fd, BACKEND_EVENTS)
        reactor.handlers[fd] = self
        self.deadline = started + budget
        reactor.tick(self)
        return None

    def _failed_at_once(self, outcome: str) -> str:
        dial = self.dial
        dial.owner.attempt_failed(
            self.target, self.address, outcome, time.monotonic() - self.started
        )
        return outcome

    def on_event(self, fd: int, events: int) -> None:
        if self.state != _CONNECTING:
            if self.state == _GREETING_WAIT:
                self._greeting_read()
            return
        sock = self.sock
        assert sock is not None
        if events & (ERR | HUP):
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._fail(describe_errno(code) if code else Outcome.REFUSED)
            return
        dial = self.dial
        service = dial.service
        if service.greeting_pattern is not None:
            # A backend that wants a PROXY header (Postfix) sends no greeting before it.
            if self.target.send_proxy is not None and not self.send_header():
                return
            greeting = service.settings.greeting
            assert greeting is not None
            self.state = _GREETING_WAIT
            now = time.monotonic()
            budget, self.cut = dial.budget(greeting.timeout, now)
            self.deadline = now + budget
            if events & (IN | RDHUP):
                self._greeting_read()
            return
        self.readable = bool(events & (IN | RDHUP))
        self.state = _OVER
        dial.reactor.ticking.discard(self)
        dial.attempt_connected(self)

    def send_header(self) -> bool:
        """The session's PROXY header, first and whole (receivers read it from their
        first recv(), and a fresh connection's send buffer takes a few hundred bytes at
        once); False if the attempt failed instead."""
        send_proxy = self.target.send_proxy
        assert send_proxy is not None and self.sock is not None
        self.header_sent = True
        header = self.dial.owner.proxy_header(send_proxy)
        if not header:
            return True
        try:
            sent = self.sock.send(header)
        except OSError as error:
            self._fail(describe_errno(error.errno or errno.EIO))
            return False
        if sent != len(header):
            self._fail(Outcome.GREETING_RESET)
            return False
        return True

    def _greeting_read(self) -> None:
        """Read until the first line is there, or the backend has nothing more for now
        (its events come once: a line cut short waits for the next)."""
        sock = self.sock
        assert sock is not None
        while True:
            try:
                data = sock.recv(_GREETING_READ)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._fail(Outcome.GREETING_RESET)
                return
            if not data:
                self._fail(Outcome.GREETING_CLOSED)
                return
            greeting = self.greeting = self.greeting + data
            end = greeting.find(b"\n", 0, MAX_GREETING_LINE)
            if end >= 0:
                break
            if len(greeting) >= MAX_GREETING_LINE:
                self._fail(Outcome.GREETING_TOO_LONG)
                return
        line = greeting[: end + 1]
        pattern = self.dial.service.greeting_pattern
        assert pattern is not None
        if pattern.search(line):
            self.state = _OVER
            self.dial.reactor.ticking.discard(self)
            # What followed the line may not all have been read, and its event came.
            self.readable = True
            self.dial.attempt_connected(self)
            return
        word = _FIRST_WORD.match(line)
        self._fail(f"{Outcome.GREETING_MISMATCH}:{word.group().decode() if word else '?'}")

    def is_new(self, now: float) -> bool:
        return self.state != _OVER

    def on_tick(self, now: float) -> None:
        state = self.state
        if state == _OVER:
            self.dial.reactor.ticking.discard(self)
            return
        if now >= self.deadline:
            if state == _CONNECTING:
                self._fail(Outcome.FAILOVER_TIMEOUT if self.cut else Outcome.TIMEOUT)
            else:
                self._fail(Outcome.FAILOVER_TIMEOUT if self.cut else Outcome.GREETING_TIMEOUT)
            return
        if self.detached:
            return
        if not self.slow and now - self.started >= SLOW_AFTER:
            self.slow = True
            self.dial.owner.dial_slow()
        if not self.overdue:
            service = self.dial.service
            if service.hedges and now - self.started >= service.hedge_delay(self.target):
                self.dial.overdue(self)

    def on_failure(self, error: BaseException) -> None:
        if self.state != _OVER:
            self._fail(type(error).__name__.lower())

    def _fail(self, outcome: str) -> None:
        self.abandon()
        self.dial.attempt_failed(self, outcome)

    def abandon(self) -> None:
        """Close the connection (it failed, or its session is gone)."""
        self.state = _OVER
        self.dial.reactor.ticking.discard(self)
        sock = self.sock
        if sock is None:
            return
        self.sock = None
        self.dial.reactor.forget(self.fd)
        if self.local is not None:
            self.dial.service.daemon.outgoing.discard(self.local, self)
        sock.close()

    def take(self) -> RawSocket:
        """The connected socket, now the session's."""
        sock = self.sock
        assert sock is not None
        self.sock = None
        return sock
