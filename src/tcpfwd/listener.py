"""Listening sockets and the accept loop.

The accept loop is ours rather than the event loop's ``create_server``: it runs on the
data plane's reactor, hands each accepted socket to the daemon without building a
transport, and handles running out of file descriptors: the listening socket stays
readable while the queue is full, so on EMFILE/ENFILE we stop watching it and come back
after a pause that grows while the shortage lasts, instead of spinning on it or closing
it. A listener can also be held (no accepting at all: new clients wait in the kernel's
queue) and rate-limited (``accept_rate``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .config import Address, format_hostport
from .reactor import IN, RawSocket, shared_address
from .vocabulary import HostPort

if TYPE_CHECKING:
    from .reactor import Reactor

log = logging.getLogger("tcpfwd")

# How many connections one readiness event may accept before other work gets a turn.
ACCEPT_BATCH = 64
# Pause after running out of descriptors: doubles while the shortage lasts, up to the max.
FD_SHORTAGE_PAUSE = 0.05
FD_SHORTAGE_MAX_PAUSE = 1.0
_FD_SHORTAGE = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# Errors about one connection that died in the queue: skip it, keep accepting.
_PER_CONNECTION = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ECONNRESET}


class ListenError(Exception):
    """A listening socket could not be opened; the message is for the operator."""


def open_listening_sockets(
    address: Address, backlog: int, *, reuse_port: bool = False
) -> list[socket.socket]:
    """Bind every address ``address`` stands for (all interfaces, or each a name has).

    ``reuse_port``: several workers bind the same address, each its own accept queue.
    """
    host = address.host or None
    try:
        infos = socket.getaddrinfo(
            host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise ListenError(f"cannot listen on {address}: {error.strerror}") from None
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, _type, proto, _name, sockaddr in infos:
            if (family, sockaddr[0]) in seen:
                continue
            seen.add((family, sockaddr[0]))
            sock = socket.socket(family, socket.SOCK_STREAM, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # One socket per family, as for 0.0.0.0 and :: side by side.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
                sock.listen(backlog)
            except OSError as error:
                shown = format_hostport(str(sockaddr[0]), address.port)
                raise ListenError(f"cannot listen on {shown}: {error.strerror}") from None
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Listener:
    """Accepts connections on one bound socket and hands each to ``on_connection``."""

    def __init__(
        self,
        sock: socket.socket,
        on_connection: Callable[[Listener, RawSocket, HostPort], None],
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self._family = sock.family
        self._on_connection = on_connection
        sockname = sock.getsockname()
        self.name = format_hostport(str(sockname[0]), int(sockname[1]))
        # The address connections arrive on; None for a wildcard (any address of ours).
        self.address: HostPort | None = (
            None if sockname[0] in ("0.0.0.0", "::") else (sockname[0], sockname[1])
        )
        # The service whose clients this listener takes (set by the daemon).
        self.service: Any = None
        self._reactor: Reactor | None = None
        self._watching = False
        self._retry: asyncio.TimerHandle | None = None
        self._pause = FD_SHORTAGE_PAUSE
        self._last_shortage_log = 0.0
        self._held = False
        self.started = False
        self.closed = False
        # Accept-rate limit as a token bucket holding at most one second's worth.
        self._rate: float | None = None
        self._tokens = 0.0
        self._refilled = 0.0

    def __repr__(self) -> str:
        return f"Listener({self.name})"

    def set_rate(self, rate: float | None) -> None:
        """At most ``rate`` new connections a second; the rest wait in the listen queue."""
        self._rate = rate
        self._tokens = max(1.0, rate or 0.0)
        self._refilled = time.monotonic()

    def _may_accept(self) -> bool:
        """Whether the rate limit allows one more now; if not, come back when it does."""
        rate = self._rate
        if rate is None:
            return True
        now = time.monotonic()
        self._tokens = min(max(1.0, rate), self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens >= 1.0:
            return True
        self._unwatch()
        self._retry_in((1.0 - self._tokens) / rate)
        return False

    def _retry_in(self, delay: float) -> None:
        assert self._reactor is not None
        if self._retry is not None:
            self._retry.cancel()
        self._retry = self._reactor.loop.call_later(delay, self._watch)

    def start(self, reactor: Reactor) -> None:
        self._reactor = reactor
        self.started = True
        self._watch()

    def _watch(self) -> None:
        self._retry = None
        if self.closed or self._held or self._watching or self._reactor is None:
            return
        self._reactor.add(self.fd, IN, self)
        self._watching = True

    def _unwatch(self) -> None:
        if self._watching and self._reactor is not None:
            self._reactor.remove(self.fd)
        self._watching = False

    def hold(self) -> None:
        """Stop accepting for now: new connections wait in the kernel's queue."""
        self._held = True
        self._unwatch()

    def release(self) -> None:
        self._held = False
        if self._retry is None:
            self._watch()

    @property
    def held(self) -> bool:
        return self._held

    def on_event(self, fd: int, events: int) -> None:
        family = self._family
        accept = self.sock._accept  # type: ignore[attr-defined]
        on_connection = self._on_connection
        rated = self._rate is not None
        for _ in range(ACCEPT_BATCH):
            if self._held or self.closed or (rated and not self._may_accept()):
                return
            try:
                # socket.accept() would work out the new socket's type from the listener
                # through enum conversions; the listener's family and SOCK_STREAM say it.
                conn_fd, peer = accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                if error.errno in _FD_SHORTAGE:
                    self._pause_for_shortage(error)
                    return
                if error.errno in _PER_CONNECTION:
                    continue
                log.error("accept on %s failed: %s", self.name, error)
                self._pause_for_shortage(error)
                return
            # Left in blocking mode: the data plane never waits on it (see DONTWAIT).
            conn = RawSocket(family, socket.SOCK_STREAM, 0, conn_fd)
            if rated:
                self._tokens -= 1.0
            try:
                host = peer[0]
                on_connection(self, conn, (shared_address(host), peer[1]))
            except Exception:
                log.exception("connection from %s on %s could not be started", peer, self.name)
                conn.close()
        self._pause = FD_SHORTAGE_PAUSE

    def on_failure(self, error: BaseException) -> None:
        """Nothing to clean up: the next readiness event accepts again."""

    def _pause_for_shortage(self, error: OSError) -> None:
        self._unwatch()
        now = time.monotonic()
        if now - self._last_shortage_log >= 10.0:
            self._last_shortage_log = now
            log.warning(
                "accept on %s paused: %s; new connections wait in the queue", self.name, error
            )
        self._retry_in(self._pause)
        self._pause = min(self._pause * 2, FD_SHORTAGE_MAX_PAUSE)

    def close(self) -> None:
        """Stop accepting; connections already accepted are not touched."""
        if self.closed:
            return
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
        self._unwatch()
        self.sock.close()
