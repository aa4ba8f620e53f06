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
from .transparent import OUTCOME_TRANSPARENT_BIND, TransparentBindError, transparent_socket

if TYPE_CHECKING:
    from .service import ServiceRuntime, Target

log = logging.getLogger("tcpfwd")

OUTCOME_OK: Final = "ok"
OUTCOME_REFUSED: Final = "refused"
OUTCOME_TIMEOUT: Final = "timeout"
OUTCOME_UNREACHABLE: Final = "unreachable"
OUTCOME_DNS: Final = "dns"
OUTCOME_FAILOVER_TIMEOUT: Final = "failover_timeout"
# The backend is at its max_connections: skipped without a connect.
OUTCOME_FULL: Final = "full"
OUTCOME_GREETING_TIMEOUT: Final = "greeting_timeout"
OUTCOME_GREETING_CLOSED: Final = "greeting_closed"
OUTCOME_GREETING_RESET: Final = "greeting_reset"
OUTCOME_GREETING_TOO_LONG: Final = "greeting_too_long"
# Followed by ":" and the greeting's first word, e.g. "greeting_mismatch:421".
OUTCOME_GREETING_MISMATCH: Final = "greeting_mismatch"
# Outcomes that say nothing about the backend's health: the failover deadline cut the
# attempt short, or our own socket could not be bound to the client's address.
_NOT_THE_BACKENDS: Final = frozenset({OUTCOME_FAILOVER_TIMEOUT, OUTCOME_TRANSPARENT_BIND})

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
        return OUTCOME_REFUSED
    if code == errno.ETIMEDOUT:
        return OUTCOME_TIMEOUT
    if code in _UNREACHABLE:
        return OUTCOME_UNREACHABLE
    return errno.errorcode.get(code, str(code)).lower()


def describe_failure(error: BaseException) -> str:
    """The same word for an exception (health checks, name resolution)."""
    if isinstance(error, TransparentBindError):
        return OUTCOME_TRANSPARENT_BIND
    if isinstance(error, TimeoutError):
        return OUTCOME_TIMEOUT
    if isinstance(error, socket.gaierror):
        return OUTCOME_DNS
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
    def client(self) -> tuple[str, int]:
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
    """One pass over a session's plan, one attempt at a time, in order."""

    __slots__ = (
        "_addresses",
        "_attempt",
        "_next_address",
        "_pause",
        "_position",
        "_reason",
        "_resolving",
        "deadline",
        "owner",
        "plan",
        "reactor",
        "service",
    )

    def __init__(
        self, owner: DialOwner, plan: Sequence[Target], reactor: Reactor, now: float
    ) -> None:
        self.owner = owner
        service = self.service = owner.service
        self.plan = plan
        self.reactor = reactor
        failover_timeout = service.settings.failover_timeout
        self.deadline = None if failover_timeout is None else now + failover_timeout
        self._position = 0
        # The addresses of the backend being tried (its place is held meanwhile).
        self._addresses: Sequence[tuple[str, int]] | None = None
        self._next_address = 0
        self._reason = OUTCOME_FAILOVER_TIMEOUT
        self._attempt: Attempt | None = None
        self._resolving: asyncio.Task[None] | None = None
        self._pause = SHORTAGE_PAUSE

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
                attempt = Attempt(self, target, addresses[0])
                outcome = attempt.start()
                if outcome is None:
                    self._attempt = attempt
                    return
                if self._settle(outcome, addresses):
                    return
        self._next()

    def cancel(self) -> None:
        """The session is over (the client left, the daemon stops): drop everything."""
        if self._attempt is not None:
            self._attempt.abandon()
            self._attempt = None
        if self._resolving is not None:
            self._resolving.cancel()
            self._resolving = None
        if self._addresses is not None:
            self._addresses = None
            self.service.release(self.plan[self._position])
        self._position = len(self.plan) + 1

    def _next(self) -> None:
        """Start the next attempt of the plan, or tell the session none is left."""
        service = self.service
        plan = self.plan
        while True:
            addresses = self._addresses
            if addresses is None:
                if self._position >= len(plan):
                    if self._position == len(plan):
                        self._position += 1
                        self.owner.dial_failed()
                    return
                target = plan[self._position]
                deadline = self.deadline
                if deadline is not None and deadline <= time.monotonic():
                    self.owner.attempt_failed(target, target.shown, OUTCOME_FAILOVER_TIMEOUT, 0.0)
                    self._position = len(plan) + 1
                    self.owner.dial_failed()
                    return
                if not service.acquire(target):
                    self.owner.attempt_failed(target, target.shown, OUTCOME_FULL, 0.0)
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
                self._reason = OUTCOME_FAILOVER_TIMEOUT
            target = plan[self._position]
            if self._next_address >= len(addresses):
                self._backend_failed(target)
                continue
            address = addresses[self._next_address]
            self._next_address += 1
            attempt = Attempt(self, target, address)
            outcome = attempt.start()
            if outcome is None:
                self._attempt = attempt
                return
            if self._settle(outcome, addresses):
                return

    def _settle(self, outcome: str, addresses: Sequence[tuple[str, int]]) -> bool:
        """An attempt failed at once: True if the sequence must wait (a retry is timed)."""
        if outcome in _SHORTAGE_WORDS:
            # Our descriptors, not the backend: try the same address again soon.
            self._next_address -= 1
            self.reactor.call_later(self._pause, self, _RETRY)
            self._pause = min(self._pause * 2, SHORTAGE_MAX_PAUSE)
            return True
        self._reason = outcome
        if outcome == OUTCOME_FAILOVER_TIMEOUT:
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
            if isinstance(error, TimeoutError):
                outcome = OUTCOME_FAILOVER_TIMEOUT if cut else OUTCOME_DNS
            else:
                outcome = describe_failure(error)
            self._resolving = None
            self._unresolved(target, outcome, time.monotonic() - started)
            self._safely_next()
            return
        self._resolving = None
        self._addresses = addresses
        self._next_address = 0
        self._reason = OUTCOME_FAILOVER_TIMEOUT
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
        self._attempt = None
        self.owner.attempt_failed(
            attempt.target, attempt.address, outcome, time.monotonic() - attempt.started
        )
        self._reason = outcome
        if outcome == OUTCOME_FAILOVER_TIMEOUT and self._addresses is not None:
            self._next_address = len(self._addresses)
        self._next()

    def attempt_connected(self, attempt: Attempt) -> None:
        self._attempt = None
        self._addresses = None
        self._position = len(self.plan) + 1
        self.service.succeeded(attempt.target)
        self.owner.dial_connected(attempt)

    # --- timer (a retry after a shortage) ------------------------------------------------

    def on_timer(self, kind: int) -> None:
        if self._position < len(self.plan) and self._attempt is None:
            self._next()

    def on_failure(self, error: BaseException) -> None:
        self.cancel()
        self.owner.dial_failed()


