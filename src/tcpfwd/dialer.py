"""The failover sequence: try backends in the order given, return the first that connects.

Each backend is resolved when it is tried (a name that does not resolve is a failed
attempt, not an error of the daemon), and each address it resolves to is tried in turn.
Every attempt, failed or not, is recorded with its reason for the session's log line.

A backend with ``send_proxy`` gets the session's PROXY header in one write as soon as it
is connected, before any byte of the client and before anything is awaited from it.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .config import BackendConfig, ServiceSettings, format_hostport
from .proxy_send import SessionHeaders
from .relay import Endpoint

OUTCOME_OK = "ok"
OUTCOME_REFUSED = "refused"
OUTCOME_TIMEOUT = "timeout"
OUTCOME_UNREACHABLE = "unreachable"
OUTCOME_DNS = "dns"
OUTCOME_FAILOVER_TIMEOUT = "failover_timeout"

# Below this, an attempt could not even complete a loopback handshake: do not start it.
MIN_ATTEMPT_TIME = 0.001

_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}


@dataclass(slots=True)
class Attempt:
    backend: str
    address: str
    outcome: str
    elapsed: float


@dataclass(slots=True)
class Connected:
    backend: BackendConfig
    endpoint: Endpoint
    address: str
    local_address: str


@functools.lru_cache(maxsize=1024)
def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def describe_failure(error: BaseException) -> str:
    """A short, stable word for why a connect failed, as it appears in the log."""
    if isinstance(error, TimeoutError):
        return OUTCOME_TIMEOUT
    if isinstance(error, ConnectionRefusedError):
        return OUTCOME_REFUSED
    if isinstance(error, socket.gaierror):
        return OUTCOME_DNS
    if isinstance(error, OSError) and error.errno is not None:
        if error.errno in _UNREACHABLE:
            return OUTCOME_UNREACHABLE
        return errno.errorcode.get(error.errno, str(error.errno)).lower()
    return type(error).__name__


def configure_socket(sock: socket.socket | object, settings: ServiceSettings) -> None:
    """Apply the service's TCP options to a connected socket (either side of a session)."""
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is None:
        return
    try:
        if settings.nodelay:
            setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if settings.keepalive:
            setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_KEEPIDLE"):
                setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, int(settings.keepalive_idle))
                setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, int(settings.keepalive_interval)
                )
                setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, settings.keepalive_count)
    except OSError:
        # The peer may already be gone; the relay will find out and say so.
        pass


class Dialer:
    """Connects to a service's backends in a given order, within the service's timeouts."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self._local_addr = (settings.source_address, 0) if settings.source_address else None

    def _budget(self, now: float, deadline: float | None) -> float | None:
        """Time allowed for the next attempt; None once the failover deadline is spent."""
        budget = self.settings.connect_timeout
        if deadline is not None:
            budget = min(budget, deadline - now)
            if budget < MIN_ATTEMPT_TIME:
                return None
        return budget

    async def _resolve(self, host: str, port: int) -> list[tuple[str, int]]:
        if _is_ip_literal(host):
            return [(host, port)]
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses: list[tuple[str, int]] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            address = (str(sockaddr[0]), int(sockaddr[1]))
            if address not in addresses:
                addresses.append(address)
        return addresses

    async def connect(
        self,
        backends: Sequence[BackendConfig],
        attempts: list[Attempt],
        *,
        headers: SessionHeaders | None = None,
    ) -> Connected | None:
        """Try ``backends`` in order; record every attempt in ``attempts``.

        ``headers`` gives the PROXY header for backends with ``send_proxy``; without it
        (no client to describe) no header is sent.
        """
        settings = self.settings
        deadline = None
        if settings.failover_timeout is not None:
            deadline = time.monotonic() + settings.failover_timeout
        for backend in backends:
            host, port = backend.address.host, backend.address.port
            started = time.monotonic()
            budget = self._budget(started, deadline)
            if budget is None:
                attempts.append(
                    Attempt(backend.name, str(backend.address), OUTCOME_FAILOVER_TIMEOUT, 0.0)
                )
                return None
            try:
                async with asyncio.timeout(budget):
                    addresses = await self._resolve(host, port)
            except (OSError, TimeoutError) as error:
                outcome = OUTCOME_DNS
                if isinstance(error, TimeoutError) and budget < settings.connect_timeout:
                    outcome = OUTCOME_FAILOVER_TIMEOUT
                elif not isinstance(error, TimeoutError):
                    outcome = describe_failure(error)
                elapsed = time.monotonic() - started
                attempts.append(Attempt(backend.name, str(backend.address), outcome, elapsed))
                continue
            for ip, ip_port in addresses:
                connected = await self._connect_one(
                    backend, ip, ip_port, deadline, attempts, headers=headers
                )
                if connected is not None:
                    return connected
                if deadline is not None and time.monotonic() >= deadline:
                    break
        return None

    async def _connect_one(
        self,
        backend: BackendConfig,
        ip: str,
        port: int,
        deadline: float | None,
        attempts: list[Attempt],
        *,
        headers: SessionHeaders | None,
    ) -> Connected | None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        address = format_hostport(ip, port)
        started = time.monotonic()
        budget = self._budget(started, deadline)
        if budget is None:
            attempts.append(Attempt(backend.name, address, OUTCOME_FAILOVER_TIMEOUT, 0.0))
            return None
        try:
            async with asyncio.timeout(budget):
                transport, endpoint = await loop.create_connection(
                    lambda: Endpoint("backend", settings.buffer_size),
                    ip,
                    port,
                    local_addr=self._local_addr,
                )
        except (OSError, TimeoutError) as error:
            outcome = describe_failure(error)
            if outcome == OUTCOME_TIMEOUT and budget < settings.connect_timeout:
                # The whole sequence's bound, not this backend's, cut the attempt short.
                outcome = OUTCOME_FAILOVER_TIMEOUT
            attempts.append(Attempt(backend.name, address, outcome, time.monotonic() - started))
            return None
        if backend.send_proxy is not None and headers is not None:
            # First and whole: receivers read the header from their first recv().
            transport.write(headers.for_backend(backend.send_proxy))
        attempts.append(Attempt(backend.name, address, OUTCOME_OK, time.monotonic() - started))
        configure_socket(transport.get_extra_info("socket"), settings)
        sockname = transport.get_extra_info("sockname")
        local = format_hostport(str(sockname[0]), int(sockname[1])) if sockname else "?"
        return Connected(backend, endpoint, address, local)
