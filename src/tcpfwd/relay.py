"""The byte pump between two sockets of one session.

Each socket gets an :class:`Endpoint` protocol. Until the session links two endpoints,
an endpoint *holds* what it reads (bounded: past ``limit`` bytes it stops reading), so
nothing a client sends while its backend is being chosen is lost, and the dialer can
inspect a backend's first bytes. Once linked, each endpoint writes what it reads into
its peer's transport, and the peer's write-buffer water marks pause and resume reading
on this side: two of asyncio's flow-control transports wired crosswise, so memory stays
bounded by the buffer limits whatever the speed of either peer.

Half-close: an EOF read on one side becomes ``write_eof`` on the other; the session ends
when both directions have seen their EOF, or at once when either socket fails (a reset
is passed on as an abort so the other peer learns promptly).

This is the portable relay. ``splice.py`` has the Linux zero-copy one; both derive from
:class:`BaseRelay`, which is all the session knows of a relay.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from typing import ClassVar, Final, cast

# Why a relay ended, first cause wins; these words appear in the access log.
END_CLIENT_CLOSED: Final = "client_closed"
END_BACKEND_CLOSED: Final = "backend_closed"
END_CLIENT_RESET: Final = "client_reset"
END_BACKEND_RESET: Final = "backend_reset"
END_IDLE_TIMEOUT: Final = "idle_timeout"
END_SHUTDOWN: Final = "shutdown"


class Endpoint(asyncio.Protocol):
    """One socket of a session: holds its input until linked, then forwards to its peer."""

    __slots__ = (
        "eof",
        "error",
        "held",
        "limit",
        "lost",
        "on_change",
        "peer",
        "received",
        "relay",
        "role",
        "transport",
        "write_paused",
    )

    def __init__(self, role: str, limit: int) -> None:
        self.role = role
        self.limit = limit
        self.transport: asyncio.Transport | None = None
        self.peer: Endpoint | None = None
        self.relay: Relay | None = None
        self.held = bytearray()
        self.received = 0
        self.eof = False
        self.lost = False
        self.error: BaseException | None = None
        self.write_paused = False
        # Called on every event while held, so a waiting dialer or session can react.
        self.on_change: Callable[[], None] | None = None

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=self.limit, low=self.limit // 4)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        peer = self.peer
        if peer is not None:
            assert peer.transport is not None
            peer.transport.write(data)
            return
        self.held += data
        if len(self.held) >= self.limit and self.transport is not None:
            self.transport.pause_reading()
        self._changed()

    def eof_received(self) -> bool:
        self.eof = True
        if self.relay is not None:
            self.relay.eof_from(self)
        else:
            self._changed()
        # Keep the socket open for writing: half-close is passed on, not turned into a close.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc
        if self.relay is not None:
            self.relay.lost(self, exc)
        else:
            self._changed()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    # --- used by the dialer and the session -----------------------------------------

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def take_held(self, count: int) -> bytes:
        """Remove and return the first ``count`` held bytes (e.g. a greeting checked)."""
        chunk = bytes(self.held[:count])
        del self.held[:count]
        if self.transport is not None and len(self.held) < self.limit:
            self.transport.resume_reading()
        return chunk

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class BaseRelay(abc.ABC):
    """What every relay shares: the outcome, the byte counters and the idle timer.

    The session sees only this: ``start()``, the ``done`` future (the end word), ``end``,
    ``shutdown(reason)`` and the byte counters. Counters live in the two endpoints
    (``Endpoint.received``) so they cover the bytes held before the relay started.
    """

    __slots__ = (
        "_idle_handle",
        "_idle_seen",
        "_idle_since",
        "_idle_timeout",
        "_loop",
        "backend",
        "client",
        "done",
        "end",
    )

    # Which relay moved the bytes, as the access log names it.
    kind: ClassVar[str] = ""

    def __init__(
        self,
        client: Endpoint,
        backend: Endpoint,
        *,
        idle_timeout: float | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.client = client
        self.backend = backend
        self.end: str | None = None
        self.done: asyncio.Future[str] = self._loop.create_future()
        self._idle_timeout = idle_timeout
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_seen = -1
        self._idle_since = 0.0

    @property
    def bytes_from_client(self) -> int:
        return self.client.received

    @property
    def bytes_from_backend(self) -> int:
        return self.backend.received

    @abc.abstractmethod
    def start(self) -> None:
        """Begin relaying; what the endpoints held goes first."""

    @abc.abstractmethod
    def shutdown(self, reason: str = END_SHUTDOWN) -> None:
        """Close both sides at once (grace period over, idle timeout)."""

    def _closed_by(self, side: Endpoint) -> None:
        """An orderly EOF from ``side``: the first cause of the end, unless one is known."""
        if self.end is None:
            self.end = END_CLIENT_CLOSED if side is self.client else END_BACKEND_CLOSED

    def _reset_by(self, side: Endpoint) -> None:
        # A reset after a half-close is still a reset: it is what ended the session.
        if self.end is None or self.end in (END_CLIENT_CLOSED, END_BACKEND_CLOSED):
            self.end = END_CLIENT_RESET if side is self.client else END_BACKEND_RESET

    def _shut_down_for(self, reason: str) -> None:
        if self.end is None or self.end in (END_CLIENT_CLOSED, END_BACKEND_CLOSED):
            self.end = reason

    def _finish(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        if not self.done.done():
            self.done.set_result(self.end or END_CLIENT_CLOSED)

    # Idle detection without touching the data path: a timer compares byte counters.
    def _start_idle_timer(self) -> None:
        if self._idle_timeout is not None and self.end is None:
            self._idle_since = self._loop.time()
            self._idle_seen = self.client.received + self.backend.received
            self._arm_idle(self._idle_timeout / 4)

    def _arm_idle(self, delay: float) -> None:
        self._idle_handle = self._loop.call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        assert self._idle_timeout is not None
        now = self._loop.time()
        seen = self.client.received + self.backend.received
        if seen != self._idle_seen:
            self._idle_seen = seen
            self._idle_since = now
        elif now - self._idle_since >= self._idle_timeout:
            self.shutdown(END_IDLE_TIMEOUT)
            return
        # Quarter steps: the timeout fires at most a quarter of itself late.
        self._arm_idle(self._idle_timeout / 4)


class Relay(BaseRelay):
    """The portable relay: two linked endpoints, each writing what it reads to the other."""

    __slots__ = ()

    kind = "copy"

    def start(self) -> None:
        """Link the endpoints: flush what each held, then pass on what already happened."""
        client, backend = self.client, self.backend
        client.peer, backend.peer = backend, client
        client.relay = backend.relay = self
        client.on_change = backend.on_change = None
        for side in (client, backend):
            peer = side.peer
            assert peer is not None and peer.transport is not None
            if side.held:
                peer.transport.write(bytes(side.held))
                side.held.clear()
        for side in (client, backend):
            if side.lost:
                self.lost(side, side.error)
                return
        for side in (client, backend):
            if side.eof:
                self.eof_from(side)
        for side in (client, backend):
            assert side.peer is not None and side.transport is not None
            if not side.peer.write_paused and not side.eof:
                side.transport.resume_reading()
        self._start_idle_timer()

    def eof_from(self, side: Endpoint) -> None:
        peer = side.peer
        assert peer is not None and peer.transport is not None
        self._closed_by(side)
        if not peer.transport.is_closing():
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
            else:
                peer.transport.close()
        if peer.eof:
            # Both directions are finished: close (after the buffers drain).
            self._close_both()

    def lost(self, side: Endpoint, exc: BaseException | None) -> None:
        peer = side.peer
        assert peer is not None
        if exc is not None:
            self._reset_by(side)
            peer.abort()
        elif self.end is None:
            self._closed_by(side)
            if peer.transport is not None:
                peer.transport.close()
        elif not peer.lost and peer.transport is not None:
            peer.transport.close()
        if side.lost and peer.lost:
            self._finish()

    def shutdown(self, reason: str = END_SHUTDOWN) -> None:
        """Close both sides at once (grace period over, idle timeout)."""
        self._shut_down_for(reason)
        self.client.abort()
        self.backend.abort()

    def _close_both(self) -> None:
        for side in (self.client, self.backend):
            if side.transport is not None:
                side.transport.close()
