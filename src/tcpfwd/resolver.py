"""Backend names to addresses, through a small cache shared by the dialer and the checks.

A name is resolved when a backend is tried, never at startup, so a name that does not
resolve is a failing backend rather than a daemon that refuses to start. The cache keeps
the resolver off the path of most connections, and keeps a slow or failing DNS server
from slowing every one of them:

- a fresh answer is used as is for ``ttl`` seconds;
- an expired answer is still used while one background lookup refreshes it; a failed
  refresh keeps the old answer (serve-stale, as RFC 8767 recommends), except when the
  name no longer exists;
- a failed lookup is remembered for ``NEGATIVE_TTL`` seconds, so a dead DNS server costs
  one connection a timeout, not all of them;
- concurrent lookups of one name share a single query.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .vocabulary import HostPort

# How long a failed lookup is remembered; short, so a fixed DNS record is seen soon.
NEGATIVE_TTL = 5.0

Addresses = tuple[HostPort, ...]
GetAddrInfo = Callable[..., Awaitable[list[tuple[Any, ...]]]]


@functools.lru_cache(maxsize=1024)
def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(slots=True)
class _Entry:
    addresses: Addresses | None
    error: OSError | None
    expires: float


class Resolver:
    """``resolve(host, port, ttl)``: every address of a name, in the resolver's order."""

    def __init__(
        self,
        *,
        getaddrinfo: GetAddrInfo | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``getaddrinfo`` and ``clock`` default to the running loop's (tests pass fakes)."""
        self._getaddrinfo = getaddrinfo
        self._clock = clock
        self._entries: dict[HostPort, _Entry] = {}
        self._pending: dict[HostPort, asyncio.Future[Addresses]] = {}

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    def cached(self, host: str, port: int) -> Addresses | None:
        """The answer if one is at hand, without waiting: a fresh one, or a stale one
        (a refresh then starts behind the caller's back); None: ``resolve`` must ask.
        Raises the remembered failure of a name that did not resolve a moment ago."""
        entry = self._entries.get((host, port))
        if entry is None:
            return None
        if entry.expires > self._now():
            if entry.error is not None:
                raise type(entry.error)(*entry.error.args)
            return entry.addresses
        return None

    async def resolve(self, host: str, port: int, ttl: float) -> Addresses:
        """Raises OSError (``socket.gaierror``) when the name cannot be resolved."""
        if is_ip_literal(host):
            return ((host, port),)
        key = (host, port)
        entry = self._entries.get(key)
        now = self._now()
        if entry is not None:
            if entry.expires > now:
                if entry.error is not None:
                    # A fresh exception each time: re-raising one instance grows its traceback.
                    raise type(entry.error)(*entry.error.args)
                assert entry.addresses is not None
                return entry.addresses
            if entry.addresses is not None:
                # Stale but usable: answer now, refresh behind the caller's back.
                self._lookup(key, ttl)
                return entry.addresses
        # Shielded: a caller that gives up (its timeout, its client gone) does not cancel
        # the query the other callers are waiting on.
        return await asyncio.shield(self._lookup(key, ttl))

    def _lookup(self, key: HostPort, ttl: float) -> asyncio.Future[Addresses]:
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._query(key, ttl))
            self._pending[key] = pending
            pending.add_done_callback(functools.partial(self._done, key))
        return pending

    def _done(self, key: HostPort, future: asyncio.Future[Addresses]) -> None:
        self._pending.pop(key, None)
        if not future.cancelled():
            # Retrieved here so an unawaited background refresh never logs a warning.
            future.exception()

    async def _query(self, key: HostPort, ttl: float) -> Addresses:
        host, port = key
        getaddrinfo = self._getaddrinfo or asyncio.get_running_loop().getaddrinfo
        try:
            infos = await getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as error:
            old = self._entries.get(key)
            gone = isinstance(error, socket.gaierror) and error.errno == socket.EAI_NONAME
            if old is not None and old.addresses is not None and not gone:
                # Serve stale: retry after the negative TTL, keep answering meanwhile.
                old.expires = self._now() + NEGATIVE_TTL
                return old.addresses
            self._entries[key] = _Entry(None, error, self._now() + NEGATIVE_TTL)
            raise
        addresses: list[HostPort] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            address = (str(sockaddr[0]), int(sockaddr[1]))
            if address not in addresses:
                addresses.append(address)
        result = tuple(addresses)
        if ttl > 0:
            self._entries[key] = _Entry(result, None, self._now() + ttl)
        else:
            self._entries.pop(key, None)
        return result

    async def close(self) -> None:
        """Cancel background refreshes (the daemon is stopping)."""
        pending = list(self._pending.values())
        for future in pending:
            future.cancel()
        for future in pending:
            with contextlib.suppress(BaseException):
                await future
