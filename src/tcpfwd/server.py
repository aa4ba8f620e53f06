"""The daemon's lifecycle: listen, serve, reload, stop gracefully.

Startup binds every listening socket (or takes them from systemd) before accepting on
any, so a configuration that cannot be served fails as a whole with one clear line.

SIGHUP reloads: the new configuration is read and validated in full first; any error
keeps the running configuration. Listening sockets of addresses still configured stay
open (nothing queued on them is lost), new ones are bound, removed ones closed; new
connections use the new settings while sessions in flight finish with the ones they
started with.

SIGTERM/SIGINT closes the listeners at once, lets live sessions finish for the grace
period, then ends what is left; a second signal ends them at once. SIGUSR1 reopens log
files. Signal handlers only note what was asked; the work happens in the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import grp
import logging
import os
import pwd
import resource
import signal
import socket
import time
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from . import __version__
from .accesslog import AccessLog, configure_logging, reopen_log_files
from .config import Address, Config, ConfigError
from .dialer import OUTCOME_OK, apply_options
from .health import HealthTable
from .history import HistorySampler, ServiceSample, service_sample
from .listener import Listener, ListenError, open_listening_sockets
from .metrics import DaemonFigures, service_summary
from .monitor import HealthKey, HealthMonitor
from .reactor import RawSocket, Reactor
from .resolver import Resolver
from .service import (
    ADMIN_DISABLED,
    ADMIN_ENABLED,
    DaemonState,
    ServiceRuntime,
)
from .session import Session, turn_away
from .splice import (
    DESCRIPTORS_PER_SESSION,
    PIPE_POOL_MAX,
    RELAY_SPLICE,
    PipePool,
    choose_relay,
    splice_available,
)
from .systemd import Notifier, inherited_sockets
from .transparent import capability_problem

# Imported up front, not when the loop is made: after dropping privileges the
# interpreter's own files may no longer be readable.
_uvloop: ModuleType | None
try:
    import uvloop as _uvloop
except ImportError:  # pragma: no cover - platforms without uvloop
    _uvloop = None

if TYPE_CHECKING:
    from .admin import AdminServer

log = logging.getLogger("tcpfwd")

__all__ = ["ListenError", "Server", "run"]

STATUS_INTERVAL = 5.0


# What identifies a listening address across reloads: the address itself, except that
# "any port" (0) is a different socket for every service that asks for one.
ListenKey = tuple[str, Address]


def listen_key(service: str, address: Address) -> ListenKey:
    return (service if address.port == 0 else "", address)


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


def pipe_budget(limit: int) -> int:
    """How many pipes the splice relay may have open at once (in use or idle).

    A pipe is held only while its direction has bytes in flight, so this bounds the
    busy directions spliced at the same moment; beyond it, chunks are copied. A 64th of
    the descriptors keeps idle sessions' capacity close to the copy relay's.
    """
    return limit // 64


def pipes_to_keep(limit: int) -> int:
    """How many idle pipes the splice relay may keep: none when descriptors are scarce."""
    return min(PIPE_POOL_MAX, limit // 256, pipe_budget(limit))


def session_capacity(limit: int, per_session: int = 2, held: int = 0) -> int:
    """How many sessions ``limit`` descriptors allow.

    A session holds ``per_session`` descriptors (two sockets; the splice relay adds two
    pipes); ``held`` are kept outside sessions (idle pipes). Past this many we stop
    accepting, so extra clients wait in the kernel's queue rather than being accepted
    and then dropped for want of a descriptor towards the backend.
    """
    return max(1, (limit - _reserve(limit) - held) // per_session)


def configure_logging_for(config: Config) -> None:
    configure_logging(
        config.log_format,
        config.log_level,
        access_target=config.access_log,
        event_target=config.event_log,
        syslog_facility=config.syslog_facility,
        syslog_address=config.syslog_address,
    )


def drop_privileges(user: str | None, group: str | None) -> None:
    """Become ``user``/``group`` (names or numbers) when running as root."""
    if os.geteuid() != 0 or (user is None and group is None):
        return
    try:
        uid = int(user) if user and user.isdigit() else pwd.getpwnam(user).pw_uid if user else None
        if group is not None:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        elif user is not None:
            gid = pwd.getpwuid(uid).pw_gid if uid is not None else os.getgid()
        else:
            gid = os.getgid()
    except KeyError as error:
        raise ListenError(f"cannot switch user: no such user or group {error}") from None
    try:
        os.setgroups([gid])
        os.setgid(gid)
        if uid is not None:
            os.setuid(uid)
    except OSError as error:
        raise ListenError(f"cannot switch to user {user} group {group}: {error.strerror}") from None


class Server:
    def __init__(
        self,
        config: Config,
        *,
        reload_config: Callable[[], Config] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self._reload_config = reload_config
        self.notifier = notifier or Notifier()
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
        self.started = time.time()
        self.admin: AdminServer | None = None
        self._admin_sock: socket.socket | None = None
        # Listening sockets by the configured address they serve (one address may need
        # several sockets: every interface, or every address of a name).
        self.listeners: dict[ListenKey, list[Listener]] = {}
        self.capacity = self._capacity_for(config)
        self._last_capacity_log = 0.0
        self._inherited: list[socket.socket] = []
        # A worker's listening sockets, bound by its supervisor (workers.py), by address.
        self.given: dict[ListenKey, list[socket.socket]] = {}
        # Workers leave the admin endpoint to their supervisor, and bind what it did not
        # give them (an address added to the file meanwhile) in its SO_REUSEPORT group.
        self.serve_admin = True
        self.reuse_port = False
        self._stop_requests = 0
        self._stopping: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._reloading = False
        self._serving = False
        # The last hour for the status page; sampled only where an admin endpoint shows it.
        self.history = HistorySampler(self._history_samples, time.time)

    @property
    def sessions(self) -> set[Session]:
        return self.daemon.sessions

    def _capacity_for(self, config: Config) -> int:
        spliced = any(choose_relay(s.settings.relay) == RELAY_SPLICE for s in config.services)
        # Every pipe the pool may open holds two descriptors, whichever session uses it.
        pipes = self.pipes.limit if self.pipes.limit is not None else self.pipes.keep
        return session_capacity(
            self._fd_limit, DESCRIPTORS_PER_SESSION, held=2 * pipes if spliced else 0
        )

    # --- listening sockets -----------------------------------------------------------

    def _open(self, key: ListenKey, address: Address, backlog: int) -> list[socket.socket]:
        """Sockets for ``address``: given by a supervisor, inherited from systemd, or bound."""
        given = self.given.pop(key, None)
        if given is not None:
            return given
        for sock in self._inherited:
            if _serves(sock, address):
                self._inherited.remove(sock)
                return [sock]
        return open_listening_sockets(address, backlog, reuse_port=self.reuse_port)

    def bind(self) -> None:
        """Open every listening socket, or none: raises ListenError on the first failure."""
        self._inherited = inherited_sockets()
        opened = self._bind_new(self.config, set())
        for sock in self._inherited:
            log.warning("socket %s passed by systemd is not configured; closing it", _name(sock))
            sock.close()
        self._inherited = []
        admin = self.config.admin
        if admin.listen is not None and self.serve_admin:
            try:
                # One socket is enough for an endpoint meant for one management address.
                first, *extra = open_listening_sockets(admin.listen, 64)
                for sock in extra:
                    sock.close()
                self._admin_sock = first
            except ListenError:
                for socks in opened.values():
                    for sock in socks:
                        sock.close()
                raise
        self._install(self.config, opened)

    def _bind_new(
        self, config: Config, existing: set[ListenKey]
    ) -> dict[ListenKey, list[socket.socket]]:
        opened: dict[ListenKey, list[socket.socket]] = {}
        try:
            for service in config.services:
                for address in service.listen:
                    key = listen_key(service.name, address)
                    if key not in existing and key not in opened:
                        opened[key] = self._open(key, address, service.settings.backlog)
        except ListenError:
            for socks in opened.values():
                for sock in socks:
                    sock.close()
            raise
        return opened

    def _install(self, config: Config, opened: dict[ListenKey, list[socket.socket]]) -> None:
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
        wanted = {listen_key(s.name, a): s for s in config.services for a in s.listen}
        for address in list(self.listeners):
            if address not in wanted:
                for listener in self.listeners.pop(address):
                    listener.close()
                    log.info("no longer listening on %s", listener.name)
        for address, socks in opened.items():
            self.listeners[address] = [Listener(sock, self._accepted) for sock in socks]
        for address, service_config in wanted.items():
            runtime = services[service_config.name]
            for listener in self.listeners[address]:
                if listener.service is None or listener.service.listen_options != (
                    runtime.listen_options
                ):
                    # Accepted sockets inherit these: none of them needs its own calls.
                    apply_options(listener.sock, runtime.listen_options)
                listener.service = runtime
                listener.set_rate(service_config.settings.accept_rate)
        self.services = services
        self.config = config
        # A reload may switch relays, and pipes hold descriptors of their own.
        self.capacity = self._capacity_for(config)
        daemon = self.daemon
        daemon.capacity = self.capacity
        daemon.max_connections = config.max_connections
        daemon.set_services(list(services.values()))
        configured = {(s.name, b.name) for s in config.services for b in s.backends}
        for key in [k for k in self.daemon.admin_states if k not in configured]:
            del self.daemon.admin_states[key]
        self.monitor.retain(configured)

    def _start_listeners(self) -> None:
        assert self.reactor is not None
        for address_listeners in self.listeners.values():
            for listener in address_listeners:
                if not listener.started:
                    if self.daemon.is_held(listener.service):
                        listener.hold()
                    listener.start(self.reactor)
                    log.info("listening on %s for service %s", listener.name, listener.service.name)

    def _all_listeners(self) -> list[Listener]:
        return [each for group in self.listeners.values() for each in group]

    # --- connections -----------------------------------------------------------------

    def _accepted(self, listener: Listener, sock: RawSocket, peer: tuple[str, int]) -> None:
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
        daemon = self.daemon
        for listener in self._all_listeners():
            if service is not None and listener.service is not service:
                continue
            if hold:
                listener.hold()
            elif not daemon.is_held(listener.service):
                listener.release()
        if not hold:
            return
        now = time.monotonic()
        if now - self._last_capacity_log >= 10.0:
            self._last_capacity_log = now
            if service is None:
                log.warning(
                    "%d sessions: descriptor limit reached; new connections wait in the queue",
                    len(daemon.sessions),
                )
            else:
                log.warning(
                    "service %s has %d sessions, all the places the other services leave it "
                    "(reserved_connections); its new connections wait in the queue",
                    service.name,
                    service.stats.active,
                )

    # --- reload ----------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the configuration; on any error keep the running one. True if applied."""
        if self._reload_config is None:
            log.warning("reload asked, but the configuration came from the command line")
            return False
        if self._stop_requests:
            return False
        self.notifier.reloading()
        try:
            applied = self._reload()
        finally:
            self.notifier.ready(self._status_text())
        return applied

    def _reload(self) -> bool:
        assert self._reload_config is not None
        try:
            config = self._reload_config()
        except ConfigError as error:
            for line in error.report().splitlines():
                log.error("reload: %s", line)
            log.error(
                "reload rejected (%d errors); the running configuration is kept", len(error.issues)
            )
            return False
        problem = capability_problem(config)
        if problem is not None:
            log.error("reload rejected: %s; the running configuration is kept", problem)
            return False
        try:
            opened = self._bind_new(config, set(self.listeners))
        except ListenError as error:
            log.error("reload rejected: %s; the running configuration is kept", error)
            return False
        logging_changed = _logging_settings(config) != _logging_settings(self.config)
        if logging_changed:
            try:
                configure_logging_for(config)
            except OSError as error:
                for socks in opened.values():
                    for sock in socks:
                        sock.close()
                configure_logging_for(self.config)
                log.error("reload rejected: cannot open log: %s", error)
                return False
            # Every service shares this one object, so all of them switch format at once.
            self.access_log.set_format(config.log_format)
        if config.workers != self.config.workers:
            log.warning(
                "reload: workers = %d needs a restart; still %d",
                config.workers,
                self.config.workers,
            )
        before = {s.name: s.config for s in self.services.values()}
        self._install(config, opened)
        for key, group in self.listeners.items():
            for listener in group:
                listener.sock.listen(self._backlog_of(key))
        self._start_listeners()
        after = {s.name: s.config for s in self.services.values()}
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        changed = sorted(n for n in set(after) & set(before) if after[n] != before[n])
        log.info(
            "reloaded %s: services added %s, removed %s, changed %s; %d live sessions untouched",
            config.source,
            ",".join(added) or "-",
            ",".join(removed) or "-",
            ",".join(changed) or "-",
            len(self.sessions),
        )
        return True

    def _backlog_of(self, key: ListenKey) -> int:
        for service in self.config.services:
            if any(listen_key(service.name, a) == key for a in service.listen):
                return service.settings.backlog
        return 511

    def _check_done(self, key: HealthKey, seconds: float) -> None:
        runtime = self.services.get(key[0])
        if runtime is not None:
            runtime.stats.backend(key[1]).check_seconds.observe(seconds)

    # --- what the admin endpoint reads and changes --------------------------------------

    @property
    def ready(self) -> bool:
        return self._serving and not self._stop_requests

    def service_views(self) -> list[ServiceRuntime]:
        return list(self.services.values())

    def set_backend_state(self, service: str, backend: str, state: str) -> str | None:
        runtime = self.services.get(service)
        if runtime is None:
            return f"no service {service!r}"
        if all(b.name != backend for b in runtime.config.backends):
            return f"service {service!r} has no backend {backend!r}"
        if state == ADMIN_ENABLED:
            self.daemon.admin_states.pop((service, backend), None)
            return None
        self.daemon.admin_states[(service, backend)] = state
        if state == ADMIN_DISABLED:
            for session in list(self.sessions):
                target = session.backend
                if session.service.name == service and target and target.name == backend:
                    session.abort()
        return None

    def status(self) -> dict[str, Any]:
        """Everything the status page shows, as JSON-able data."""
        services = []
        for runtime in self.services.values():
            stats = runtime.stats
            backends = []
            for view in runtime.backend_views():
                backend_stats = stats.backend(view.name)
                failed = sum(n for o, n in backend_stats.attempts.items() if o != OUTCOME_OK)
                entry: dict[str, Any] = {
                    "name": view.name,
                    "address": view.address,
                    "health": "up" if view.up else "down",
                    # An attempt to it is overdue: new sessions try it after the others.
                    "suspect": view.suspect,
                    "admin_state": view.admin_state,
                    "active": view.active,
                    "sessions_total": backend_stats.sessions,
                    "failed_attempts": failed,
                    "attempts": dict(backend_stats.attempts),
                }
                health = self.health.get((runtime.name, view.name))
                if health is not None:
                    entry["reason"] = health.last_reason
                    entry["last_change"] = health.last_change
                    if health.last_check_at is not None:
                        result = "ok" if health.last_check_ok else "failed"
                        detail = health.last_check_detail
                        entry["last_check"] = f"{result}: {detail}" if detail else result
                        entry["last_check_at"] = health.last_check_at
                backends.append(entry)
            services.append(
                {
                    "name": runtime.name,
                    "listen": [
                        listener.name
                        for group in self.listeners.values()
                        for listener in group
                        if listener.service is runtime
                    ],
                    "policy": runtime.settings.policy,
                    **service_summary(stats),
                    "backends": backends,
                }
            )
        document = {
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started,
            "uptime_s": time.time() - self.started,
            "state": "serving" if self.ready else "stopping",
            "config": self.config.source,
            "sessions": {"active": len(self.sessions), "capacity": self.capacity},
            "services": services,
            "recent_failovers": list(self.daemon.recent_failovers),
        }
        return self.history.annotate(document)

    def _history_samples(self) -> list[ServiceSample]:
        samples = []
        for runtime in self.services.values():
            backends = []
            for view in runtime.backend_views():
                health = self.health.get((runtime.name, view.name))
                changed = health.last_change if health is not None else None
                reason = health.last_reason if health is not None else None
                backends.append((view.name, view.up, changed, reason))
            samples.append(service_sample(runtime.name, runtime.stats, backends))
        return samples

    def daemon_figures(self) -> DaemonFigures:
        limit = self.config.max_connections
        return DaemonFigures(
            version=__version__,
            started=self.started,
            capacity=self.capacity if limit is None else min(self.capacity, limit),
            service_limits={
                s.name: s.settings.max_connections
                for s in self.config.services
                if s.settings.max_connections is not None
            },
        )

    # --- stop ------------------------------------------------------------------------

    def request_stop(self, signame: str = "request") -> None:
        self._stop_requests += 1
        if self._stopping is None:
            return
        if self._stop_requests == 1:
            # Stop accepting before saying so: whoever reads "stopping" may rely on it.
            for listener in self._all_listeners():
                listener.close()
            self.notifier.stopping()
            log.info(
                "%s received: stopping; live sessions get %ss", signame, self.config.grace_period
            )
        else:
            log.info("%s received again: ending %d live sessions now", signame, len(self.sessions))
            for session in list(self.sessions):
                session.abort()
        self._stopping.set()

    # --- main loop -------------------------------------------------------------------

    def _status_text(self) -> str:
        return f"{len(self.sessions)} live sessions, {len(self.services)} services"

    def _keep_systemd_informed(self) -> None:
        """Watchdog pings and a status line, while serving."""
        loop = asyncio.get_running_loop()
        interval = self.notifier.watchdog_interval or STATUS_INTERVAL

        def tick() -> None:
            if self._stop_requests:
                return
            if self.notifier.watchdog_interval:
                self.notifier.watchdog()
            self.notifier.status(self._status_text())
            loop.call_later(interval, tick)

        loop.call_later(interval, tick)

    async def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Accept until a stop request, then drain."""
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._idle = idle = asyncio.Event()
        self.reactor = self.daemon.reactor = Reactor(loop)
        self.daemon.on_idle = idle.set
        self.access_log.batch_with(self.reactor.after_batch)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signal.Signals(signum).name)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self._reopen_logs)
        if not self.listeners:
            self.bind()
        for service_config in self.config.services:
            if service_config.settings.relay == RELAY_SPLICE and not splice_available():
                log.warning(
                    "service %s: relay = splice is not available here; using copy",
                    service_config.name,
                )
        self._start_listeners()
        log.info(
            "ready: %d listening sockets, %d services, up to %d sessions",
            len(self._all_listeners()),
            len(self.services),
            self.capacity,
        )
        if self._admin_sock is not None:
            # Imported only when wanted: the HTTP stack costs a noticeable start-up time.
            from .admin import AdminServer  # noqa: PLC0415

            self.admin = AdminServer(self, self.config.admin)
            await self.admin.start(self._admin_sock)
            self.history.start()
        self.monitor.start()
        self.notifier.ready(self._status_text())
        if self.notifier.enabled:
            self._keep_systemd_informed()
        self._serving = True
        settle_memory()
        if on_ready is not None:
            on_ready()
        if self._stop_requests:
            self._stopping.set()
        await self._stopping.wait()
        for listener in self._all_listeners():
            listener.close()
        await self._drain()
        if self.admin is not None:
            self.history.stop()
            await self.admin.stop()
        await self.monitor.stop()
        await self.resolver.close()
        self.access_log.batch_with(None)
        self.reactor.close()
        self.reactor = self.daemon.reactor = None
        self.pipes.close()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(signum)
        log.info("stopped")

    def _reopen_logs(self) -> None:
        try:
            count = reopen_log_files()
        except OSError as error:
            log.error("cannot reopen log files: %s", error)
            return
        log.info("SIGUSR1 received: reopened %d log files", count)

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


def _serves(sock: socket.socket, address: Address) -> bool:
    """Whether an inherited listening socket is the one for a configured address."""
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return False
    if port != address.port:
        return False
    if not address.host:
        return host in ("0.0.0.0", "::")
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return any(info[4][0] == host for info in infos)


def _name(sock: socket.socket) -> str:
    try:
        return str(sock.getsockname())
    except OSError:
        return f"fd {sock.fileno()}"


def _logging_settings(config: Config) -> tuple[object, ...]:
    return (
        config.log_format,
        config.log_level,
        config.access_log,
        config.event_log,
        config.syslog_facility,
        config.syslog_address,
    )


# Young-generation collections: sessions allocate a few container objects each and hold
# no reference cycles, so the collector runs far less often than the default 700.
GC_THRESHOLD = (20_000, 20, 20)


def settle_memory() -> None:
    """Once started: what start-up allocated (modules, config, the HTTP stack) is kept
    out of every later collection, and young collections come less often. At thousands
    of connections a second the default settings made the collector a tenth of the
    Python time, most of it walking start-up objects that never die."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (Linux, macOS), asyncio's own loop elsewhere."""
    if _uvloop is None:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = _uvloop.new_event_loop()
    return loop


def write_pid_file(path: str | None) -> None:
    """Write this process's pid to ``path`` (if set); ListenError when it cannot."""
    if not path:
        return
    try:
        with open(path, "w") as stream:
            stream.write(f"{os.getpid()}\n")
    except OSError as error:
        raise ListenError(f"cannot write pid file {path}: {error.strerror}") from None


def require_capabilities(config: Config) -> None:
    """ListenError if ``config`` needs a capability this process lacks.

    Called once privileges are dropped, since switching user drops capabilities too:
    a missing one is one clear line at start, not a failure of every connection.
    """
    problem = capability_problem(config)
    if problem is not None:
        raise ListenError(problem)


def run(config: Config, *, reload_config: Callable[[], Config] | None = None) -> None:
    """Bind, drop privileges, serve until stopped; ListenError escapes before serving."""
    server = Server(config, reload_config=reload_config)
    server.bind()
    pid_file = config.pid_file
    # Written before dropping privileges, as its folder is usually root's.
    write_pid_file(pid_file)
    drop_privileges(config.user, config.group)
    try:
        require_capabilities(config)
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(server.serve())
    finally:
        server.notifier.close()
        if pid_file:
            with contextlib.suppress(OSError):
                os.unlink(pid_file)
