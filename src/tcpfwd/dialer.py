"""The failover sequence: try backends in the order given, return the first that connects.

Each backend is resolved when it is tried, through the shared cache (a name that does not
resolve is a failed attempt, not an error of the daemon), and each address it resolves to
is tried in turn. Where the service expects a greeting, "connects" means the backend's
first line arrived and matched: it waits in the backend endpoint's held bytes (the relay
forwards it later), while the client's bytes wait in the client endpoint; a backend that
closes, resets, stays silent or greets otherwise is a failed attempt like a refusal, and
the client, having received nothing, is moved on transparently.

Every attempt, failed or not, is recorded with its reason for the session's log line, and
each backend's outcome is reported to the caller's `AttemptGate` (passive health).

A backend with ``send_proxy`` gets the session's PROXY header in one write as soon as it
is connected, before any byte of the client and before its greeting is awaited (Postfix
sends none until it has the header).
"""

from __future__ import annotations

import asyncio
import errno
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .config import BackendConfig, ServiceSettings, format_hostport
from .proxy_send import SessionHeaders
from .relay import Endpoint
from .resolver import Addresses, Resolver, is_ip_literal
from .transparent import (
    OUTCOME_TRANSPARENT_BIND,
    TransparentBindError,
    create_transparent_connection,
)

OUTCOME_OK = "ok"
OUTCOME_REFUSED = "refused"
OUTCOME_TIMEOUT = "timeout"
OUTCOME_UNREACHABLE = "unreachable"
OUTCOME_DNS = "dns"
OUTCOME_FAILOVER_TIMEOUT = "failover_timeout"
# The backend is at its max_connections: skipped without a connect.
OUTCOME_FULL = "full"
OUTCOME_GREETING_TIMEOUT = "greeting_timeout"
OUTCOME_GREETING_CLOSED = "greeting_closed"
OUTCOME_GREETING_RESET = "greeting_reset"
OUTCOME_GREETING_TOO_LONG = "greeting_too_long"
# Followed by ":" and the greeting's first word, e.g. "greeting_mismatch:421".
OUTCOME_GREETING_MISMATCH = "greeting_mismatch"

# A greeting's first line must end within this many bytes.
MAX_GREETING_LINE = 512
_FIRST_WORD = re.compile(rb"[A-Za-z0-9+*.-]{1,16}")

# Below this, an attempt could not even complete a loopback handshake: do not start it.
MIN_ATTEMPT_TIME = 0.001
# Measurements use time.monotonic(): uvloop's loop.time() only has millisecond resolution.

_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}


@dataclass(slots=True)
class Attempt:
    backend: str
    address: str
    outcome: str
    elapsed: float
    # Made from the client's address (transparent mode).
    transparent: bool = False


@dataclass(slots=True)
class Connected:
    backend: BackendConfig
    endpoint: Endpoint
    address: str
    local_address: str


class _Timer:
    """``asyncio.timeout`` for one await, without its context manager's per-use cost.

    Every connection dials once, and ``asyncio.timeout`` asks for the running loop and
    the current task again, builds its state machine and reschedules; this holds just
    the timer. As with ``asyncio.timeout``, the task is cancelled when time is up, and
    ``stop`` says whether a cancellation the task then sees was ours (``expired``):
    ours is taken back, so only an outside cancellation stays one.
    """

    __slots__ = ("_cancelling", "_handle", "_task", "expired", "fired")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], delay: float):
        self._task = task
        self._cancelling = task.cancelling()
        self.fired = False
        self.expired = False
        self._handle = loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self.fired = True
        self._task.cancel()

    def stop(self) -> None:
        self._handle.cancel()
        if self.fired:
            # Our cancellation, unless an outside one is also pending (that one wins).
            self.expired = self._task.uncancel() <= self._cancelling


class AttemptGate(Protocol):
    """What the dialer asks of its caller about each backend it tries."""

    def acquire(self, backend: BackendConfig) -> bool:
        """Reserve a connection slot (max_connections); False: the backend is full."""

    def release(self, backend: BackendConfig) -> None:
        """Give back a slot whose attempt failed (a connected one is the caller's)."""

    def succeeded(self, backend: BackendConfig) -> None: ...

    def failed(self, backend: BackendConfig, reason: str) -> None: ...


def describe_failure(error: BaseException) -> str:
    """A short, stable word for why a connect failed, as it appears in the log."""
    if isinstance(error, TransparentBindError):
        return OUTCOME_TRANSPARENT_BIND
    if isinstance(error, TimeoutError):
        return OUTCOME_TIMEOUT
    if isinstance(error, ConnectionRefusedError):
        return OUTCOME_REFUSED
    if isinstance(error, socket.gaierror):
        return OUTCOME_DNS
    if isinstance(error, OSError) and error.errno is not None:
        if error.errno in _UNREACHABLE:
            return OUTCOME_UNREACHABLE
        return errno.errorcode.get(error.errno, str(error.errno)).lower()
    return type(error).__name__


SocketOptions = tuple[tuple[int, int, int], ...]


