"""Several worker processes under one supervisor: ``[global] workers = N`` (or ``"auto"``).

The process started is the supervisor, a `Daemon` that serves no session itself. It
validates the configuration, binds every listening socket — one per worker and address,
each with SO_REUSEPORT so the kernel spreads new connections over the workers' own
accept queues (sockets passed by systemd are shared by all workers instead) — writes the
pid file, drops privileges, then starts the workers (workerprocess.py; each runs
worker.py).

The supervisor keeps its copies of the listening sockets: the queue of a worker that
dies stays intact, and its replacement is given the very same sockets and accepts what
waited there. It serves the admin endpoint for all: /status and /metrics sum the
workers' snapshots (snapshots.py), so they lag by up to a second. It passes on reloads
(with the sockets of new listen addresses), backend admin states and SIGUSR1; on stop,
the workers drain, and those still running after the grace period are killed.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable

from . import binding
from .binding import ListenKey, WorkerGroups, close_groups
from .config import Address, Config
from .lifecycle import ConfigDiff, Daemon, run
from .metrics import DaemonFigures, WorkerFigures
from .snapshots import Snapshot, Snapshots
from .status import Overview, daemon_figures
from .vocabulary import AdminState
from .workerprocess import ListenOrders, WorkerProcess

log = logging.getLogger("tcpfwd")

__all__ = ["Supervisor", "supervise"]

POLL_INTERVAL = 0.1
# After the grace period, how long stopping workers get before they are killed.
STOP_MARGIN = 15.0

Opened = dict[ListenKey, WorkerGroups]


class Supervisor(Daemon[Opened]):
    """Starts, watches and signals the workers; serves the admin endpoint for all."""

    kept = "the workers keep the running configuration"

    def __init__(
        self, config: Config, argv: list[str], reload_config: Callable[[], Config] | None
    ) -> None:
        super().__init__(config, reload_config)
        self.count = config.workers
        command = [sys.executable, "-m", "tcpfwd", *argv]
        self.pool = [
            WorkerProcess(i, command, on_ready=self._worker_ready) for i in range(self.count)
        ]
        # Listening sockets by address, then by worker: shared ones appear in every slot.
        self.sockets: Opened = {}
        # Desired administrative states, given to every worker, new ones included.
        self._admin_states: dict[tuple[str, str], AdminState] = {}
        self.snapshots = Snapshots()
        self._stop_deadline: float | None = None

    @property
    def admin_states(self) -> dict[tuple[str, str], AdminState]:
        return self._admin_states

    def _live(self) -> int:
        return sum(1 for worker in self.pool if worker.running)

    # --- sockets -----------------------------------------------------------------------

    def bind_new(self, config: Config) -> Opened:
        def open_address(key: ListenKey, address: Address, backlog: int) -> WorkerGroups:
            return binding.bind_for_workers(
                address,
                backlog,
                self.count,
                reuse_port=config.reuse_port,
                inherited=self.inherited,
            )

        return binding.bind_new(config, self.sockets, open_address, close_groups)

    def discard(self, opened: Opened) -> None:
        for groups in opened.values():
            close_groups(groups)

    def install(self, config: Config, opened: Opened) -> None:
        self.sockets = opened

    def _orders(self, worker: WorkerProcess, sockets: Opened) -> ListenOrders:
        """What ``worker`` listens on of ``sockets``: (key, host, port, descriptors)."""
        return [
            (service, address.host, address.port, [s.fileno() for s in groups[worker.index]])
            for (service, address), groups in sockets.items()
        ]

    def apply(self, config: Config, opened: Opened, diff: ConfigDiff) -> None:
        if config.reuse_port != self.config.reuse_port:
            log.warning(
                "reload: reuse_port = %s applies to new listen addresses only; restart for all",
                str(config.reuse_port).lower(),
            )
        wanted = binding.listen_addresses(config)
        for key in [k for k in self.sockets if k not in wanted]:
            # The workers close theirs as they reload; the address is then free.
            close_groups(self.sockets.pop(key))
        self.sockets.update(opened)
        self.config = config
        self.forget_unconfigured(config)
        self.snapshots.forget_removed(config)
        for worker in self.pool:
            orders = self._orders(worker, opened)
            listen = [(service, host, port, len(fds)) for service, host, port, fds in orders]
            descriptors = [fd for *_, fds in orders for fd in fds]
            worker.send({"op": "reload", "listen": listen}, descriptors)
        log.info(
            "reload of %s passed on to %d workers: %s",
            config.source,
            self._live(),
            diff.describe(),
        )

    # --- workers -----------------------------------------------------------------------

    def _spawn(self, worker: WorkerProcess) -> None:
        admin = [(s, b, state) for (s, b), state in self._admin_states.items()]
        worker.spawn(self.snapshots.runtime, self._orders(worker, self.sockets), admin)

    def _worker_ready(self, worker: WorkerProcess) -> None:
        if self.ready and worker.pid is not None:
            log.info("worker %d (pid %d) ready", worker.index, worker.pid)

    def _keep_alive(self, now: float) -> None:
        """Notice exited workers: keep their counters, restart them unless stopping; kill
        the hung ones."""
        stopping = bool(self.stop_requests)
        for worker in self.pool:
            pid = worker.pid
            how = worker.exited()
            if how is not None:
                self.snapshots.retire(worker.index, self.config)
                if stopping:
                    log.info("worker %d (pid %d) exited (%s)", worker.index, pid, how)
                    continue
                delay = worker.schedule_restart(now)
                log.warning(
                    "worker %d (pid %d) exited unexpectedly (%s); restarting in %.1fs",
                    worker.index,
                    pid,
                    how,
                    delay,
                )
            if stopping:
                continue
            if worker.restart_due(now):
                self._spawn(worker)
            elif not worker.ping(now):
                log.warning(
                    "worker %d (pid %d) has not answered for %.0fs: killing it",
                    worker.index,
                    pid,
                    worker.ping_timeout,
                )
                worker.kill()

    # --- phases ----------------------------------------------------------------------

    async def startup(self) -> None:
        self.snapshots.runtime = tempfile.mkdtemp(prefix="tcpfwd-workers-")
        for worker in self.pool:
            self._spawn(worker)

    async def main_loop(self) -> None:
        while True:
            now = time.monotonic()
            self._keep_alive(now)
            if not self.ready and not self.stop_requests and all(w.ready for w in self.pool):
                log.info(
                    "ready: %d workers serving, %d services", self.count, len(self.config.services)
                )
                self.mark_ready()
            if self.stop_requests:
                if not self._live():
                    return
                assert self._stop_deadline is not None
                if now >= self._stop_deadline:
                    log.warning("workers still running after the grace period: killing them")
                    for worker in self.pool:
                        worker.kill()
                    self._stop_deadline = now + STOP_MARGIN
            await asyncio.sleep(POLL_INTERVAL)

    async def shutdown(self) -> None:
        for worker in self.pool:
            worker.close()

    def begin_stop(self, urgent: bool) -> str:
        if not urgent:
            # Our copies too: with the workers' closed, new connections are refused.
            self._close_sockets()
            self._stop_deadline = time.monotonic() + self.config.grace_period + STOP_MARGIN
        for worker in self.pool:
            worker.stop(urgent)
        if urgent:
            return "workers end their sessions now"
        return f"stopping {self._live()} workers"

    def reopen_logs(self) -> None:
        for worker in self.pool:
            worker.signal(signal.SIGUSR1)
        super().reopen_logs()

    def reopen_note(self) -> str:
        return "; passed on to the workers"

    def _close_sockets(self) -> None:
        for groups in self.sockets.values():
            close_groups(groups)
        self.sockets.clear()

    def close(self) -> None:
        self._close_sockets()
        for worker in self.pool:
            worker.close()
        super().close()
        if self.snapshots.runtime:
            shutil.rmtree(self.snapshots.runtime, ignore_errors=True)

    # --- what the admin endpoint reads and changes ---------------------------------------

    def status_text(self) -> str:
        return f"{self._live()} of {self.count} workers"

    def backend_state_changed(self, service: str, backend: str, state: str) -> None:
        message = {"op": "admin", "service": service, "backend": backend, "state": state}
        for worker in self.pool:
            worker.send(message)

    def _current(self) -> list[Snapshot]:
        return self.snapshots.current((w.index, w.pid) for w in self.pool if w.pid is not None)

    def overview(self) -> Overview:
        snapshots = self._current()
        overview = self.snapshots.overview(snapshots, self.config, self._admin_states)
        overview.workers = [
            {
                "index": s["index"],
                "pid": s["pid"],
                "state": s["status"]["state"],
                "sessions_active": s["status"]["sessions"]["active"],
                "updated": s["written"],
                "restarts": self.pool[s["index"]].restarts,
            }
            for s in snapshots
        ]
        return overview

    def daemon_figures(self) -> DaemonFigures:
        snapshots = self._current()
        return daemon_figures(
            self.config,
            self.started,
            [int(s["status"]["sessions"]["capacity"]) for s in snapshots],
            processes=self.count,
            workers=tuple(
                WorkerFigures(w.index, w.running and w.ready, w.restarts) for w in self.pool
            ),
        )


def supervise(
    config: Config, argv: list[str], *, reload_config: Callable[[], Config] | None
) -> None:
    """Bind, write the pid file, drop privileges, run the workers until stopped."""
    run(Supervisor(config, argv, reload_config))
