"""One client connection from accept to end.

A session wraps the accepted socket (its bytes are held, not lost, while a backend is
chosen), asks the dialer for the first backend that connects in the service's order,
links the two sockets in a relay, waits for it to end, and writes one access line.
Nothing that goes wrong inside a session escapes it.

With ``accept_proxy`` the session first checks that the peer is trusted and reads its
PROXY header; from then on the header's client address is the session's client (for
the backend order, the log line and the header sent on), and the peer is shown as
``via``. With ``send_proxy`` the dialer writes the header before any client byte.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Final

from .accesslog import AccessLog, SessionRecord
from .config import (
    ACCEPT_PROXY_OFF,
    ACCEPT_PROXY_OPTIONAL,
    BackendConfig,
    ServiceConfig,
    format_hostport,
)
from .dialer import Attempt, Connected, Dialer, configure_socket
from .proxy_accept import (
    END_UNTRUSTED,
    ClientGone,
    HeaderRejected,
    addresses_of,
    is_trusted,
    receive_header,
)
from .proxy_send import SessionHeaders
from .relay import END_CLIENT_CLOSED, END_SHUTDOWN, Endpoint, Relay

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
    """What sessions of one service share: its config, dialer and access log."""

    def __init__(self, config: ServiceConfig, access_log: AccessLog) -> None:
        self.config = config
        self.name = config.name
        self.settings = config.settings
        self.dialer = Dialer(config.settings)
        self.access_log = access_log
        # Connections refused by accept_proxy, by end word (metrics will read these).
        self.proxy_rejected: Counter[str] = Counter()

    def plan(self, client: tuple[str, int]) -> Sequence[BackendConfig]:
        """The order in which to try the backends for this client."""
        return self.config.backends


class Session:
    __slots__ = (
        "_client",
        "_client_gone",
        "_header_bytes",
        "_relay",
        "_sock",
        "_task",
        "client_address",
        "destination",
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
        # Who the client is and what it connected to: the peer and our socket's own
        # address, unless a trusted PROXY header says otherwise.
        self.client_address = peer
        self.destination: tuple[str, int] | None = None
        self._header_bytes = 0
        self._sock = sock
        self._client: Endpoint | None = None
        self._relay: Relay | None = None
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
            # What the client sent for the backend: its PROXY header is not relayed.
            record.from_client = self._client.received - self._header_bytes
        if self._relay is not None:
            record.from_backend = self._relay.backend.received
        self.service.access_log.emit(record)

    async def _serve(self) -> str:
        loop = asyncio.get_running_loop()
        settings = self.service.settings
        accept_proxy = settings.accept_proxy != ACCEPT_PROXY_OFF
        if accept_proxy and not is_trusted(self.peer[0], settings.trusted_sources):
            # Decided on the raw peer before reading a byte: its claims are never heard.
            self._sock.close()
            return self._reject(END_UNTRUSTED, "not in trusted_sources")
        configure_socket(self._sock, settings)
        transport, client = await loop.connect_accepted_socket(
            lambda: Endpoint("client", settings.buffer_size), sock=self._sock
        )
        self._client = client
        if client.lost:
            return END_CLIENT_ABORTED
        sockname = transport.get_extra_info("sockname")
        if sockname:
            self.destination = (str(sockname[0]), int(sockname[1]))
        if accept_proxy:
            refused = await self._receive_proxy_header(client)
            if refused is not None:
                return refused
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
        relay = Relay(client, connected.endpoint, idle_timeout=settings.idle_timeout)
        self._relay = relay
        relay.start()
        return await asyncio.shield(relay.done)

    async def _receive_proxy_header(self, client: Endpoint) -> str | None:
        """Read the client's PROXY header and adopt its addresses; the end word if refused."""
        settings = self.service.settings
        try:
            header, length = await receive_header(
                client,
                timeout=settings.proxy_header_timeout,
                optional=settings.accept_proxy == ACCEPT_PROXY_OPTIONAL,
            )
        except HeaderRejected as rejected:
            client.abort()
            return self._reject(rejected.end, rejected.reason)
        except ClientGone as gone:
            # Half-closed sockets stay open (for the relay's sake): close this one here.
            client.abort()
            return END_CLIENT_ABORTED if gone.reset else END_CLIENT_CLOSED
        self._header_bytes = length
        addresses = addresses_of(header) if header is not None else None
        if addresses is not None:
            self.client_address, self.destination = addresses
            self.record.client = format_hostport(*self.client_address)
            self.record.via = format_hostport(*self.peer)
        return None

    def _reject(self, end: str, reason: str) -> str:
        counts = self.service.proxy_rejected
        counts[end] += 1
        log.warning(
            "session %s: %s from %s on %s (service %s): %s; %d so far",
            self.record.session,
            end,
            format_hostport(*self.peer),
            self.listener,
            self.service.name,
            reason,
            counts[end],
        )
        return end

    async def _dial(self) -> Connected | None:
        attempts: list[Attempt] = self.record.attempts
        started = time.monotonic()
        headers = None
        if self.destination is not None:
            headers = SessionHeaders(
                self.client_address, self.destination, self.record.session.encode("ascii")
            )
        connected = await self.service.dialer.connect(
            self.service.plan(self.client_address), attempts, headers=headers
        )
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
