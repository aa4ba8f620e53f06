"""The failover sequence: try a session's backends in order, join the first that connects.

A `Dial` makes one pass over a session's plan, one `~.attempt.Attempt` at a time (or
more, hedged: see `~.hedging`). Each backend is resolved when it is tried (an IP literal
needs nothing; a name goes through the shared cache, and only a cache miss waits on the
resolver), and each address it resolves to is tried in turn. A backend that fails is
passed over transparently: the client, having received nothing, does not know.

Every failed attempt is recorded with its reason for the session's log line, and each
backend's outcome feeds passive health, except what says nothing about the backend: a
cut by the failover deadline, or tcpfwd itself running out of descriptors (then the
attempt waits and tries again rather than failing the client).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Protocol

from .attempt import NOT_THE_BACKENDS, OVER, SHORTAGE_WORDS, Attempt, describe_failure
from .config import SendProxySettings
from .hedging import SLOWEST_DECAY, Hedging
from .reactor import RawSocket, Reactor
from .vocabulary import HostPort, Outcome

if TYPE_CHECKING:
    from .service import ServiceRuntime, Target

log = logging.getLogger("tcpfwd")

# Out of descriptors: wait this long before trying again, doubling up to the maximum.
SHORTAGE_PAUSE: Final = 0.05
SHORTAGE_MAX_PAUSE: Final = 1.0

# Timer kinds.
_RETRY = 1


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


class Dial(Hedging):
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
                if self._launch(Attempt(self, target, addresses[0], 0), addresses):
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
            if self._launch(attempt, addresses):
                return

    def _exhausted(self) -> None:
        """No backend left to start: over, unless an overtaken attempt is still trying."""
        if self.over or self._racing or self._ready:
            return
        self.over = True
        self._position = len(self.plan) + 1
        self.owner.dial_failed()

    def _launch(self, attempt: Attempt, addresses: Sequence[HostPort]) -> bool:
        """Start ``attempt``: True when the sequence now waits (for it, or for a timed
        retry), False when it failed at once and the next address is due."""
        outcome = attempt.start()
        if outcome is None:
            self._attempt = attempt
            return True
        return self._settle(outcome, addresses)

    def _settle(self, outcome: str, addresses: Sequence[HostPort]) -> bool:
        """An attempt failed at once: True if the sequence must wait (a retry is timed)."""
        if outcome in SHORTAGE_WORDS:
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
        if self._reason not in NOT_THE_BACKENDS:
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
            self._loser_ended(attempt, outcome)
            return
        self.owner.attempt_failed(
            attempt.target, attempt.address, outcome, time.monotonic() - attempt.started
        )
        if attempt is not self._attempt:
            # Overtaken by a hedge, and now failed: its backend is done for this session.
            assert self._racing is not None
            self._racing.remove(attempt)
            self._loser_ended(attempt, outcome)
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
        elif not self._racing and attempt is self._attempt:
            # The usual case: nothing raced it.
            self._win(attempt)
        else:
            self._answered_in_race(attempt)

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
            attempt.state == OVER
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

    # --- timer (a retry after a shortage) ------------------------------------------------

    def on_timer(self, kind: int) -> None:
        if self._position < len(self.plan) and self._attempt is None and not self.over:
            self._next()

    def on_failure(self, error: BaseException) -> None:
        over = self.over
        self.cancel()
        if not over:
            self.owner.dial_failed()
