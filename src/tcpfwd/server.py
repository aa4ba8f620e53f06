"""The single process: a `Daemon` that serves sessions itself.

It is also what each worker runs (worker.py), with its sockets given by the supervisor.

Start-up binds every listening socket (or takes them from systemd) before accepting on
any. On reload, listeners of addresses still configured stay open, new ones are bound,
removed ones closed; new connections use the new settings while sessions in flight
finish with the ones they started with. On stop the listeners close at once and live
sessions get the grace period, then are ended; a second stop request ends them at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from .accesslog import AccessLog
from .binding import ListenKey
from .config import Config
from .daemonstate import DaemonState
from .health import HealthTable, shown_state
from .lifecycle import ConfigDiff, Daemon
from .listener import Listener, ListenError
from .listening import Listeners
from .metrics import DaemonFigures, ServiceStats
from .monitor import HealthKey, HealthMonitor
from .process import (
    pipe_budget,
    pipes_to_keep,
    raise_descriptor_limit,
    session_capacity,
    settle_memory,
)
from .reactor import RawSocket, Reactor
from .resolver import Resolver
from .service import ServiceRuntime
from .session import Session, turn_away
from .splice import DESCRIPTORS_PER_SESSION, PipePool, choose_relay, splice_available
from .status import BackendReading, Overview, ServiceReading, daemon_figures, health_detail
from .vocabulary import AdminState, HostPort, RelayMode

log = logging.getLogger("tcpfwd")

__all__ = ["ListenError", "Server"]

# Turned-away clients at full capacity are logged at most this often.
CAPACITY_LOG_INTERVAL = 10.0
# Aborted sessions finish within a loop turn or two; a stuck one is not waited on longer.
ABORT_WAIT = 5.0

Opened = dict[ListenKey, list[socket.socket]]


class Server(Daemon[Opened]):
    """Listeners, services, sessions and their health, in one process."""

    def __init__(self, config: Config, reload_config: Callable[[], Config] | None = None) -> None:
        super().__init__(config, reload_config)
        self.access_log = AccessLog(config.log_format)
        self._fd_limit = raise_descriptor_limit()
        # One pool for every service: a pipe is a pipe, whichever service ended with it.
        spliceable = splice_available()
        keep = pipes_to_keep(self._fd_limit) if spliceable else 0
        budget = pipe_budget(self._fd_limit) if spliceable else 0
        self.pipes = PipePool(keep=keep, limit=budget)
        self.daemon = DaemonState(self.access_log, self.pipes)
        self.daemon.on_hold = self._hold
        self.reactor: Reactor | None = None
        # The one place backend health lives, keyed by (service, backend name): read by
        # the status page and metrics, and kept across reloads for unchanged backends.
        self.health: HealthTable[HealthKey] = HealthTable()
        self.resolver = Resolver()
        self.monitor = HealthMonitor(self.health, self.resolver, on_check=self._check_done)
        self.services: dict[str, ServiceRuntime] = {}
        self.listeners = Listeners(self._accepted)
        self.capacity = self._capacity_for(config)
        self._last_capacity_log = 0.0
        self._idle: asyncio.Event | None = None

    @property
    def sessions(self) -> set[Session]:
        return self.daemon.sessions

    @property
    def admin_states(self) -> dict[tuple[str, str], AdminState]:
        return self.daemon.admin_states

    def service_stats(self) -> dict[str, ServiceStats]:
        return {name: runtime.stats for name, runtime in self.services.items()}

    def _capacity_for(self, config: Config) -> int:
        spliced = any(choose_relay(s.settings.relay) == RelayMode.SPLICE for s in config.services)
        # Every pipe the pool may open holds two descriptors, whichever session uses it.
        pipes = self.pipes.limit if self.pipes.limit is not None else self.pipes.keep
        return session_capacity(
            self._fd_limit, DESCRIPTORS_PER_SESSION, held=2 * pipes if spliced else 0
        )

    # --- listening sockets and services ----------------------------------------------

    def bind_new(self, config: Config) -> Opened:
        return self.listeners.bind_new(config, self.inherited)

    def discard(self, opened: Opened) -> None:
        for sockets in opened.values():
            for sock in sockets:
                sock.close()

    def install(self, config: Config, opened: Opened) -> None:
        """Make ``config`` the one new connections get: services, listeners and their rates."""
        services: dict[str, ServiceRuntime] = {}
        for service_config in config.services:
            current = self.services.get(service_config.name)
            if current is not None and current.config == service_config:
                services[service_config.name] = current
            else:
                stats = current.stats if current is not None else None
                services[service_config.name] = ServiceRuntime(
                    service_config, self.daemon, self.monitor, self.resolver, stats
                )
        self.listeners.install(config, opened, services)
        self.services = services
        self.config = config
        # A reload may switch relays, and pipes hold descriptors of their own.
        self.capacity = self._capacity_for(config)
        daemon = self.daemon
        daemon.capacity = self.capacity
        daemon.max_connections = config.max_connections
        daemon.set_services(list(services.values()))
        self.monitor.retain(self.forget_unconfigured(config))

    def apply(self, config: Config, opened: Opened, diff: ConfigDiff) -> None:
        # Every service shares this one object, so all of them switch format at once.
        self.access_log.set_format(config.log_format)
        self.install(config, opened)
        self.listeners.relisten(config)
        self._start_listeners()
        log.info(
            "reloaded %s: %s; %d live sessions untouched",
            config.source,
            diff.describe(),
            len(self.sessions),
        )

    def _start_listeners(self) -> None:
        assert self.reactor is not None
        self.listeners.start(self.reactor, self.daemon.is_held)

    # --- connections -----------------------------------------------------------------

    def _accepted(self, listener: Listener, sock: RawSocket, peer: HostPort) -> None:
        service: ServiceRuntime = listener.service
        refused = service.admit(peer, sock, listener.address)
        if refused is not None:
            turn_away(sock)
            service.turned_away(refused[0], peer, refused[1])
            return
        Session(service, listener, sock, peer).start()

    def _hold(self, service: ServiceRuntime | None, hold: bool) -> None:
        """Stop (or resume) accepting: every listener at full capacity, or one
        service's listeners when it has taken what its fair share allows."""
        self.listeners.hold(service, hold, self.daemon.is_held)
        if not hold:
            return
        now = time.monotonic()
        if now - self._last_capacity_log < CAPACITY_LOG_INTERVAL:
            return
        self._last_capacity_log = now
        if service is None:
            log.warning(
                "%d sessions: descriptor limit reached; new connections wait in the queue",
                len(self.sessions),
            )
        else:
            log.warning(
                "service %s has %d sessions, all the places the other services leave it "
                "(reserved_connections); its new connections wait in the queue",
                service.name,
                service.stats.active,
            )

    def _check_done(self, key: HealthKey, seconds: float) -> None:
        runtime = self.services.get(key[0])
        if runtime is not None:
            runtime.stats.backend(key[1]).check_seconds.observe(seconds)

    def backend_state_changed(self, service: str, backend: str, state: AdminState) -> None:
        if state != AdminState.DISABLED:
            return
        for session in list(self.sessions):
            target = session.backend
            if session.service.name == service and target and target.name == backend:
                session.abort()

    # --- phases ----------------------------------------------------------------------

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self.reactor = self.daemon.reactor = Reactor(loop)
        self.daemon.on_idle = self._idle.set
        self.access_log.batch_with(self.reactor.after_batch)
        for service_config in self.config.services:
            if service_config.settings.relay == RelayMode.SPLICE and not splice_available():
                log.warning(
                    "service %s: relay = splice is not available here; using copy",
                    service_config.name,
                )
        self._start_listeners()
        log.info(
            "ready: %d listening sockets, %d services, up to %d sessions",
            len(self.listeners),
            len(self.services),
            self.capacity,
        )
        self.monitor.start()

    async def main_loop(self) -> None:
        settle_memory()
        self.mark_ready()
        await self.stop_asked()
        self.listeners.close()
        await self._drain()

    async def shutdown(self) -> None:
        await self.monitor.stop()
        await self.resolver.close()
        self.access_log.batch_with(None)
        if self.reactor is not None:
            self.reactor.close()
        self.reactor = self.daemon.reactor = None
        self.pipes.close()

    def begin_stop(self, urgent: bool) -> str:
        if not urgent:
            self.listeners.close()
            return f"stopping; live sessions get {self.config.grace_period}s"
        live = len(self.sessions)
        for session in list(self.sessions):
            session.abort()
        return f"ending {live} live sessions now"

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
        try:
            async with asyncio.timeout(ABORT_WAIT):
                await self._idle.wait()
        except TimeoutError:
            log.warning("%d sessions did not end after abort", len(self.sessions))

    def close(self) -> None:
        self.listeners.close()
        self.listeners.close_given()
        super().close()

    # --- what the status shows -------------------------------------------------------

    def status_text(self) -> str:
        return f"{len(self.sessions)} live sessions, {len(self.services)} services"

    def _joined(self) -> set[tuple[str, str]]:
        """(service, backend) of every live session joined to a backend."""
        return {(s.service.name, s.backend.name) for s in self.sessions if s.backend is not None}

    def overview(self) -> Overview:
        joined: set[tuple[str, str]] | None = None
        services = []
        for runtime in self.services.values():
            backends = []
            for target in runtime.targets:
                counted = target.stats
                tried = bool(counted.sessions or counted.attempts)
                if not tried and counted.active:
                    # Its first sessions are live (counted once they end) or still
                    # connecting: tried only if one was joined to it. Rare enough to scan.
                    joined = self._joined() if joined is None else joined
                    tried = (runtime.name, target.name) in joined
                backends.append(
                    BackendReading(
                        name=target.name,
                        address=target.shown,
                        admin_state=runtime.admin_state(target.name),
                        active=counted.active,
                        health=shown_state(target.health, tried),
                        suspect=runtime.suspect(target),
                        detail=health_detail(target.health),
                    )
                )
            services.append(
                ServiceReading(
                    name=runtime.name,
                    policy=runtime.settings.policy,
                    listen=self.listeners.names(runtime),
                    stats=runtime.stats,
                    backends=backends,
                )
            )
        return Overview(
            services=services,
            sessions={"active": len(self.sessions), "capacity": self.capacity},
            recent_failovers=list(self.daemon.recent_failovers),
        )

    def daemon_figures(self) -> DaemonFigures:
        return daemon_figures(self.config, self.started, [self.capacity])
