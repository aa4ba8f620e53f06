"""The daemon's lifecycle: listen, serve, stop gracefully.

Startup binds every listening socket before accepting on any, so a configuration that
cannot be served fails as a whole with one clear line. A stop request (SIGTERM/SIGINT)
closes the listeners at once, lets live sessions finish for the grace period, then ends
what is left; a second request ends them at once.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import socket
import time
from collections.abc import Callable

from .accesslog import AccessLog
from .config import Config
from .listener import Listener, ListenError, open_listening_sockets
from .session import ServiceRuntime, Session
from .splice import (
    DESCRIPTORS_PER_SESSION,
    PIPE_POOL_MAX,
    RELAY_SPLICE,
    PipePool,
    choose_relay,
    splice_available,
)

log = logging.getLogger("tcpfwd")

__all__ = ["ListenError", "Server", "run"]


def raise_descriptor_limit() -> int:
    """Raise the soft descriptor limit as far as it goes; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def _reserve(limit: int) -> int:
    # Kept free for listeners, logs, resolver and checks.
    return 32 + limit // 20


def pipes_to_keep(limit: int) -> int:
    """How many idle pipes the splice relay may keep: none when descriptors are scarce."""
    return min(PIPE_POOL_MAX, limit // 256)


def session_capacity(limit: int, per_session: int = 2, held: int = 0) -> int:
    """How many sessions ``limit`` descriptors allow.

    A session holds ``per_session`` descriptors (two sockets; the splice relay adds two
    pipes); ``held`` are kept outside sessions (idle pipes). Past this many we stop
    accepting, so extra clients wait in the kernel's queue rather than being accepted
    and then dropped for want of a descriptor towards the backend.
    """
    return max(1, (limit - _reserve(limit) - held) // per_session)


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.access_log = AccessLog(config.log_format)
        self.listeners: list[Listener] = []
        self.sessions: set[Session] = set()
        self._services: dict[Listener, ServiceRuntime] = {}
        limit = raise_descriptor_limit()
        spliced = [s for s in config.services if choose_relay(s.settings.relay) == RELAY_SPLICE]
        # One pool for every service: a pipe is a pipe, whichever service ended with it.
        self.pipes = PipePool(keep=pipes_to_keep(limit) if spliced else 0)
        per_session = DESCRIPTORS_PER_SESSION if spliced else 2
        self.capacity = session_capacity(limit, per_session, held=2 * self.pipes.keep)
        self._at_capacity = False
        self._last_capacity_log = 0.0
        self._stop_requests = 0
        self._stopping: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None

    def bind(self) -> None:
        """Open every listening socket, or none: raises ListenError on the first failure."""
        bound: list[tuple[ServiceRuntime, socket.socket]] = []
        try:
            for service_config in self.config.services:
                service = ServiceRuntime(service_config, self.access_log, self.pipes)
                for address in service_config.listen:
                    for sock in open_listening_sockets(address, service_config.settings.backlog):
                        bound.append((service, sock))
        except ListenError:
            for _service, sock in bound:
                sock.close()
            raise
        for service, sock in bound:
            listener = Listener(sock, self._accepted)
            self.listeners.append(listener)
            self._services[listener] = service

    def _accepted(self, listener: Listener, sock: socket.socket, peer: tuple[str, int]) -> None:
        session = Session(self._services[listener], listener.name, sock, peer)
        self.sessions.add(session)
        session.start(self._session_done)
        if len(self.sessions) >= self.capacity and not self._at_capacity:
            self._at_capacity = True
            for each in self.listeners:
                each.hold()
            now = time.monotonic()
            if now - self._last_capacity_log >= 10.0:
                self._last_capacity_log = now
                log.warning(
                    "%d sessions: descriptor limit reached; new connections wait in the queue",
                    len(self.sessions),
                )

    def _session_done(self, session: Session) -> None:
        self.sessions.discard(session)
        if self._at_capacity and len(self.sessions) < self.capacity:
            self._at_capacity = False
            for listener in self.listeners:
                listener.release()
        if not self.sessions and self._idle is not None:
            self._idle.set()

    def request_stop(self, signame: str = "request") -> None:
        self._stop_requests += 1
        if self._stopping is None:
            return
        if self._stop_requests == 1:
            # Stop accepting before saying so: whoever reads "stopping" may rely on it.
            for listener in self.listeners:
                listener.close()
            log.info(
                "%s received: stopping; live sessions get %ss", signame, self.config.grace_period
            )
        else:
            log.info("%s received again: ending %d live sessions now", signame, len(self.sessions))
            for session in list(self.sessions):
                session.abort()
        self._stopping.set()

    async def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Accept until a stop request, then drain."""
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signal.Signals(signum).name)
        if not self.listeners:
            self.bind()
        for service_config in self.config.services:
            if service_config.settings.relay == RELAY_SPLICE and not splice_available():
                log.warning(
                    "service %s: relay = splice is not available here; using copy",
                    service_config.name,
                )
        for listener in self.listeners:
            listener.start()
            service = self._services[listener]
            log.info("listening on %s for service %s", listener.name, service.name)
        log.info(
            "ready: %d listening sockets, %d services, up to %d sessions",
            len(self.listeners),
            len(self.config.services),
            self.capacity,
        )
        if on_ready is not None:
            on_ready()
        if self._stop_requests:
            self._stopping.set()
        await self._stopping.wait()
        for listener in self.listeners:
            listener.close()
        await self._drain()
        self.pipes.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        log.info("stopped")

    async def _drain(self) -> None:
        assert self._idle is not None
        # Sessions come and go while serving; only the ones left now matter.
        self._idle.clear()
        if not self.sessions:
            return
        log.info("waiting for %d live sessions", len(self.sessions))
        try:
            async with asyncio.timeout(self.config.grace_period):
                await self._idle.wait()
            return
        except TimeoutError:
            log.info("grace period over: ending %d live sessions", len(self.sessions))
        for session in list(self.sessions):
            session.abort()
        # Aborted sessions finish within a loop turn or two; do not wait on a stuck one forever.
        try:
            async with asyncio.timeout(5):
                await self._idle.wait()
        except TimeoutError:
            log.warning("%d sessions did not end after abort", len(self.sessions))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (Linux, macOS), asyncio's own loop elsewhere."""
    try:
        import uvloop  # noqa: PLC0415 -- optional, and only the daemon needs it
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run(config: Config) -> None:
    """Bind, serve until stopped; ListenError escapes before anything is served."""
    server = Server(config)
    server.bind()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(server.serve())
