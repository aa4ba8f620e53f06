"""systemd integration: readiness notification, watchdog, socket activation.

Written against the protocol (sd_notify(3), sd_listen_fds(3)) rather than libsystemd, so
it works wherever the variables are set and costs nothing where they are not.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping

SD_LISTEN_FDS_START = 3
# Between STATUS lines when no watchdog sets the pace.
STATUS_INTERVAL = 5.0


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET``; does nothing without it."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if path.startswith("@"):
            # An abstract socket: the leading '@' stands for a NUL byte.
            self._address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self._address = path
        self._sock: socket.socket | None = None
        self.watchdog_interval = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines; returns whether a datagram went out."""
        if self._address is None:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode(), self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send(ready=1, status=status, mainpid=os.getpid())

    def reloading(self) -> bool:
        # Type=notify-reload wants MONOTONIC_USEC alongside RELOADING=1.
        return self.send(
            reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )

    def stopping(self) -> bool:
        return self.send(stopping=1)

    def status(self, text: str) -> bool:
        return self.send(status=text)

    def watchdog(self) -> bool:
        return self.send(watchdog=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Heartbeat:
    """While a daemon serves: watchdog pings (when systemd asks for them) and a STATUS
    line, from the event loop, so that a stuck loop stops them."""

    def __init__(self, notifier: Notifier, status: Callable[[], str]) -> None:
        self._notifier = notifier
        self._status = status
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._notifier.enabled:
            self._schedule()

    def _schedule(self) -> None:
        interval = self._notifier.watchdog_interval or STATUS_INTERVAL
        self._handle = asyncio.get_running_loop().call_later(interval, self._beat)

    def _beat(self) -> None:
        if self._notifier.watchdog_interval:
            self._notifier.watchdog()
        self._notifier.status(self._status())
        self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between pings: half of ``$WATCHDOG_USEC``, if it is meant for us."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1_000_000 / 2


def inherited_sockets(environ: Mapping[str, str] | None = None) -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (``$LISTEN_FDS``).

    The variables are removed from the environment once read, as sd_listen_fds(1) does,
    so child processes do not believe the sockets are theirs.
    """
    env = os.environ if environ is None else environ
    count = env.get("LISTEN_FDS", "")
    pid = env.get("LISTEN_PID", "")
    if not count.isdigit() or int(count) == 0:
        return []
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return []
    if environ is None:
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets
