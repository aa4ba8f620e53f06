"""One client connection from accept to end.

A session wraps the accepted socket (its bytes are held, not lost, while a backend is
chosen), asks the dialer for the first backend that connects in the service's order,
links the two sockets in a relay, waits for it to end, and writes one access line.
Nothing that goes wrong inside a session escapes it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Final

from .accesslog import AccessLog, SessionRecord
from .config import BackendConfig, ServiceConfig, format_hostport
from .dialer import Attempt, Connected, Dialer, configure_socket
from .relay import END_SHUTDOWN, BaseRelay, Endpoint, Relay
from .splice import RELAY_SPLICE, PipePool, choose_relay, take_over

END_NO_BACKEND: Final = "no_backend"
END_CLIENT_ABORTED: Final = "client_aborted"
END_ERROR: Final = "internal_error"

log = logging.getLogger("tcpfwd")

# Session ids: unique per process start (random prefix) and ordered within it.
_ID_PREFIX = os.urandom(3).hex()
_next_number = itertools.count(1)


def new_session_id() -> str:
    return f"{_ID_PREFIX}-{next(_next_number):x}"


class ServiceRuntime:
    """What sessions of one service share: its config, dialer, access log and pipes."""

    def __init__(
        self, config: ServiceConfig, access_log: AccessLog, pipes: PipePool | None = None
    ) -> None:
        self.config = config
        self.name = config.name
        self.settings = config.settings
        self.relay = choose_relay(config.settings.relay)
        self.pipes = pipes if pipes is not None else PipePool(keep=0)
        self.dialer = Dialer(config.settings)
        self.access_log = access_log

    def plan(self, client: tuple[str, int]) -> Sequence[BackendConfig]:
        """The order in which to try the backends for this client."""
        return self.config.backends

    def new_relay(self, client: Endpoint, backend: Endpoint) -> BaseRelay:
        """The service's relay for two endpoints; copy where splice declines this session."""
        idle_timeout = self.settings.idle_timeout
        if self.relay == RELAY_SPLICE:
            spliced = take_over(client, backend, self.pipes, idle_timeout=idle_timeout)
            if spliced is not None:
                return spliced
        return Relay(client, backend, idle_timeout=idle_timeout)


class Session:
    __slots__ = (
        "_client",
        "_client_gone",
        "_relay",
        "_sock",
        "_task",
        "listener",
        "peer",
        "record",
        "service",
    )

    def __init__(
        self,
        service: ServiceRuntime,
        listener: str,
        sock: socket.socket,
        peer: tuple[str, int],
    ) -> None:
        self.service = service
        self.listener = listener
        self.peer = peer
        self._sock = sock
        self._client: Endpoint | None = None
        self._relay: BaseRelay | None = None
        self._task: asyncio.Task[None] | None = None
        self._client_gone = False
        self.record = SessionRecord(
            session=new_session_id(),
            started=time.time(),
            client=format_hostport(peer[0], peer[1]),
            listener=listener,
            service=service.name,
        )

    def start(self, on_done: Callable[[Session], None]) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(lambda _task: on_done(self))

    def abort(self) -> None:
        """End the session now (the grace period after a stop request is over)."""
        if self._relay is not None:
            self._relay.shutdown(END_SHUTDOWN)
        elif self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        began = time.monotonic()
        record = self.record
        try:
            record.end = await self._serve()
        except asyncio.CancelledError:
            record.end = END_CLIENT_ABORTED if self._client_gone else END_SHUTDOWN
            self._close_all()
        except Exception:
            log.exception("session %s failed", record.session)
            record.end = END_ERROR
            self._close_all()
        record.duration = time.monotonic() - began
        if self._client is not None:
            record.from_client = self._client.received
        if self._relay is not None:
            record.from_backend = self._relay.backend.received
        self.service.access_log.emit(record)

    async def _serve(self) -> str:
        loop = asyncio.get_running_loop()
        settings = self.service.settings
        configure_socket(self._sock, settings)
        _transport, client = await loop.connect_accepted_socket(
            lambda: Endpoint("client", settings.buffer_size), sock=self._sock
        )
        self._client = client
        if client.lost:
            return END_CLIENT_ABORTED
        client.on_change = self._client_changed
        connected = await self._dial()
        if connected is None:
            # Every backend failed: close without sending the client a byte.
            if client.transport is not None:
                client.transport.close()
            return END_NO_BACKEND
        record = self.record
        record.backend = connected.backend.name
        record.backend_address = connected.address
        record.local_address = connected.local_address
        relay = self.service.new_relay(client, connected.endpoint)
        record.relay = relay.kind
        self._relay = relay
        relay.start()
        return await asyncio.shield(relay.done)

    async def _dial(self) -> Connected | None:
        attempts: list[Attempt] = self.record.attempts
        started = time.monotonic()
        connected = await self.service.dialer.connect(self.service.plan(self.peer), attempts)
        if connected is not None:
            self.record.connect_time = time.monotonic() - started
        return connected

    def _client_changed(self) -> None:
        client = self._client
        if client is not None and client.lost and not self._client_gone:
            self._client_gone = True
            if self._task is not None:
                self._task.cancel()

    def _close_all(self) -> None:
        if self._relay is not None:
            self._relay.shutdown(END_SHUTDOWN)
        elif self._client is not None:
            self._client.abort()
        else:
            self._sock.close()
