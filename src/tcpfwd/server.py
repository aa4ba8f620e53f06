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
from .health import HealthTable
from .listener import Listener, ListenError, open_listening_sockets
from .monitor import HealthKey, HealthMonitor
from .resolver import Resolver
from .session import ServiceRuntime, Session

log = logging.getLogger("tcpfwd")

__all__ = ["ListenError", "Server", "run"]


def session_capacity() -> int:
    """How many sessions the descriptor limit allows, after raising it as far as it goes.

    Each session holds two descriptors. Past this many we stop accepting, so extra
    clients wait in the kernel's queue rather than being accepted and then dropped for
    want of a descriptor towards the backend. A reserve stays free for listeners,
    logs, resolver and checks.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    reserve = 32 + soft // 20
    return max(1, (soft - reserve) // 2)


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.access_log = AccessLog(config.log_format)
        # The one place backend health lives, keyed by (service, backend name): read by
        # status pages and metrics, and meant to outlive a configuration reload.
        self.health: HealthTable[HealthKey] = HealthTable()
        self.resolver = Resolver()
        self.monitor = HealthMonitor(self.health, self.resolver)
        self.listeners: list[Listener] = []
        self.sessions: set[Session] = set()
        self._services: dict[Listener, ServiceRuntime] = {}
        self.capacity = session_capacity()
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
                service = ServiceRuntime(
                    service_config, self.access_log, self.monitor, self.resolver
                )
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
        self.monitor.start()
        if on_ready is not None:
            on_ready()
        if self._stop_requests:
            self._stopping.set()
        await self._stopping.wait()
        for listener in self.listeners:
            listener.close()
        await self._drain()
        await self.monitor.stop()
        await self.resolver.close()
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
