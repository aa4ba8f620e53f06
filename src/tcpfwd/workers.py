"""Several worker processes under one supervisor: ``[global] workers = N`` (or ``"auto"``).

The process started is the supervisor. It validates the configuration, binds every
listening socket — one per worker and address, each with SO_REUSEPORT so the kernel
spreads new connections over the workers' own accept queues (sockets passed by systemd
are shared by all workers instead) — writes the pid file, drops privileges, then starts
the workers by re-executing ``python -m tcpfwd`` with its own arguments: a fresh
interpreter, so no event loop, thread or uvloop state is inherited across a fork.

The supervisor keeps its copies of the listening sockets: the queue of a worker that
dies stays intact, and its replacement is given the very same sockets and accepts what
waited there. Each worker is an ordinary `Server` with its sockets given, and no admin
endpoint, pid file or sd_notify of its own. It talks to the supervisor over a
SOCK_SEQPACKET socket pair: "ready" one way; reloads (with the sockets of new listen
addresses, SCM_RIGHTS) and backend admin states the other way. Every second it writes a
JSON snapshot of its status and counters into a private runtime folder; the supervisor's
admin endpoint sums them (so /metrics lags by up to a second), and adds the last
snapshot of workers that have exited so counters do not go back.

Health: only worker 0 runs active checks; the others adopt its verdict on checked
backends from its snapshot every second. Passive health (and the recovery probes of
backends passive marks took down) stays per worker: each worker acts on the failures it
saw itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .accesslog import reopen_log_files
from .config import Address, Config, ConfigError
from .history import HistorySampler, ServiceSample, service_sample
from .listener import ListenError, open_listening_sockets
from .metrics import (
    DaemonFigures,
    ServiceStats,
    WorkerFigures,
    add_stats,
    service_summary,
    stats_to_dict,
)
from .server import (
    ListenKey,
    Server,
    _logging_settings,
    _serves,
    configure_logging_for,
    drop_privileges,
    listen_key,
    new_event_loop,
    require_capabilities,
    write_pid_file,
)
from .service import ADMIN_ENABLED, BackendView
from .systemd import Notifier, inherited_sockets
from .transparent import capability_problem

log = logging.getLogger("tcpfwd")

WORKER_ENV = "TCPFWD_WORKER"
SNAPSHOT_INTERVAL = 1.0
POLL_INTERVAL = 0.1
# A worker that dies sooner than this after starting is restarted after a growing pause.
STABLE_AFTER = 10.0
MAX_BACKOFF = 30.0
# After the grace period, how long stopping workers get before they are killed.
STOP_MARGIN = 15.0
_CONTROL_MAX = 1 << 16
# What the supervisor's environment holds for itself alone.
_SUPERVISOR_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


# --- the worker side ------------------------------------------------------------------


@dataclass
class WorkerSpec:
    """What the supervisor tells a worker it starts (as JSON in ``$TCPFWD_WORKER``)."""

    index: int
    control: int
    runtime: str
    # (service key, host, port, descriptors) of each listening address.
    listen: list[tuple[str, str, int, list[int]]] = field(default_factory=list)
    admin: list[tuple[str, str, str]] = field(default_factory=list)


def worker_spec() -> WorkerSpec | None:
    """This process's orders when a supervisor started it, else None."""
    raw = os.environ.pop(WORKER_ENV, None)
    if raw is None:
        return None
    data = json.loads(raw)
    return WorkerSpec(
        index=data["index"],
        control=data["control"],
        runtime=data["runtime"],
        listen=[(s, h, p, list(f)) for s, h, p, f in data["listen"]],
        admin=[(s, b, st) for s, b, st in data["admin"]],
    )


def snapshot_path(runtime: str, index: int) -> str:
    return os.path.join(runtime, f"worker-{index}.json")


