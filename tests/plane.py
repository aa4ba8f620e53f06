"""The data plane in the test's own process: one service, its sessions fed by the test.

No ``tcpfwd`` child process and no listener: the test hands each session its client
socket (one end of a socketpair, or a TCP connection it accepted itself) and looks at
the session's state, its access record and its counters directly. Backends are real
servers on loopback (``support.echo_server`` and the like).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from tcpfwd.accesslog import AccessLog, SessionRecord
from tcpfwd.config import parse_config
from tcpfwd.daemonstate import DaemonState
from tcpfwd.health import HealthTable
from tcpfwd.monitor import HealthMonitor
from tcpfwd.reactor import RawSocket, Reactor
from tcpfwd.resolver import Resolver
from tcpfwd.service import ServiceRuntime
from tcpfwd.session import Session

CLIENT = ("192.0.2.10", 40000)


class _Listener:
    """What a session asks of its listener: the name for its log line."""

    name = "in-process"


class Plane:
    """One service's data plane on the running event loop."""

    def __init__(self, **service: Any) -> None:
        service.setdefault("listen", "127.0.0.1:0")
        config = parse_config({"services": {"svc": service}}, "test")
        self.records: list[SessionRecord] = []
        self._ended = asyncio.Event()
        access = AccessLog()
        access.emit = self._record  # type: ignore[method-assign]
        self.daemon = DaemonState(access)
        self.reactor = self.daemon.reactor = Reactor(asyncio.get_running_loop())
        self.health: HealthTable[tuple[str, str]] = HealthTable()
        self.monitor = HealthMonitor(self.health, Resolver())
        self.service = ServiceRuntime(config.services[0], self.daemon, self.monitor, Resolver())
        self.daemon.set_services([self.service])
        self.listener = _Listener()

    def session(self, sock: socket.socket, peer: tuple[str, int] = CLIENT) -> Session:
        """Start a session for an accepted socket (which the session now owns)."""
        raw = RawSocket(sock.family, socket.SOCK_STREAM, 0, sock.detach())
        session = Session(self.service, self.listener, raw, peer)  # type: ignore[arg-type]
        session.start()
        return session

    def pair(self, peer: tuple[str, int] = CLIENT) -> tuple[socket.socket, Session]:
        """A client connected to a new session: the test's end of a socketpair."""
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        return ours, self.session(theirs, peer)

    def _record(self, record: SessionRecord) -> None:
        self.records.append(record)
        self._ended.set()

    async def ended(self, count: int, timeout: float = 10.0) -> list[SessionRecord]:
        """The records once ``count`` sessions have ended."""
        async with asyncio.timeout(timeout):
            while len(self.records) < count:
                self._ended.clear()
                await self._ended.wait()
        return self.records

    def close(self) -> None:
        for session in list(self.daemon.sessions):
            session.abort()
        self.reactor.close()


async def read_until_eof(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while chunk := await loop.sock_recv(sock, 65536):
        data += chunk
        if len(data) > limit:
            raise AssertionError("more than expected")
    return bytes(data)
