"""One worker process: a `Server` with its sockets given by a supervisor (supervisor.py).

It has no admin endpoint, pid file or sd_notify of its own. Over its control channel
(control.py) it says when it is ready and answers pings; it takes stop requests, reloads
(with the sockets of new listen addresses) and backend admin states. Every second it
writes a snapshot of its status and counters for the supervisor (snapshots.py); a worker
other than worker 0 then adopts worker 0's verdicts on actively checked backends (only
worker 0 runs active checks). If the supervisor dies the worker drains and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

from . import control
from .config import Address, Config
from .control import Message, WorkerSpec
from .health import UNKNOWN
from .lifecycle import serve_in_new_loop
from .metrics import stats_to_dict
from .server import Server
from .snapshots import read_snapshot, snapshot_path, write_snapshot
from .vocabulary import AdminState

log = logging.getLogger("tcpfwd")

__all__ = ["run_worker"]

SNAPSHOT_INTERVAL = 1.0


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


def _sockets(descriptors: list[int]) -> list[socket.socket]:
    sockets = []
    for fd in descriptors:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


class WorkerLink:
    """A worker's end of the supervisor's control channel, and its snapshots."""

    def __init__(self, server: Server, spec: WorkerSpec) -> None:
        self.server = server
        self.spec = spec
        self.channel = socket.socket(fileno=spec.control)
        self._loop: asyncio.AbstractEventLoop | None = None
        # The supervisor died: nobody will read snapshots or remove the runtime folder.
        self.orphaned = False

    def start(self) -> None:
        """Called once the server accepts: say so, then keep the supervisor informed."""
        loop = self._loop = asyncio.get_running_loop()
        self.channel.setblocking(False)
        loop.add_reader(self.channel.fileno(), self._on_message)
        self._send({"op": "ready"})
        self._tick()

    def _send(self, message: Message) -> None:
        with contextlib.suppress(OSError):
            control.send(self.channel, message)

    def _tick(self) -> None:
        assert self._loop is not None
        self.write_snapshot()
        if self.spec.index != 0:
            self._adopt_health()
        if not self.server.stop_requests:
            self._loop.call_later(SNAPSHOT_INTERVAL, self._tick)

    def write_snapshot(self) -> None:
        server = self.server
        snapshot = {
            "index": self.spec.index,
            "pid": os.getpid(),
            "written": time.time(),
            "status": server.status(),
            "stats": {name: stats_to_dict(s) for name, s in server.service_stats().items()},
        }
        write_snapshot(snapshot_path(self.spec.runtime, self.spec.index), snapshot)

    def _adopt_health(self) -> None:
        """Take worker 0's verdicts on actively checked backends (it alone checks them)."""
        first = read_snapshot(snapshot_path(self.spec.runtime, 0))
        if first is None:
            return
        for service in first["status"]["services"]:
            for backend in service["backends"]:
                verdict = backend["health"]
                if verdict == UNKNOWN:
                    continue
                reason = f"worker 0: {backend.get('reason') or verdict}"
                self.server.monitor.adopt((service["name"], backend["name"]), verdict, reason)

    def _on_message(self) -> None:
        # Everything queued, not one message a turn: an order waiting behind a ping would
        # otherwise come after connections that arrived meanwhile.
        while not self.orphaned:
            try:
                message, descriptors = control.receive(self.channel)
            except (BlockingIOError, InterruptedError):
                return
            self._handle(message, descriptors)

    def _handle(self, message: Message | None, descriptors: list[int]) -> None:
        if message is None:
            # The supervisor is gone: nobody would restart, reload or stop us any more.
            assert self._loop is not None
            self._loop.remove_reader(self.channel.fileno())
            for fd in descriptors:
                os.close(fd)
            self.orphaned = True
            self.server.request_stop("supervisor gone")
            return
        op = message["op"]
        if op == "ping":
            self._send({"op": "pong"})
        elif op == "stop":
            # Idempotent: systemd's KillMode=control-group signals us directly as well.
            wanted = 2 if message["urgent"] else 1
            if self.server.stop_requests < wanted:
                self.server.request_stop("stop from the supervisor")
        elif op == "reload":
            self._reload(message, _sockets(descriptors))
        elif op == "admin":
            self.server.set_backend_state(
                message["service"], message["backend"], AdminState(message["state"])
            )
        else:
            for fd in descriptors:
                os.close(fd)

    def _reload(self, message: Message, sockets: list[socket.socket]) -> None:
        listeners = self.server.listeners
        for service, host, port, count in message["listen"]:
            listeners.give((service, Address(host, port)), sockets[:count])
            sockets = sockets[count:]
        self.server.reload()
        # Sockets of an address this worker's reading of the file did not have.
        listeners.close_given()


def run_worker(
    config: Config, spec: WorkerSpec, *, reload_config: Callable[[], Config] | None
) -> None:
    """Serve as worker ``spec.index``: sockets given, no admin endpoint, no pid file."""
    logging.getLogger("tcpfwd").addFilter(_WorkerTag(spec.index))
    server = Server(config, reload_config=reload_config)
    server.serve_admin = False
    server.listeners.reuse_port = config.reuse_port
    server.monitor.active_checks = spec.index == 0
    for service, host, port, descriptors in spec.listen:
        server.listeners.give((service, Address(host, port)), _sockets(descriptors))
    for service, backend, state in spec.admin:
        server.admin_states[(service, backend)] = AdminState(state)
    server.bind()
    server.listeners.close_given()
    link = WorkerLink(server, spec)
    try:
        serve_in_new_loop(server, on_ready=link.start)
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
        server.close()