def socket_options(settings: ServiceSettings) -> SocketOptions:
    """The (level, option, value) triples ``configure_socket`` applies, worked out once.

    TCP_NODELAY is not among them: uvloop and asyncio both set it on every TCP transport
    they create, for accepted and connected sockets alike, so setting it here as well
    cost two system calls per session and changed nothing.
    """
    options: list[tuple[int, int, int]] = []
    if settings.keepalive:
        options.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
        if hasattr(socket, "TCP_KEEPIDLE"):
            options += [
                (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, int(settings.keepalive_idle)),
                (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, int(settings.keepalive_interval)),
                (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, settings.keepalive_count),
            ]
    return tuple(options)


def configure_socket(sock: socket.socket | object, options: SocketOptions) -> None:
    """Apply a service's TCP options (``socket_options``) to either side of a session.

    ``sock`` may be a transport's stand-in for its socket (uvloop's ``PseudoSocket``),
    whose ``setsockopt`` costs several times a real socket's: its descriptor is wrapped
    in a socket object of our own for the calls, and let go (not closed) after.
    """
    if not options:
        return
    if isinstance(sock, socket.socket):
        own = sock
    else:
        fileno = getattr(sock, "fileno", None)
        if fileno is None:
            return
        try:
            own = socket.socket(getattr(sock, "family", -1), socket.SOCK_STREAM, 0, fileno())
        except (OSError, ValueError):
            # Already closed (a descriptor of -1): nothing left to configure.
            return
    try:
        for level, option, value in options:
            own.setsockopt(level, option, value)
    except OSError:
        # The peer may already be gone; the relay will find out and say so.
        pass
    finally:
        if own is not sock:
            own.detach()


class Dialer:
    """Connects to a service's backends in a given order, within the service's timeouts."""

    def __init__(self, settings: ServiceSettings, resolver: Resolver) -> None:
        self.settings = settings
        self._resolver = resolver
        self._local_addr = (settings.source_address, 0) if settings.source_address else None
        self.socket_options = socket_options(settings)
        greeting = settings.greeting
        self._greeting = re.compile(greeting.expect.encode("utf-8")) if greeting else None

    async def connect(
        self,
        backends: Sequence[BackendConfig],
        attempts: list[Attempt],
        gate: AttemptGate,
        *,
        headers: SessionHeaders | None = None,
    ) -> Connected | None:
        """Try ``backends`` in order; record every attempt in ``attempts``.

        A connected backend keeps the slot ``gate.acquire`` gave it; the caller releases it.
        ``headers`` gives the PROXY header for backends with ``send_proxy``; without it
        (no client to describe) no header is sent.
        """
        settings = self.settings
        deadline = None
        if settings.failover_timeout is not None:
            deadline = time.monotonic() + settings.failover_timeout
        for backend in backends:
            if deadline is not None and deadline <= time.monotonic():
                attempts.append(
                    Attempt(backend.name, str(backend.address), OUTCOME_FAILOVER_TIMEOUT, 0.0)
                )
                return None
            if not gate.acquire(backend):
                attempts.append(Attempt(backend.name, str(backend.address), OUTCOME_FULL, 0.0))
                continue
            connected: Connected | None = None
            try:
                connected, reason = await self._connect_backend(
                    backend, deadline, attempts, headers=headers
                )
            finally:
                if connected is None:
                    gate.release(backend)
            if connected is not None:
                gate.succeeded(backend)
                return connected
            # Cut short by the failover deadline, or our own socket could not be bound to
            # the client's address: says nothing about the backend's health.
            if reason not in (OUTCOME_FAILOVER_TIMEOUT, OUTCOME_TRANSPARENT_BIND):
                gate.failed(backend, reason)
        return None

    async def _connect_backend(
        self,
        backend: BackendConfig,
        deadline: float | None,
        attempts: list[Attempt],
        *,
        headers: SessionHeaders | None,
    ) -> tuple[Connected | None, str]:
        """Every address of one backend in turn; the connection, or the last failure."""
        host, port = backend.address.host, backend.address.port
        addresses: Addresses
        if is_ip_literal(host):
            # Nothing to look up, so no timer to arm and no coroutine to run.
            addresses = ((host, port),)
        else:
            started = time.monotonic()
            budget, cut = self._budget(self.settings.connect_timeout, started, deadline)
            try:
                async with asyncio.timeout(budget):
                    addresses = await self._resolver.resolve(host, port, self.settings.dns_ttl)
            except (OSError, TimeoutError) as error:
                if isinstance(error, TimeoutError):
                    outcome = OUTCOME_FAILOVER_TIMEOUT if cut else OUTCOME_DNS
                else:
                    outcome = describe_failure(error)
                attempts.append(
                    Attempt(backend.name, str(backend.address), outcome, time.monotonic() - started)
                )
                return None, outcome
        reason = OUTCOME_FAILOVER_TIMEOUT
        for ip, ip_port in addresses:
            connected, reason = await self._connect_one(
                backend, ip, ip_port, deadline, attempts, headers=headers
            )
            if connected is not None or reason == OUTCOME_FAILOVER_TIMEOUT:
                return connected, reason
        return None, reason

    @staticmethod
    def _budget(timeout: float, now: float, deadline: float | None) -> tuple[float, bool]:
        """The time an attempt may take, and whether the failover deadline cut it."""
        if deadline is not None and deadline - now < timeout:
            return max(deadline - now, 0.0), True
        return timeout, False

    async def _connect_one(
        self,
        backend: BackendConfig,
        ip: str,
        port: int,
        deadline: float | None,
        attempts: list[Attempt],
        *,
        headers: SessionHeaders | None,
    ) -> tuple[Connected | None, str]:
        loop = asyncio.get_running_loop()
        settings = self.settings
        address = format_hostport(ip, port)
        started = time.monotonic()
        budget, cut = self._budget(settings.connect_timeout, started, deadline)
        if budget < MIN_ATTEMPT_TIME:
            attempts.append(Attempt(backend.name, address, OUTCOME_FAILOVER_TIMEOUT, 0.0))
            return None, OUTCOME_FAILOVER_TIMEOUT
        task = asyncio.current_task(loop)
        assert task is not None
        # Transparent mode: from the client's address (the session's, PROXY-named if so).
        client_ip = headers.source[0] if backend.transparent and headers is not None else None
        timer = _Timer(loop, task, budget)
        try:
            try:
                if client_ip is not None:
                    transport, endpoint = await create_transparent_connection(
                        loop, lambda: Endpoint("backend", settings.buffer_size), ip, port, client_ip
                    )
                else:
                    transport, endpoint = await loop.create_connection(
                        lambda: Endpoint("backend", settings.buffer_size),
                        ip,
                        port,
                        local_addr=self._local_addr,
                    )
            finally:
                timer.stop()
        except asyncio.CancelledError:
            if not timer.expired:
                raise
            outcome = OUTCOME_FAILOVER_TIMEOUT if cut else OUTCOME_TIMEOUT
            attempts.append(Attempt(backend.name, address, outcome, time.monotonic() - started))
            return None, outcome
        except OSError as error:
            outcome = describe_failure(error)
            if cut and outcome == OUTCOME_TIMEOUT:
                outcome = OUTCOME_FAILOVER_TIMEOUT
            attempts.append(Attempt(backend.name, address, outcome, time.monotonic() - started))
            return None, outcome
        if backend.send_proxy is not None and headers is not None:
            # First and whole: receivers read the header from their first recv().
            transport.write(headers.for_backend(backend.send_proxy))
        if self._greeting is not None:
            try:
                refused = await self._await_greeting(endpoint, deadline)
            except BaseException:
                # Cancelled (the client left): do not leak the backend connection.
                endpoint.abort()
                raise
            if refused is not None:
                endpoint.abort()
                attempts.append(Attempt(backend.name, address, refused, time.monotonic() - started))
                return None, refused
        attempts.append(
            Attempt(
                backend.name, address, OUTCOME_OK, time.monotonic() - started, client_ip is not None
            )
        )
        configure_socket(transport.get_extra_info("socket"), self.socket_options)
        sockname = transport.get_extra_info("sockname")
        local = format_hostport(str(sockname[0]), int(sockname[1])) if sockname else "?"
        return Connected(backend, endpoint, address, local), OUTCOME_OK

    async def _await_greeting(self, endpoint: Endpoint, deadline: float | None) -> str | None:
        """Wait for the backend's first line; None if it matches, else why not.

        The line stays in ``endpoint.held``: the relay forwards it to the client.
        """
        assert self._greeting is not None and self.settings.greeting is not None
        loop = asyncio.get_running_loop()
        budget, cut = self._budget(self.settings.greeting.timeout, time.monotonic(), deadline)
        wake: asyncio.Future[None] = loop.create_future()

        def changed() -> None:
            if not wake.done():
                wake.set_result(None)

        endpoint.on_change = changed
        try:
            async with asyncio.timeout(budget):
                while True:
                    end = endpoint.held.find(b"\n", 0, MAX_GREETING_LINE)
                    if end >= 0:
                        break
                    if len(endpoint.held) >= MAX_GREETING_LINE:
                        return OUTCOME_GREETING_TOO_LONG
                    if endpoint.lost:
                        return OUTCOME_GREETING_RESET if endpoint.error else OUTCOME_GREETING_CLOSED
                    if endpoint.eof:
                        return OUTCOME_GREETING_CLOSED
                    await wake
                    wake = loop.create_future()
        except TimeoutError:
            return OUTCOME_FAILOVER_TIMEOUT if cut else OUTCOME_GREETING_TIMEOUT
        finally:
            endpoint.on_change = None
        line = bytes(endpoint.held[: end + 1])
        if self._greeting.search(line):
            return None
        word = _FIRST_WORD.match(line)
        return f"{OUTCOME_GREETING_MISMATCH}:{word.group().decode() if word else '?'}"