_SHORTAGE_WORDS: Final = frozenset(describe_errno(code) for code in SHORTAGE_ERRORS)


class Attempt:
    """One connection to one address of one backend, until it is joined or fails."""

    __slots__ = (
        "address",
        "cut",
        "deadline",
        "dial",
        "fd",
        "greeting",
        "local",
        "readable",
        "remote",
        "slow",
        "sock",
        "started",
        "state",
        "target",
        "transparent",
    )

    def __init__(self, dial: Dial, target: Target, remote: tuple[str, int]) -> None:
        self.dial = dial
        self.target = target
        self.remote = remote
        self.address = (
            target.shown if target.literal is not None else format_hostport(remote[0], remote[1])
        )
        self.state = _CONNECTING
        # What the backend sent before it was joined (its greeting): the client's first.
        self.greeting = b""
        self.sock: RawSocket | None = None
        self.fd = -1
        self.local: tuple[str, int] | None = None
        # The connection had bytes to read when it was joined (its event came already).
        self.readable = False
        # Made from the client's address (transparent mode).
        self.transparent = False
        self.started = 0.0
        # When the step under way (connect, greeting) times out, and whether the
        # session has been told it is slow.
        self.deadline = 0.0
        self.slow = False
        self.cut = False

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
                return self._failed_at_once(OUTCOME_FAILOVER_TIMEOUT)
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
            return self._failed_at_once(OUTCOME_TRANSPARENT_BIND)
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
            self._fail(describe_errno(code) if code else OUTCOME_REFUSED)
            return
        dial = self.dial
        target = self.target
        if target.send_proxy is not None:
            header = dial.owner.proxy_header(target.send_proxy)
            if header:
                # First and whole: receivers read the header from their first recv(), and
                # a fresh connection's send buffer takes a few hundred bytes at once.
                try:
                    sent = sock.send(header)
                except OSError as error:
                    self._fail(describe_errno(error.errno or errno.EIO))
                    return
                if sent != len(header):
                    self._fail(OUTCOME_GREETING_RESET)
                    return
        service = dial.service
        if service.greeting_pattern is not None:
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
        dial._attempt = None
        dial._addresses = None
        dial._position = len(dial.plan) + 1
        health = target.health
        # An up backend without failures in a row has nothing to learn from a success.
        if health is not None and (not health.up or health.consecutive_failures):
            service.succeeded(target)
        dial.owner.dial_connected(self)

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
                self._fail(OUTCOME_GREETING_RESET)
                return
            if not data:
                self._fail(OUTCOME_GREETING_CLOSED)
                return
            greeting = self.greeting = self.greeting + data
            end = greeting.find(b"\n", 0, MAX_GREETING_LINE)
            if end >= 0:
                break
            if len(greeting) >= MAX_GREETING_LINE:
                self._fail(OUTCOME_GREETING_TOO_LONG)
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
        self._fail(f"{OUTCOME_GREETING_MISMATCH}:{word.group().decode() if word else '?'}")

    def is_new(self, now: float) -> bool:
        return self.state != _OVER

    def on_tick(self, now: float) -> None:
        state = self.state
        if state == _OVER:
            self.dial.reactor.ticking.discard(self)
            return
        if now >= self.deadline:
            if state == _CONNECTING:
                self._fail(OUTCOME_FAILOVER_TIMEOUT if self.cut else OUTCOME_TIMEOUT)
            else:
                self._fail(OUTCOME_FAILOVER_TIMEOUT if self.cut else OUTCOME_GREETING_TIMEOUT)
        elif not self.slow and now - self.started >= SLOW_AFTER:
            self.slow = True
            self.dial.owner.dial_slow()

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
