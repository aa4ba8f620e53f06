"""The daemon core: start-up, serve, reload and stop, for the single process and the supervisor.

`Daemon` holds what both kinds of daemon do the same way, and leaves them what differs:

- **start-up**: ``bind()`` opens every listening socket (and the admin endpoint's) or
  none, before anything serves, so a configuration that cannot be served fails as a
  whole with one clear line; `run` then writes the pid file, drops privileges and runs
  ``serve()`` in a new event loop. ``serve()`` goes through the phases ``startup()``,
  ``main_loop()`` and ``shutdown()`` with the daemon's signals handled (signals.py) and
  the admin endpoint up around the main loop.
- **ready**: ``mark_ready()`` tells systemd (READY=1, then STATUS and watchdog pings).
- **reload** (SIGHUP): one step for both. The file is read and validated in full, the
  capabilities it needs checked, its new listen addresses bound and the log targets
  switched; any failure rejects the reload and keeps the running configuration. Then
  ``apply()`` makes it the running one, told what changed (`ConfigDiff`).
- **stop** (SIGTERM/SIGINT): ``request_stop()`` counts requests; the first stops
  accepting and lets live sessions drain for the grace period, a second ends them at
  once (``begin_stop``). SIGUSR1 reopens log files. Signal handlers only note what was
  asked; the work happens in the loop.
- **status**: ``overview()`` reads the daemon once; /status, the status page's last
  hour and the metrics are all built from that reading (status.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic

from .accesslog import reopen_log_files
from .binding import Inherited, Opened, open_admin_socket
from .config import Config, ConfigError
from .history import HistorySampler, ServiceSample
from .listener import ListenError
from .metrics import DaemonFigures
from .process import (
    configure_logging_for,
    drop_privileges,
    logging_settings,
    new_event_loop,
    pid_file,
    require_capabilities,
)
from .signals import handled_signals
from .status import Overview, ServiceReading, history_samples, status_document
from .systemd import Heartbeat, Notifier
from .transparent import capability_problem
from .vocabulary import AdminState

if TYPE_CHECKING:
    from .admin import AdminServer

log = logging.getLogger("tcpfwd")

__all__ = ["ConfigDiff", "Daemon", "run", "serve_in_new_loop"]


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """What a reload changes, by service name."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]

    @classmethod
    def between(cls, old: Config, new: Config) -> ConfigDiff:
        before = {s.name: s for s in old.services}
        after = {s.name: s for s in new.services}
        return cls(
            added=tuple(sorted(set(after) - set(before))),
            removed=tuple(sorted(set(before) - set(after))),
            changed=tuple(sorted(n for n in set(after) & set(before) if after[n] != before[n])),
        )

    def describe(self) -> str:
        return (
            f"services added {','.join(self.added) or '-'}, "
            f"removed {','.join(self.removed) or '-'}, changed {','.join(self.changed) or '-'}"
        )


def _validated(read: Callable[[], Config], kept: str) -> Config | None:
    """The configuration ``read`` returns, or None (and why, logged, ending with
    ``kept``) when it cannot be used."""
    try:
        config = read()
    except ConfigError as error:
        for line in error.report().splitlines():
            log.error("reload: %s", line)
        log.error("reload rejected (%d errors); %s", len(error.issues), kept)
        return None
    problem = capability_problem(config)
    if problem is not None:
        log.error("reload rejected: %s; %s", problem, kept)
        return None
    return config