class _WorkerTag(logging.Filter):
    """Prefixes a worker's event lines, so an operator sees who said what."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.prefix = f"[worker {index} pid {os.getpid()}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_tagged", False):
            record.msg = self.prefix + str(record.msg)
            record._tagged = True
        return True


def _sockets(fds: list[int]) -> list[socket.socket]:
    socks = []
    for fd in fds:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        socks.append(sock)
    return socks


class _WorkerLink:
    """A worker's end of the supervisor's control channel, and its snapshots."""

    def __init__(self, server: Server, spec: WorkerSpec) -> None:
        self.server = server
        self.spec = spec
        self.control = socket.socket(fileno=spec.control)
        self._loop: asyncio.AbstractEventLoop | None = None
        # The supervisor died: nobody will read snapshots or remove the runtime folder.
        self.orphaned = False

    def start(self) -> None:
        """Called once the server accepts: say so, then keep the supervisor informed."""
        loop = self._loop = asyncio.get_running_loop()
        self.control.setblocking(False)
        loop.add_reader(self.control.fileno(), self._on_control)
        self._send({"op": "ready"})
        self._tick()

    def _send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.control.send(json.dumps(message).encode())

    def _tick(self) -> None:
        assert self._loop is not None
        self.write_snapshot()
        if self.spec.index != 0:
            self._adopt_health()
        if not self.server._stop_requests:
            self._loop.call_later(SNAPSHOT_INTERVAL, self._tick)

    def write_snapshot(self) -> None:
        server = self.server
        snapshot = {
            "index": self.spec.index,
            "pid": os.getpid(),
            "written": time.time(),
            "status": server.status(),
            "stats": {name: stats_to_dict(s.stats) for name, s in server.services.items()},
        }
        path = snapshot_path(self.spec.runtime, self.spec.index)
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as stream:
                json.dump(snapshot, stream, separators=(",", ":"))
            os.replace(temporary, path)
        except OSError as error:
            log.warning("cannot write status snapshot %s: %s", path, error)

    def _adopt_health(self) -> None:
        """Take worker 0's verdicts on actively checked backends (it alone checks them)."""
        first = read_snapshot(snapshot_path(self.spec.runtime, 0))
        if first is None:
            return
        for service in first["status"]["services"]:
            for backend in service["backends"]:
                reason = f"worker 0: {backend.get('reason') or backend['health']}"
                self.server.monitor.adopt(
                    (service["name"], backend["name"]), backend["health"], reason
                )

    def _on_control(self) -> None:
        try:
            data, fds, _flags, _address = socket.recv_fds(self.control, _CONTROL_MAX, 256)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            data, fds = b"", []
            log.error("control channel failed: %s", error)
        if not data:
            # The supervisor is gone: nobody would restart, reload or stop us any more.
            assert self._loop is not None
            self._loop.remove_reader(self.control.fileno())
            for fd in fds:
                os.close(fd)
            self.orphaned = True
            self.server.request_stop("supervisor gone")
            return
        message = json.loads(data)
        if message["op"] == "stop":
            # Idempotent: systemd's KillMode=control-group signals us directly as well.
            wanted = 2 if message["urgent"] else 1
            if self.server._stop_requests < wanted:
                self.server.request_stop("stop from the supervisor")
        elif message["op"] == "reload":
            self._reload(message, _sockets(fds))
        elif message["op"] == "admin":
            self.server.set_backend_state(message["service"], message["backend"], message["state"])
        else:
            for fd in fds:
                os.close(fd)

    def _reload(self, message: dict[str, Any], socks: list[socket.socket]) -> None:
        server = self.server
        for service, host, port, count in message["listen"]:
            server.given[(service, Address(host, port))] = socks[:count]
            socks = socks[count:]
        server.reload()
        # Sockets of an address this worker's reading of the file did not have.
        for group in server.given.values():
            for sock in group:
                sock.close()
        server.given.clear()


def run_worker(
    config: Config, spec: WorkerSpec, *, reload_config: Callable[[], Config] | None
) -> None:
    """Serve as worker ``spec.index``: sockets given, no admin endpoint, no pid file."""
    logging.getLogger("tcpfwd").addFilter(_WorkerTag(spec.index))
    server = Server(config, reload_config=reload_config)
    server.serve_admin = False
    server.reuse_port = config.reuse_port
    server.monitor.active_checks = spec.index == 0
    for service, host, port, fds in spec.listen:
        server.given[(service, Address(host, port))] = _sockets(fds)
    for service, backend, state in spec.admin:
        server.daemon.admin_states[(service, backend)] = state
    server.bind()
    for group in server.given.values():
        for sock in group:
            sock.close()
    server.given.clear()
    link = _WorkerLink(server, spec)
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(server.serve(on_ready=link.start))
    finally:
        if link.orphaned:
            # The last worker out removes the folder its dead supervisor cannot.
            with contextlib.suppress(OSError):
                os.unlink(snapshot_path(spec.runtime, spec.index))
            with contextlib.suppress(OSError):
                os.rmdir(spec.runtime)
        else:
            # The last word, so the supervisor's totals include every session that ended.
            link.write_snapshot()
        server.notifier.close()


