"""One worker process as its supervisor sees it: spawn, ping, stop, kill, restart.

A worker is a fresh interpreter (``python -m tcpfwd`` with the supervisor's own
arguments), not a fork: no event loop, thread or uvloop state is inherited. It runs in a
session of its own, so a Ctrl-C or hang-up meant for the terminal's job reaches the
supervisor alone, which stops the workers in order.

Liveness: a ready worker is pinged every ``PING_INTERVAL`` over its control channel; one
whose event loop has not answered anything for ``PING_TIMEOUT`` is hung, and its
supervisor kills it (and replaces it, as any worker that exits unexpectedly).

Restarts: a worker that dies within ``STABLE_AFTER`` of its start is restarted after a
pause that doubles with each such death, up to ``MAX_BACKOFF``; one that had run longer
is restarted at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence

from . import control
from .control import WORKER_ENV, Message, WorkerSpec

log = logging.getLogger("tcpfwd")

__all__ = ["WorkerProcess"]

STABLE_AFTER = 10.0
MAX_BACKOFF = 30.0
FIRST_BACKOFF = 0.25
PING_INTERVAL = 2.0
PING_TIMEOUT = 30.0
# What the supervisor's environment holds for itself alone.
SUPERVISOR_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")

# (service key, host, port, descriptors) of each listening address a worker is given.
ListenOrders = list[tuple[str, str, int, list[int]]]


class WorkerProcess:
    """Worker ``index``: its process and control channel, and when to restart it."""

    def __init__(
        self,
        index: int,
        command: list[str],
        *,
        on_ready: Callable[[WorkerProcess], None] | None = None,
        ping_interval: float = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
    ) -> None:
        self.index = index
        self._command = command
        self._on_ready = on_ready
        self._ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: socket.socket | None = None
        self.started = 0.0
        self.ready = False
        self.restarts = 0
        self.restart_at: float | None = None
        self._quick_deaths = 0
        self._pinged = 0.0
        self._answered = 0.0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        """Started and not yet found exited."""
        return self.process is not None

    def spawn(
        self, runtime: str, listen: ListenOrders, admin: Sequence[tuple[str, str, str]]
    ) -> bool:
        """Start the process with these orders; False (and a restart later) if it cannot."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spec = WorkerSpec(self.index, theirs.fileno(), runtime, listen, list(admin))
        env = {k: v for k, v in os.environ.items() if k not in SUPERVISOR_ONLY}
        env[WORKER_ENV] = spec.encode()
        descriptors = [theirs.fileno(), *(fd for *_, group in listen for fd in group)]
        try:
            self.process = subprocess.Popen(
                self._command, env=env, pass_fds=descriptors, start_new_session=True
            )
        except OSError as error:
            ours.close()
            self.restart_at = time.monotonic() + self._backoff()
            log.error("cannot start worker %d: %s", self.index, error)
            return False
        finally:
            theirs.close()
        self.channel = ours
        self.started = self._answered = time.monotonic()
        self.ready = False
        self.restart_at = None
        ours.setblocking(False)
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_message)
        log.info("worker %d started: pid %d", self.index, self.process.pid)
        return True

    # --- the control channel -----------------------------------------------------------

    def send(self, message: Message, descriptors: list[int] | None = None) -> None:
        if self.channel is None:
            return
        try:
            control.send(self.channel, message, descriptors or [])
        except OSError as error:
            log.error("cannot reach worker %d: %s", self.index, error)

    def _on_message(self) -> None:
        while self.channel is not None:
            try:
                message, descriptors = control.receive(self.channel)
            except (BlockingIOError, InterruptedError):
                return
            for fd in descriptors:
                os.close(fd)
            if message is None:
                self._drop_channel()
                return
            # Any message shows its loop turns.
            self._answered = time.monotonic()
            if message.get("op") == "ready":
                self.ready = True
                if self._on_ready is not None:
                    self._on_ready(self)

    def _drop_channel(self) -> None:
        if self.channel is not None:
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
            self.channel.close()
            self.channel = None

    def ping(self, now: float) -> bool:
        """Ping a ready worker when one is due; False if it has not answered for the
        ping timeout (its loop is stuck)."""
        if self.process is None or self.channel is None or not self.ready:
            return True
        if now - self._answered > self.ping_timeout:
            return False
        if now - self._pinged >= self._ping_interval:
            self._pinged = now
            self.send({"op": "ping"})
        return True

    # --- ending ----------------------------------------------------------------------

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.send_signal(signum)

    def stop(self, urgent: bool) -> None:
        """Drain and exit (``urgent``: end live sessions at once)."""
        if self.channel is not None:
            self.send({"op": "stop", "urgent": urgent})
        else:
            # No channel (it failed): a signal says the same.
            self.signal(signal.SIGTERM)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def exited(self) -> str | None:
        """How the process ended ("status 1", "signal SIGKILL"), once, when it has;
        its channel is closed then. None while it runs (or was not started)."""
        process = self.process
        if process is None or process.poll() is None:
            return None
        code = process.returncode
        self.process = None
        self._drop_channel()
        if code >= 0:
            return f"status {code}"
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    # --- restarts --------------------------------------------------------------------

    def _backoff(self) -> float:
        self._quick_deaths += 1
        return float(min(MAX_BACKOFF, FIRST_BACKOFF * 2**self._quick_deaths))

    def schedule_restart(self, now: float) -> float:
        """Restart after an unexpected exit: at once after a stable run, else after a
        growing pause. Returns the pause."""
        if now - self.started < STABLE_AFTER:
            delay = self._backoff()
        else:
            self._quick_deaths = 0
            delay = 0.0
        self.restart_at = now + delay
        self.restarts += 1
        return delay

    def restart_due(self, now: float) -> bool:
        return self.process is None and self.restart_at is not None and now >= self.restart_at