class Daemon(ABC, Generic[Opened]):
    """The lifecycle both daemons share; ``Opened``: what ``bind_new`` opens."""

    # The end of the line that rejects a reload.
    kept = "the running configuration is kept"

    def __init__(self, config: Config, reload_config: Callable[[], Config] | None) -> None:
        self.config = config
        self._reload_config = reload_config
        self.notifier = Notifier()
        self._heartbeat = Heartbeat(self.notifier, self.status_text)
        self.started = time.time()
        # Read at start: a reload that changes it is told it needs a restart.
        self.workers = config.workers
        # Workers leave the admin endpoint to their supervisor.
        self.serve_admin = True
        self.admin: AdminServer | None = None
        self._admin_socket: socket.socket | None = None
        # Sockets passed by systemd, while bind() hands them out.
        self.inherited = Inherited()
        self._bound = False
        self._stop_requests = 0
        self._stop_asked: asyncio.Event | None = None
        self._serving = False
        self._on_ready: Callable[[], None] | None = None
        # The last hour for the status page; sampled only where an admin endpoint shows it.
        self.history = HistorySampler(self._history_samples, time.time)

    # --- what differs: start-up and serving ----------------------------------------

    @abstractmethod
    def bind_new(self, config: Config) -> Opened:
        """Open the listening sockets of ``config``'s addresses not open yet, or none."""

    @abstractmethod
    def discard(self, opened: Opened) -> None:
        """Close what ``bind_new`` opened, unused."""

    @abstractmethod
    def install(self, config: Config, opened: Opened) -> None:
        """Take ``config`` and the sockets bound for it at start."""

    @abstractmethod
    async def startup(self) -> None:
        """Start serving what ``bind()`` opened."""

    @abstractmethod
    async def main_loop(self) -> None:
        """Serve; call ``mark_ready()`` once ready; return once stopped and drained."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Release what ``startup()`` made, once the main loop is over."""

    @abstractmethod
    def apply(self, config: Config, opened: Opened, diff: ConfigDiff) -> None:
        """Make a validated ``config`` the running one (reload), with its new sockets."""

    @abstractmethod
    def begin_stop(self, urgent: bool) -> str:
        """Stop accepting (``urgent``: end live sessions now); what to log of it."""

    # --- what differs: what the status shows -----------------------------------------

    @abstractmethod
    def overview(self) -> Overview:
        """One reading of the services, sessions and recent failovers."""

    @abstractmethod
    def daemon_figures(self) -> DaemonFigures:
        """The daemon as a whole, for the metrics."""

    @abstractmethod
    def status_text(self) -> str:
        """One line for systemd's STATUS."""

    @property
    @abstractmethod
    def admin_states(self) -> dict[tuple[str, str], AdminState]:
        """The operator's backend states by (service, backend); absent: enabled."""

    @abstractmethod
    def backend_state_changed(self, service: str, backend: str, state: AdminState) -> None:
        """Act on an operator's new backend state (already in ``admin_states``)."""

    # --- start-up --------------------------------------------------------------------

    def bind(self) -> None:
        """Open every listening socket, and the admin endpoint's, or none: ListenError."""
        self.inherited = Inherited.from_systemd()
        opened = self.bind_new(self.config)
        self.inherited.close_unclaimed()
        admin = self.config.admin.listen
        if admin is not None and self.serve_admin:
            try:
                self._admin_socket = open_admin_socket(admin)
            except ListenError:
                self.discard(opened)
                raise
        self.install(self.config, opened)
        self._bound = True

    async def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Start up, serve until stopped, shut down; ``on_ready`` once ready."""
        loop = asyncio.get_running_loop()
        self._on_ready = on_ready
        self._stop_asked = asyncio.Event()
        with handled_signals(
            loop, stop=self.request_stop, reload=self.reload, reopen_logs=self.reopen_logs
        ):
            if not self._bound:
                self.bind()
            await self.startup()
            await self._start_admin()
            if self._stop_requests:
                self._stop_asked.set()
            try:
                await self.main_loop()
            finally:
                self._heartbeat.stop()
            await self._stop_admin()
            await self.shutdown()
        log.info("stopped")

    async def _start_admin(self) -> None:
        if self._admin_socket is None:
            return
        # Imported only when wanted: the HTTP stack costs a noticeable start-up time.
        from .admin import AdminServer  # noqa: PLC0415

        self.admin = AdminServer(self, self.config.admin)
        await self.admin.start(self._admin_socket)
        self.history.start()

    async def _stop_admin(self) -> None:
        if self.admin is not None:
            self.history.stop()
            await self.admin.stop()

    def mark_ready(self) -> None:
        """Serving: tell systemd, and keep telling it while the loop runs."""
        self._serving = True
        self.notifier.ready(self.status_text())
        # Until the main loop is over: a drain too.
        self._heartbeat.start()
        if self._on_ready is not None:
            self._on_ready()

    async def stop_asked(self) -> None:
        """Returns once a stop has been asked for."""
        assert self._stop_asked is not None
        await self._stop_asked.wait()

    def close(self) -> None:
        """Release what outlives ``serve()``: call once the daemon is done."""
        if self._admin_socket is not None:
            self._admin_socket.close()
        self.notifier.close()

    # --- stop ------------------------------------------------------------------------

    @property
    def stop_requests(self) -> int:
        """How many times a stop was asked for (a second one hurries it)."""
        return self._stop_requests

    def request_stop(self, signame: str = "request") -> None:
        self._stop_requests += 1
        if self._stop_asked is None:
            # Not serving yet: serve() stops as soon as it has started.
            return
        urgent = self._stop_requests > 1
        what = self.begin_stop(urgent)
        if not urgent:
            # Once accepting has stopped: whoever reads "stopping" may rely on it.
            self.notifier.stopping()
        log.info("%s received%s: %s", signame, " again" if urgent else "", what)
        self._stop_asked.set()

    def reopen_logs(self) -> None:
        try:
            count = reopen_log_files()
        except OSError as error:
            log.error("cannot reopen log files: %s", error)
            return
        log.info("SIGUSR1 received: reopened %d log files%s", count, self.reopen_note())

    def reopen_note(self) -> str:
        """What the log line of SIGUSR1 adds (where it was passed on)."""
        return ""

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
            return self._reload(self._reload_config)
        finally:
            self.notifier.ready(self.status_text())

    def _reload(self, read: Callable[[], Config]) -> bool:
        config = _validated(read, self.kept)
        if config is None:
            return False
        try:
            opened = self.bind_new(config)
        except ListenError as error:
            log.error("reload rejected: %s; %s", error, self.kept)
            return False
        if logging_settings(config) != logging_settings(self.config):
            try:
                configure_logging_for(config)
            except OSError as error:
                self.discard(opened)
                configure_logging_for(self.config)
                log.error("reload rejected: cannot open log: %s", error)
                return False
        if config.workers != self.workers:
            log.warning(
                "reload: workers = %d needs a restart; still %d", config.workers, self.workers
            )
        diff = ConfigDiff.between(self.config, config)
        self.apply(config, opened, diff)
        return True

    def forget_unconfigured(self, config: Config) -> set[tuple[str, str]]:
        """Drop the admin states of backends ``config`` no longer has; its backends."""
        configured = {(s.name, b.name) for s in config.services for b in s.backends}
        states = self.admin_states
        for key in [k for k in states if k not in configured]:
            del states[key]
        return configured

    # --- what the admin endpoint reads and changes -----------------------------------

    @property
    def ready(self) -> bool:
        return self._serving and not self._stop_requests

    @property
    def state(self) -> str:
        if self.ready:
            return "serving"
        return "stopping" if self._stop_requests else "starting"

    def status(self) -> dict[str, Any]:
        """Everything the status page shows, as JSON-able data."""
        document = status_document(
            self.overview(), started=self.started, state=self.state, config=self.config
        )
        return self.history.annotate(document)

    def service_views(self) -> list[ServiceReading]:
        return self.overview().services

    def _history_samples(self) -> list[ServiceSample]:
        return history_samples(self.overview().services)

    def set_backend_state(self, service: str, backend: str, state: AdminState) -> str | None:
        """Apply an operator's backend state; an error message, or None."""
        config = next((s for s in self.config.services if s.name == service), None)
        if config is None:
            return f"no service {service!r}"
        if all(b.name != backend for b in config.backends):
            return f"service {service!r} has no backend {backend!r}"
        if state == AdminState.ENABLED:
            self.admin_states.pop((service, backend), None)
        else:
            self.admin_states[(service, backend)] = state
        self.backend_state_changed(service, backend, state)
        return None


def serve_in_new_loop(daemon: Daemon[Any], on_ready: Callable[[], None] | None = None) -> None:
    """Run ``daemon.serve()`` in a new event loop of the chosen kind, to its end."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(daemon.serve(on_ready))


def run(daemon: Daemon[Any]) -> None:
    """Bind, write the pid file, drop privileges, serve until stopped.

    ListenError escapes before serving. The pid file is written before privileges are
    dropped, as its folder is usually root's.
    """
    config = daemon.config
    try:
        daemon.bind()
        with pid_file(config.pid_file):
            drop_privileges(config.user, config.group)
            require_capabilities(config)
            serve_in_new_loop(daemon)
    finally:
        daemon.close()