# --- the supervisor side --------------------------------------------------------------


def read_snapshot(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as stream:
            data: dict[str, Any] = json.load(stream)
    except (OSError, ValueError):
        return None
    return data


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    control: socket.socket | None = None
    started: float = 0.0
    ready: bool = False
    quick_deaths: int = 0
    restart_at: float | None = None
    restarts: int = 0


@dataclass
class _ServiceView:
    name: str
    stats: ServiceStats
    views: list[BackendView]

    def backend_views(self) -> Iterable[BackendView]:
        return self.views


class Supervisor:
    """Starts, watches and signals the workers; serves the admin endpoint for all."""

    def __init__(
        self, config: Config, argv: list[str], reload_config: Callable[[], Config] | None
    ) -> None:
        self.config = config
        self.count = config.workers
        self._argv = argv
        self._reload_config = reload_config
        self.notifier = Notifier()
        # Made once privileges are dropped, so the workers may write there.
        self.runtime = ""
        # Listening sockets by address, then by worker: shared ones appear in every slot.
        self.sockets: dict[ListenKey, list[list[socket.socket]]] = {}
        self.slots = [_Slot(i) for i in range(self.count)]
        # Desired administrative states, given to every worker, new ones included.
        self.admin_states: dict[tuple[str, str], str] = {}
        # Counters of workers that have exited, by service.
        self.retired: dict[str, ServiceStats] = {}
        self.started = time.time()
        self._admin_sock: socket.socket | None = None
        self._stop_requests = 0
        self._stop_deadline: float | None = None
        self._serving = False
        self._inherited: list[socket.socket] = []
        # The last hour for the status page, from the workers' summed snapshots.
        self.history = HistorySampler(self._history_samples, time.time)

    # --- sockets -----------------------------------------------------------------------

    def _bind_address(self, address: Address, backlog: int) -> list[list[socket.socket]]:
        for sock in self._inherited:
            if _serves(sock, address):
                self._inherited.remove(sock)
                # One inherited socket, one queue, shared by every worker.
                return [[sock] for _ in range(self.count)]
        if not self.config.reuse_port:
            # One queue that whichever worker is free takes from: self-balancing where
            # the workers' CPUs are unequally busy, at the cost of waking them all.
            shared = open_listening_sockets(address, backlog)
            return [shared for _ in range(self.count)]
        first = open_listening_sockets(address, backlog, reuse_port=True)
        groups = [first]
        try:
            for _ in range(1, self.count):
                group: list[socket.socket] = []
                groups.append(group)
                for sock in first:
                    # The first socket's actual port, so "port 0" is one port for all.
                    host, port = sock.getsockname()[:2]
                    group.extend(
                        open_listening_sockets(Address(host, port), backlog, reuse_port=True)
                    )
        except ListenError:
            _close_groups(groups)
            raise
        return groups

    def _bind_new(self, config: Config) -> dict[ListenKey, list[list[socket.socket]]]:
        opened: dict[ListenKey, list[list[socket.socket]]] = {}
        try:
            for service in config.services:
                for address in service.listen:
                    key = listen_key(service.name, address)
                    if key not in self.sockets and key not in opened:
                        opened[key] = self._bind_address(address, service.settings.backlog)
        except ListenError:
            for groups in opened.values():
                _close_groups(groups)
            raise
        return opened

    def bind(self) -> None:
        """Every listening socket of every worker, and the admin one, or none."""
        self._inherited = inherited_sockets()
        self.sockets = self._bind_new(self.config)
        for sock in self._inherited:
            log.warning("socket %s passed by systemd is not configured; closing it", sock)
            sock.close()
        self._inherited = []
        if self.config.admin.listen is not None:
            try:
                first, *extra = open_listening_sockets(self.config.admin.listen, 64)
            except ListenError:
                self._close_sockets()
                raise
            for sock in extra:
                sock.close()
            self._admin_sock = first

    def _close_sockets(self) -> None:
        for groups in self.sockets.values():
            _close_groups(groups)
        self.sockets.clear()

    # --- workers -----------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listen = []
        fds = [theirs.fileno()]
        for (service, address), groups in self.sockets.items():
            group = [s.fileno() for s in groups[slot.index]]
            listen.append((service, address.host, address.port, group))
            fds.extend(group)
        spec = {
            "index": slot.index,
            "control": theirs.fileno(),
            "runtime": self.runtime,
            "listen": listen,
            "admin": [[s, b, st] for (s, b), st in self.admin_states.items()],
        }
        env = {k: v for k, v in os.environ.items() if k not in _SUPERVISOR_ONLY}
        env[WORKER_ENV] = json.dumps(spec)
        try:
            slot.process = subprocess.Popen(
                [sys.executable, "-m", "tcpfwd", *self._argv],
                env=env,
                pass_fds=fds,
                # Out of our process group: a Ctrl-C or hang-up meant for the terminal's
                # job reaches the supervisor alone, which stops the workers in order.
                start_new_session=True,
            )
        except OSError as error:
            ours.close()
            slot.restart_at = time.monotonic() + self._backoff(slot)
            log.error("cannot start worker %d: %s", slot.index, error)
            return
        finally:
            theirs.close()
        slot.control = ours
        slot.started = time.monotonic()
        slot.ready = False
        slot.restart_at = None
        ours.setblocking(False)
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_control, slot)
        log.info("worker %d started: pid %d", slot.index, slot.process.pid)

    def _backoff(self, slot: _Slot) -> float:
        slot.quick_deaths += 1
        return float(min(MAX_BACKOFF, 0.25 * 2**slot.quick_deaths))

    def _on_control(self, slot: _Slot) -> None:
        assert slot.control is not None
        try:
            data = slot.control.recv(_CONTROL_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_control(slot)
            return
        if json.loads(data).get("op") == "ready":
            slot.ready = True
            if self._serving and slot.process is not None:
                log.info("worker %d (pid %d) ready", slot.index, slot.process.pid)

    def _drop_control(self, slot: _Slot) -> None:
        if slot.control is not None:
            asyncio.get_running_loop().remove_reader(slot.control.fileno())
            slot.control.close()
            slot.control = None

    def _send(self, slot: _Slot, message: dict[str, Any], fds: list[int] | None = None) -> None:
        if slot.control is None:
            return
        try:
            socket.send_fds(slot.control, [json.dumps(message).encode()], fds or [])
        except OSError as error:
            log.error("cannot reach worker %d: %s", slot.index, error)

    def _reap(self) -> None:
        """Notice exited workers: keep their counters, restart them unless stopping."""
        now = time.monotonic()
        for slot in self.slots:
            process = slot.process
            if process is not None and process.poll() is not None:
                self._retire(slot)
                code = process.returncode
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
                slot.process = None
                self._drop_control(slot)
                if self._stop_requests:
                    log.info("worker %d (pid %d) exited (%s)", slot.index, process.pid, how)
                    continue
                if now - slot.started < STABLE_AFTER:
                    delay = self._backoff(slot)
                else:
                    slot.quick_deaths = 0
                    delay = 0.0
                slot.restart_at = now + delay
                slot.restarts += 1
                log.warning(
                    "worker %d (pid %d) exited unexpectedly (%s); restarting in %.1fs",
                    slot.index,
                    process.pid,
                    how,
                    delay,
                )
            if (
                slot.process is None
                and slot.restart_at is not None
                and now >= slot.restart_at
                and not self._stop_requests
            ):
                self._spawn(slot)

    def _retire(self, slot: _Slot) -> None:
        path = snapshot_path(self.runtime, slot.index)
        snapshot = read_snapshot(path)
        if snapshot is not None:
            configured = {s.name for s in self.config.services}
            for name, data in snapshot["stats"].items():
                if name in configured:
                    add_stats(self.retired.setdefault(name, ServiceStats()), data, gauges=False)
        with contextlib.suppress(OSError):
            os.unlink(path)

    # --- signals -----------------------------------------------------------------------

    def _signal_workers(self, signum: int) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                with contextlib.suppress(OSError):
                    slot.process.send_signal(signum)

    def request_stop(self, signame: str = "request") -> None:
        self._stop_requests += 1
        if self._stop_requests == 1:
            # Our copies too: with the workers' closed, new connections are refused.
            self._close_sockets()
            self.notifier.stopping()
            self._stop_deadline = time.monotonic() + self.config.grace_period + STOP_MARGIN
            log.info("%s received: stopping %d workers", signame, self._live())
        else:
            log.info("%s received again: workers end their sessions now", signame)
        for slot in self.slots:
            if slot.control is not None:
                self._send(slot, {"op": "stop", "urgent": self._stop_requests > 1})
            elif slot.process is not None and slot.process.poll() is None:
                # No channel (it failed): a signal says the same.
                with contextlib.suppress(OSError):
                    slot.process.send_signal(signal.SIGTERM)

    def _reopen_logs(self) -> None:
        self._signal_workers(signal.SIGUSR1)
        try:
            count = reopen_log_files()
        except OSError as error:
            log.error("cannot reopen log files: %s", error)
            return
        log.info("SIGUSR1 received: reopened %d log files; passed on to the workers", count)

    def reload(self) -> bool:
        """Validate the file; if good, bind what is new and have every worker reload it."""
        if self._reload_config is None or self._stop_requests:
            return False
        self.notifier.reloading()
        try:
            return self._reload()
        finally:
            self.notifier.ready(self._status_text())

    def _reload(self) -> bool:
        assert self._reload_config is not None
        try:
            config = self._reload_config()
        except ConfigError as error:
            for line in error.report().splitlines():
                log.error("reload: %s", line)
            log.error(
                "reload rejected (%d errors); the workers keep the running configuration",
                len(error.issues),
            )
            return False
        problem = capability_problem(config)
        if problem is not None:
            log.error("reload rejected: %s; the workers keep the running configuration", problem)
            return False
        try:
            opened = self._bind_new(config)
        except ListenError as error:
            log.error("reload rejected: %s; the workers keep the running configuration", error)
            return False
        if _logging_settings(config) != _logging_settings(self.config):
            try:
                configure_logging_for(config)
            except OSError as error:
                for groups in opened.values():
                    _close_groups(groups)
                configure_logging_for(self.config)
                log.error("reload rejected: cannot open log: %s", error)
                return False
        if config.workers != self.count:
            log.warning(
                "reload: workers = %d needs a restart; still %d", config.workers, self.count
            )
        if config.reuse_port != self.config.reuse_port:
            log.warning(
                "reload: reuse_port = %s applies to new listen addresses only; restart for all",
                str(config.reuse_port).lower(),
            )
        wanted = {listen_key(s.name, a) for s in config.services for a in s.listen}
        for key in [k for k in self.sockets if k not in wanted]:
            # The workers close theirs as they reload; the address is then free.
            _close_groups(self.sockets.pop(key))
        self.sockets.update(opened)
        self.config = config
        configured = {(s.name, b.name) for s in config.services for b in s.backends}
        for backend_key in [k for k in self.admin_states if k not in configured]:
            del self.admin_states[backend_key]
        for name in [n for n in self.retired if all(s.name != n for s in config.services)]:
            del self.retired[name]
        for slot in self.slots:
            listen = []
            fds: list[int] = []
            for (service, address), groups in opened.items():
                group = [s.fileno() for s in groups[slot.index]]
                listen.append((service, address.host, address.port, len(group)))
                fds.extend(group)
            self._send(slot, {"op": "reload", "listen": listen}, fds)
        log.info("reload of %s passed on to %d workers", config.source, self._live())
        return True

    # --- main loop ---------------------------------------------------------------------

    def _live(self) -> int:
        return sum(1 for s in self.slots if s.process is not None)

    def _status_text(self) -> str:
        return f"{self._live()} of {self.count} workers"

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signal.Signals(signum).name)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self._reopen_logs)
        self.runtime = tempfile.mkdtemp(prefix="tcpfwd-workers-")
        for slot in self.slots:
            self._spawn(slot)
        admin = None
        if self._admin_sock is not None:
            from .admin import AdminServer  # noqa: PLC0415 - the HTTP stack is slow to import

            admin = AdminServer(self, self.config.admin)
            await admin.start(self._admin_sock)
            self.history.start()
        next_ping = 0.0
        while True:
            self._reap()
            now = time.monotonic()
            if not self._serving and all(s.ready for s in self.slots) and not self._stop_requests:
                self._serving = True
                log.info(
                    "ready: %d workers serving, %d services", self.count, len(self.config.services)
                )
                self.notifier.ready(self._status_text())
            if self._serving and self.notifier.enabled and now >= next_ping:
                if self.notifier.watchdog_interval:
                    self.notifier.watchdog()
                self.notifier.status(self._status_text())
                next_ping = now + (self.notifier.watchdog_interval or 5.0)
            if self._stop_requests:
                if not self._live():
                    break
                assert self._stop_deadline is not None
                if now >= self._stop_deadline:
                    log.warning("workers still running after the grace period: killing them")
                    self._signal_workers(signal.SIGKILL)
                    self._stop_deadline = now + STOP_MARGIN
            await asyncio.sleep(POLL_INTERVAL)
        if admin is not None:
            self.history.stop()
            await admin.stop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(signum)
        log.info("stopped")

    # --- what the admin endpoint reads and changes ---------------------------------------

    @property
    def ready(self) -> bool:
        return self._serving and not self._stop_requests

    def _snapshots(self) -> list[dict[str, Any]]:
        found = []
        for slot in self.slots:
            if slot.process is not None:
                snapshot = read_snapshot(snapshot_path(self.runtime, slot.index))
                if snapshot is not None and snapshot.get("pid") == slot.process.pid:
                    found.append(snapshot)
        return found

    def _merged(self, snapshots: list[dict[str, Any]]) -> dict[str, ServiceStats]:
        merged: dict[str, ServiceStats] = {}
        for service in self.config.services:
            stats = merged[service.name] = ServiceStats()
            retired = self.retired.get(service.name)
            if retired is not None:
                add_stats(stats, stats_to_dict(retired), gauges=False)
            for snapshot in snapshots:
                data = snapshot["stats"].get(service.name)
                if data is not None:
                    add_stats(stats, data)
        return merged

    def _health(self, snapshots: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        """Backend entries of the status, from the lowest worker (0 runs the checks);
        suspect where any worker finds it so (each dials on its own)."""
        entries: dict[tuple[str, str], dict[str, Any]] = {}
        suspects: set[tuple[str, str]] = set()
        for snapshot in sorted(snapshots, key=lambda s: int(s["index"]), reverse=True):
            for service in snapshot["status"]["services"]:
                for backend in service["backends"]:
                    key = (service["name"], backend["name"])
                    entries[key] = dict(backend)
                    if backend.get("suspect"):
                        suspects.add(key)
        for key in suspects:
            entries[key]["suspect"] = True
        return entries

    def service_views(self) -> list[_ServiceView]:
        snapshots = self._snapshots()
        merged = self._merged(snapshots)
        health = self._health(snapshots)
        views = []
        for service in self.config.services:
            stats = merged[service.name]
            backends = [
                BackendView(
                    name=b.name,
                    address=str(b.address),
                    up=health.get((service.name, b.name), {}).get("health", "up") == "up",
                    admin_state=self.admin_states.get((service.name, b.name), ADMIN_ENABLED),
                    active=stats.backend(b.name).active,
                    suspect=bool(health.get((service.name, b.name), {}).get("suspect")),
                )
                for b in service.backends
            ]
            views.append(_ServiceView(service.name, stats, backends))
        return views

    def status(self) -> dict[str, Any]:
        snapshots = self._snapshots()
        merged = self._merged(snapshots)
        health = self._health(snapshots)
        listening: dict[str, list[str]] = {}
        for snapshot in snapshots[:1]:
            for service in snapshot["status"]["services"]:
                listening[service["name"]] = service["listen"]
        services = []
        for service in self.config.services:
            stats = merged[service.name]
            backends = []
            for backend in service.backends:
                backend_stats = stats.backend(backend.name)
                entry = dict(health.get((service.name, backend.name), {"health": "up"}))
                entry.update(
                    name=backend.name,
                    address=str(backend.address),
                    admin_state=self.admin_states.get((service.name, backend.name), ADMIN_ENABLED),
                    active=backend_stats.active,
                    sessions_total=backend_stats.sessions,
                    failed_attempts=sum(n for o, n in backend_stats.attempts.items() if o != "ok"),
                    attempts=dict(backend_stats.attempts),
                )
                backends.append(entry)
            services.append(
                {
                    "name": service.name,
                    "listen": listening.get(service.name, []),
                    "policy": service.settings.policy,
                    **service_summary(stats),
                    "backends": backends,
                }
            )
        failovers = [f for s in snapshots for f in s["status"]["recent_failovers"]]
        failovers.sort(key=lambda f: str(f.get("time", "")))
        document = {
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started,
            "uptime_s": time.time() - self.started,
            "state": "serving" if self.ready else "stopping" if self._stop_requests else "starting",
            "config": self.config.source,
            "sessions": {
                "active": sum(s["status"]["sessions"]["active"] for s in snapshots),
                "capacity": sum(s["status"]["sessions"]["capacity"] for s in snapshots),
            },
            "workers": [
                {
                    "index": s["index"],
                    "pid": s["pid"],
                    "state": s["status"]["state"],
                    "sessions_active": s["status"]["sessions"]["active"],
                    "updated": s["written"],
                    "restarts": self.slots[s["index"]].restarts,
                }
                for s in snapshots
            ],
            "services": services,
            "recent_failovers": failovers[-50:],
        }
        return self.history.annotate(document)

    def _history_samples(self) -> list[ServiceSample]:
        snapshots = self._snapshots()
        merged = self._merged(snapshots)
        health = self._health(snapshots)
        samples = []
        for service in self.config.services:
            backends = []
            for backend in service.backends:
                entry = health.get((service.name, backend.name), {})
                backends.append(
                    (
                        backend.name,
                        entry.get("health", "up") == "up",
                        entry.get("last_change"),
                        entry.get("reason"),
                    )
                )
            samples.append(service_sample(service.name, merged[service.name], backends))
        return samples

    def daemon_figures(self) -> DaemonFigures:
        limit = self.config.max_connections
        capacity = 0
        for snapshot in self._snapshots():
            own = int(snapshot["status"]["sessions"]["capacity"])
            capacity += own if limit is None else min(own, limit)
        return DaemonFigures(
            version=__version__,
            started=self.started,
            capacity=capacity,
            service_limits={
                s.name: s.settings.max_connections * self.count
                for s in self.config.services
                if s.settings.max_connections is not None
            },
            workers=tuple(
                WorkerFigures(slot.index, slot.process is not None and slot.ready, slot.restarts)
                for slot in self.slots
            ),
        )

    def set_backend_state(self, service: str, backend: str, state: str) -> str | None:
        config = next((s for s in self.config.services if s.name == service), None)
        if config is None:
            return f"no service {service!r}"
        if all(b.name != backend for b in config.backends):
            return f"service {service!r} has no backend {backend!r}"
        if state == ADMIN_ENABLED:
            self.admin_states.pop((service, backend), None)
        else:
            self.admin_states[(service, backend)] = state
        for slot in self.slots:
            self._send(
                slot, {"op": "admin", "service": service, "backend": backend, "state": state}
            )
        return None

    def close(self) -> None:
        self._close_sockets()
        if self._admin_sock is not None:
            self._admin_sock.close()
        for slot in self.slots:
            if slot.control is not None:
                slot.control.close()
        self.notifier.close()
        if self.runtime:
            shutil.rmtree(self.runtime, ignore_errors=True)


def _close_groups(groups: list[list[socket.socket]]) -> None:
    for group in groups:
        for sock in group:
            sock.close()


def supervise(
    config: Config, argv: list[str], *, reload_config: Callable[[], Config] | None
) -> None:
    """Bind, write the pid file, drop privileges, run the workers until stopped."""
    supervisor = Supervisor(config, argv, reload_config)
    try:
        supervisor.bind()
        pid_file = config.pid_file
        write_pid_file(pid_file)
        try:
            drop_privileges(config.user, config.group)
            require_capabilities(config)
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                runner.run(supervisor.serve())
        finally:
            if pid_file:
                with contextlib.suppress(OSError):
                    os.unlink(pid_file)
    finally:
        supervisor.close()
