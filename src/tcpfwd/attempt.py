"""One connection attempt to one address of one backend, on a raw non-blocking socket.

An `Attempt` is watched by the reactor until it connects, fails or times out (its
connect timeout, or less where the failover deadline is nearer). Where the service
expects a greeting, "connects" means the backend's first line arrived and matched: it
is kept for the client, whose own bytes wait in its socket meanwhile; a backend that
closes, resets, stays silent or greets otherwise is a failed attempt like a refusal.

A backend with ``send_proxy`` gets the session's PROXY header in one write as soon as it
is connected, before any byte of the client and before its greeting is awaited (Postfix
sends none until it has the header). Each failure is worded by an `Outcome` (or by its
errno, lower-cased) for the session's log line and for passive health.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
import time
from typing import TYPE_CHECKING, Final

from .config import format_hostport
from .reactor import ERR, HUP, IN, RDHUP, RawSocket, shared_address
from .relay import BACKEND_EVENTS
from .transparent import TransparentBindError, transparent_socket
from .vocabulary import HostPort, Outcome

if TYPE_CHECKING:
    from .dialer import Dial
    from .service import Target

log = logging.getLogger("tcpfwd")

# Outcomes that say nothing about the backend's health: the failover deadline cut the
# attempt short, or our own socket could not be bound to the client's address.
NOT_THE_BACKENDS: Final = frozenset({Outcome.FAILOVER_TIMEOUT, Outcome.TRANSPARENT_BIND})

# A greeting's first line must end within this many bytes.
MAX_GREETING_LINE: Final = 512
_GREETING_READ: Final = MAX_GREETING_LINE * 8
_FIRST_WORD = re.compile(rb"[A-Za-z0-9+*.-]{1,16}")

# Below this, an attempt could not even complete a loopback handshake: do not start it.
MIN_ATTEMPT_TIME: Final = 0.001

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

# An attempt's states.
CONNECTING: Final = 1
GREETING_WAIT: Final = 2
OVER: Final = 3


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


SHORTAGE_WORDS: Final = frozenset(describe_errno(code) for code in SHORTAGE_ERRORS)


class Attempt:
    """One connection to one address of one backend, until it is joined or fails.

    An attempt lives for a moment, once or more per connection: its many flags are
    class attributes that an instance overrides only when one changes, rather than
    slots that every attempt would set.
    """

    state = CONNECTING
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
        if self.state != CONNECTING:
            if self.state == GREETING_WAIT:
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
            self.state = GREETING_WAIT
            now = time.monotonic()
            budget, self.cut = dial.budget(greeting.timeout, now)
            self.deadline = now + budget
            if events & (IN | RDHUP):
                self._greeting_read()
            return
        self.readable = bool(events & (IN | RDHUP))
        self.state = OVER
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
            self.state = OVER
            self.dial.reactor.ticking.discard(self)
            # What followed the line may not all have been read, and its event came.
            self.readable = True
            self.dial.attempt_connected(self)
            return
        word = _FIRST_WORD.match(line)
        self._fail(f"{Outcome.GREETING_MISMATCH}:{word.group().decode() if word else '?'}")

    def is_new(self, now: float) -> bool:
        return self.state != OVER

    def on_tick(self, now: float) -> None:
        state = self.state
        if state == OVER:
            self.dial.reactor.ticking.discard(self)
            return
        if now >= self.deadline:
            if state == CONNECTING:
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
        if self.state != OVER:
            self._fail(type(error).__name__.lower())

    def _fail(self, outcome: str) -> None:
        self.abandon()
        self.dial.attempt_failed(self, outcome)

    def abandon(self) -> None:
        """Close the connection (it failed, or its session is gone)."""
        self.state = OVER
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
