"""The byte pump between the two sockets of a session, driven by readiness events.

Each direction is a `Flow`: what is read from its source socket is written to its
destination socket at once; what the destination cannot take yet waits as the flow's
``pending`` bytes, and the source is not read again until they have gone. So at most one
chunk waits in tcpfwd per direction, whatever the speed of either peer, and a slow
reader slows its writer down through TCP itself (the approach of asyncio's
``_SelectorSocketTransport`` with its water marks, without the transport object).

Splice: a flow that has moved ``splice_at`` bytes (from the first byte when the service
asks for ``relay = "splice"``; after a few hundred KiB with ``"auto"``, so a short
session never pays for a pipe) moves the rest socket → pipe → socket inside the kernel,
through a pipe taken from the shared pool for as long as bytes are in flight; a chunk
that gets no pipe is copied. Why only into an empty pipe: a pipe's capacity counts page
slots, not bytes; a socket splice can fill every slot with fewer bytes than the pipe's
size, and then a readable source in front of a full pipe would wake us forever.

Half-close: an EOF read from one side becomes ``shutdown(SHUT_WR)`` on the other once
its pending bytes have gone; the session ends when both directions have seen theirs
(then both sockets are closed). A failed socket (a reset) ends it at once, and the other
socket is reset too, so its peer learns promptly. The first cause is the end word.

Interest per socket is what its two flows need: reading for the flow it feeds, writing
for the flow that waits on it. A socket that needs neither is taken out of the epoll
(a hang-up is reported whatever the mask, and would wake us for nothing).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from typing import TYPE_CHECKING, Final

from .reactor import DONTWAIT, ERR, HUP, IN, OUT, RawSocket
from .splice import RELAY_COPY, RELAY_SPLICE, ROUNDS_PER_WAKEUP, SPLICE_FLAGS, PipePool

if TYPE_CHECKING:
    from .reactor import Reactor
    from .splice import Pipe

# Why a relay ended, first cause wins; these words appear in the access log.
END_CLIENT_CLOSED: Final = "client_closed"
END_BACKEND_CLOSED: Final = "backend_closed"
END_CLIENT_RESET: Final = "client_reset"
END_BACKEND_RESET: Final = "backend_reset"
END_IDLE_TIMEOUT: Final = "idle_timeout"
END_SHUTDOWN: Final = "shutdown"

# Bytes read at once (at most the service's buffer_size).
CHUNK: Final = 64 << 10
# Not watched at all (a descriptor's interest is otherwise a mask of events).
UNWATCHED: Final = -1

_RESET_ON_CLOSE: Final = struct.pack("ii", 1, 0)
_CLOSED_WORDS: Final = (END_CLIENT_CLOSED, END_BACKEND_CLOSED)
_TRY_READ: Final = IN | ERR | HUP
_TRY_WRITE: Final = OUT | ERR | HUP


class Flow:
    """One direction of a session: ``src`` → ``dst``."""

    __slots__ = (
        "dst",
        "dst_fd",
        "eof",
        "pending",
        "pipe",
        "received",
        "shut",
        "splice_at",
        "src",
        "src_fd",
    )

    def __init__(
        self,
        src: RawSocket,
        src_fd: int,
        dst: RawSocket,
        dst_fd: int,
        *,
        held: bytes,
        splice_at: int,
    ) -> None:
        self.src = src
        self.src_fd = src_fd
        self.dst = dst
        self.dst_fd = dst_fd
        # Bytes read from src and not yet written to dst (what was held goes first).
        self.pending: bytes | memoryview | None = held or None
        # The pipe this flow splices through, held only while bytes are in it.
        self.pipe: Pipe | None = None
        # Bytes read from src, held bytes included.
        self.received = len(held)
        self.splice_at = splice_at
        # src sent its EOF; we passed it on (shut dst for writing).
        self.eof = False
        self.shut = False


class Relay:
    """Two sockets joined. The session derives from this; see the module docstring.

    Once ``_start_relay`` has run, the reactor sends the events of both sockets to
    ``on_event``; the subclass implements ``_finish(end)``, called once both sockets
    are closed.
    """

    __slots__ = ("bmask", "chunk", "cmask", "down", "end", "pool", "reactor", "spliced", "up")

    # Set by _start_relay.
    up: Flow
    down: Flow
    reactor: Reactor | None
    pool: PipePool
    chunk: int
    cmask: int
    bmask: int
    end: str | None
    spliced: bool

    def _start_relay(
        self,
        reactor: Reactor,
        client: RawSocket,
        client_mask: int,
        backend: RawSocket,
        backend_mask: int,
        *,
        to_backend: bytes,
        to_client: bytes,
        pool: PipePool,
        splice_at: int,
        chunk: int,
    ) -> None:
        """Join ``client`` and ``backend`` (each watched with its mask so far, or
        ``UNWATCHED``); bytes held for either side go first."""
        client_fd = client.fileno()
        backend_fd = backend.fileno()
        self.reactor = reactor
        self.up = Flow(client, client_fd, backend, backend_fd, held=to_backend, splice_at=splice_at)
        self.down = Flow(
            backend, backend_fd, client, client_fd, held=to_client, splice_at=splice_at
        )
        self.pool = pool
        self.chunk = chunk
        self.spliced = False
        self.end = None
        self.cmask = client_mask
        self.bmask = backend_mask
        handlers = reactor.handlers
        if client_mask != UNWATCHED:
            handlers[client_fd] = self  # type: ignore[assignment]
        if backend_mask != UNWATCHED:
            handlers[backend_fd] = self  # type: ignore[assignment]
        if to_backend:
            self._flush(self.up)
        if to_client and self.reactor is not None:
            self._flush(self.down)
        if self.reactor is not None:
            self._update()

    def _finish(self, end: str) -> None:
        """Both sockets are closed: say how the session ended."""
        raise NotImplementedError

    # --- events ----------------------------------------------------------------------

    def on_event(self, fd: int, events: int) -> None:
        """A socket of the session is ready. The usual event (bytes to pass on, and the
        other side takes them all) is handled here without a further call."""
        up = self.up
        if fd == up.src_fd:
            into = self.down
            out_of = up
        else:
            into = up
            out_of = self.down
        if events & _TRY_WRITE and (into.pending is not None or into.pipe is not None):
            self._flush(into)
            if self.reactor is None:
                return
            self._update()
        if (
            not events & _TRY_READ
            or out_of.eof
            or out_of.pending is not None
            or out_of.pipe is not None
        ):
            return
        if out_of.received >= out_of.splice_at:
            self._splice(out_of)
            if self.reactor is not None:
                self._update()
            return
        try:
            data = out_of.src.recv(self.chunk, DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._broken(fd)
            return
        if not data:
            self._eof(out_of)
            if self.reactor is not None:
                self._update()
            return
        count = len(data)
        out_of.received += count
        try:
            sent = out_of.dst.send(data, DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._broken(out_of.dst_fd)
            return
        if sent != count:
            out_of.pending = memoryview(data)[sent:]
            self._update()

    @property
    def relay_kind(self) -> str:
        """How the bytes moved, as the access log names it."""
        up, down = self.up, self.down
        if up.received >= up.splice_at or down.received >= down.splice_at:
            return RELAY_SPLICE
        return RELAY_COPY

    def shutdown(self, reason: str = END_SHUTDOWN) -> None:
        """Close both sides now (grace period over, idle timeout, backend disabled)."""
        if self.end is None or self.end in _CLOSED_WORDS:
            self.end = reason
        self._close()

    # --- moving bytes ------------------------------------------------------------------

    def _copy(self, flow: Flow) -> None:
        """One chunk through user space (a splicing flow that got no pipe)."""
        try:
            data = flow.src.recv(self.chunk, DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._broken(flow.src_fd)
            return
        if not data:
            self._eof(flow)
            return
        flow.received += len(data)
        try:
            sent = flow.dst.send(data, DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._broken(flow.dst_fd)
            return
        if sent != len(data):
            flow.pending = memoryview(data)[sent:]

    def _splice(self, flow: Flow) -> None:
        pipe = flow.pipe
        if pipe is None:
            pipe = self.pool.take()
            if pipe is None:
                # No pipe to be had (budget, descriptors, quota): copy this chunk.
                self._copy(flow)
                return
            flow.pipe = pipe
            if not self.spliced:
                # splice(2) waits on a socket in blocking mode, whatever its flags say.
                self.spliced = True
                flow.src.setblocking(False)
                flow.dst.setblocking(False)
        for _ in range(ROUNDS_PER_WAKEUP):
            try:
                moved = os.splice(flow.src_fd, pipe.write_fd, pipe.size, flags=SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._broken(flow.src_fd)
                return
            if not moved:
                flow.pipe = None
                self.pool.release(pipe)
                self._eof(flow)
                return
            flow.received += moved
            pipe.pending = moved
            try:
                pipe.pending -= os.splice(pipe.read_fd, flow.dst_fd, moved, flags=SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._broken(flow.dst_fd)
                return
            if pipe.pending:
                # The destination is full: wait until it drains, reading nothing.
                return
        flow.pipe = None
        self.pool.release(pipe)

    def _flush(self, flow: Flow) -> None:
        """Write what waits for the destination; pass an EOF on once it has gone."""
        pending = flow.pending
        if pending is not None:
            try:
                sent = flow.dst.send(pending, DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._broken(flow.dst_fd)
                return
            if sent != len(pending):
                flow.pending = pending[sent:]
                return
            flow.pending = None
        pipe = flow.pipe
        if pipe is not None:
            try:
                pipe.pending -= os.splice(
                    pipe.read_fd, flow.dst_fd, pipe.pending, flags=SPLICE_FLAGS
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._broken(flow.dst_fd)
                return
            if pipe.pending:
                return
            flow.pipe = None
            self.pool.release(pipe)
        if flow.eof:
            self._eof(flow)

    def _eof(self, flow: Flow) -> None:
        """The source sent its EOF: pass it on once nothing of it waits any more."""
        flow.eof = True
        if self.end is None:
            self.end = END_CLIENT_CLOSED if flow is self.up else END_BACKEND_CLOSED
        if flow.pending is not None or flow.pipe is not None:
            return
        other = self.down if flow is self.up else self.up
        if other.shut:
            # Both directions are finished: closing sends the last FIN.
            self._close()
            return
        try:
            flow.dst.shutdown(socket.SHUT_WR)
        except OSError:
            self._broken(flow.dst_fd)
            return
        flow.shut = True

    def _broken(self, fd: int) -> None:
        """A socket failed: that side reset; pass the reset on to the other at once."""
        up = self.up
        client = fd == up.src_fd
        # A reset after a half-close is still a reset: it is what ended the session.
        if self.end is None or self.end in _CLOSED_WORDS:
            self.end = END_CLIENT_RESET if client else END_BACKEND_RESET
        other = up.dst if client else up.src
        with contextlib.suppress(OSError):
            other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        self._close()

    # --- interest ----------------------------------------------------------------------

    def _update(self) -> None:
        """Watch each socket for what its flows need now, and nothing else."""
        up, down = self.up, self.down
        want = (IN if not up.eof and up.pending is None and up.pipe is None else 0) | (
            OUT if down.pending is not None or down.pipe is not None else 0
        )
        if want != self.cmask:
            self.cmask = self._rewatch(up.src_fd, self.cmask, want)
        want = (IN if not down.eof and down.pending is None and down.pipe is None else 0) | (
            OUT if up.pending is not None or up.pipe is not None else 0
        )
        if want != self.bmask:
            self.bmask = self._rewatch(down.src_fd, self.bmask, want)

    def _rewatch(self, fd: int, old: int, new: int) -> int:
        reactor = self.reactor
        assert reactor is not None
        if not new:
            if old != UNWATCHED:
                reactor.remove(fd)
            return UNWATCHED
        if old == UNWATCHED:
            reactor.add(fd, new, self)  # type: ignore[arg-type]
        else:
            reactor.modify(fd, new)
        return new

    def _close(self) -> None:
        reactor = self.reactor
        if reactor is None:
            return
        self.reactor = None
        up, down = self.up, self.down
        for flow in (up, down):
            if flow.pipe is not None:
                # A pipe with bytes left in it is closed, never reused (see PipePool).
                self.pool.release(flow.pipe)
                flow.pipe = None
        reactor.forget(up.src_fd)
        reactor.forget(up.dst_fd)
        up.src.close()
        up.dst.close()
        self._finish(self.end or END_CLIENT_CLOSED)
