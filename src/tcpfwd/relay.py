"""The byte pump between the two sockets of a session, driven by readiness events.

Each direction is a `Flow`: what is read from its source socket is written to its
destination socket at once; what the destination cannot take yet waits as the flow's
``pending`` bytes, and the source is not read again until they have gone. So at most one
chunk waits in tcpfwd per direction, whatever the speed of either peer, and a slow
reader slows its writer down through TCP itself (the approach of asyncio's
``_SelectorSocketTransport`` with its water marks, without the transport object).

Sockets are watched edge-triggered, as nginx watches them: each is registered once, for
everything it may need (reading, writing, the peer's EOF), and never modified or
removed (closing it removes it). A readiness event then comes when something new
happens, not as long as a state lasts, so the relay reads a socket until it has taken
all there was (a read shorter than asked, or EAGAIN), and, having stopped reading a
source while its destination was full, reads it again as soon as the destination has
drained, without waiting for an event that already came. This spares two ``epoll_ctl``
per session and all bookkeeping of what to watch.

Splice: a flow that has moved ``splice_at`` bytes (from the first byte when the service
asks for ``relay = "splice"``; after a few hundred KiB with ``"auto"``, so a short
session never pays for a pipe) moves the rest socket → pipe → socket inside the kernel,
through a pipe taken from the shared pool for as long as bytes are in flight; a chunk
that gets no pipe is copied. Why only into an empty pipe: a pipe's capacity counts page
slots, not bytes; a socket splice can fill every slot with fewer bytes than the pipe's
size.

Half-close: an EOF read from one side becomes ``shutdown(SHUT_WR)`` on the other once
its pending bytes have gone; the session ends when both directions have seen theirs
(then both sockets are closed). A failed socket (a reset) ends it at once, and the other
socket is reset too, so its peer learns promptly. The first cause is the end word.

Fairness: one event moves at most a few chunks (or pipes) per direction; a flow with
more to move carries on in the next turn of the loop, after other sessions had theirs.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import TYPE_CHECKING, Final

from .reactor import DONTWAIT, EDGE, ERR, HUP, IN, OUT, RDHUP, RawSocket
from .splice import PipePool, Splicing
from .vocabulary import End, EndWord

if TYPE_CHECKING:
    from .reactor import Reactor
    from .splice import Pipe

# Why a relay ended, first cause wins; these words appear in the access log.

# Bytes read at once (at most the service's buffer_size).
CHUNK: Final = 64 << 10
# Reads per direction and event before other sessions get a turn.
READS_PER_EVENT: Final = 4
# Not watched at all (a descriptor's interest is otherwise a mask of events).
UNWATCHED: Final = -1
# How the relay watches its sockets: everything, edge-triggered (writing only where
# needed for a client: its socket is writable at once, which would be an event for
# nothing; a backend is watched for writing anyway, to learn it connected).
CLIENT_EVENTS: Final = IN | RDHUP | EDGE
CLIENT_EVENTS_WRITING: Final = IN | OUT | RDHUP | EDGE
BACKEND_EVENTS: Final = IN | OUT | RDHUP | EDGE

_RESET_ON_CLOSE: Final = struct.pack("ii", 1, 0)
_CLOSED_WORDS: Final = (End.CLIENT_CLOSED, End.BACKEND_CLOSED)
# The words every session needs, taken from their enum once: on Python 3.11 a member's
# lookup on its class goes through EnumType.__getattr__, a dozen times a global's cost.
_CLIENT_CLOSED, _BACKEND_CLOSED = _CLOSED_WORDS
_TRY_READ: Final = IN | RDHUP | ERR | HUP
_TRY_WRITE: Final = OUT | ERR | HUP


class Flow:
    """One direction of a session: ``src`` → ``dst``."""

    # One per direction of every session: positional arguments, as they are cheaper.

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

    def __init__(  # noqa: PLR0917
        self,
        src: RawSocket,
        src_fd: int,
        dst: RawSocket,
        dst_fd: int,
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


class Relay(Splicing):
    """Two sockets joined. The session derives from this; see the module docstring.

    Once ``_start_relay`` has run, the reactor sends the events of both sockets to
    ``on_event``; the subclass implements ``_finish(end)``, called once both sockets
    are closed.
    """

    __slots__ = ("chunk", "cmask", "down", "end", "pool", "reactor", "up")

    # Set by _start_relay.
    up: Flow
    down: Flow
    reactor: Reactor | None
    pool: PipePool
    chunk: int
    cmask: int
    end: End | None

    def _start_relay(  # noqa: PLR0917 - called once per session: positional is cheaper
        self,
        reactor: Reactor,
        client: RawSocket,
        client_mask: int,
        backend: RawSocket,
        to_backend: bytes,
        to_client: bytes,
        backend_readable: bool,
        pool: PipePool,
        splice_at: int,
        chunk: int,
    ) -> None:
        """Join ``client`` (watched so far with ``client_mask``, or ``UNWATCHED``) and
        ``backend`` (watched with ``BACKEND_EVENTS`` since its connect, and readable
        already if ``backend_readable``); bytes held for either side go first."""
        client_fd = client.fileno()
        backend_fd = backend.fileno()
        self.reactor = reactor
        up = self.up = Flow(client, client_fd, backend, backend_fd, to_backend, splice_at)
        down = self.down = Flow(backend, backend_fd, client, client_fd, to_client, splice_at)
        self.pool = pool
        self.chunk = chunk
        self.spliced = False
        self.end = None
        reactor.handlers[backend_fd] = self  # type: ignore[assignment]
        # Registered (or changed) now, the client's socket is reported at once if it
        # has something to read: no read needs trying here.
        self.cmask = CLIENT_EVENTS
        if client_mask == UNWATCHED:
            reactor.register(client_fd, CLIENT_EVENTS)
            reactor.handlers[client_fd] = self  # type: ignore[assignment]
        else:
            reactor.hand_over(client_fd, self)  # type: ignore[arg-type]
            reactor.modify(client_fd, CLIENT_EVENTS)
        if to_backend:
            self._flush(up)
        if to_client and self.reactor is not None:
            self._flush(down)
        # The backend's event that said it connected may have said it had bytes too.
        if backend_readable and self.reactor is not None and down.pending is None:
            self._pump(down)

    def _finish(self, end: EndWord) -> None:
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
        if not events & _TRY_READ:
            return
        if out_of.eof or out_of.pending is not None or out_of.pipe is not None:
            # Nothing to read now (the source is read again once its bytes are gone);
            # but an error must not go unheard: no later event will repeat it.
            if events & ERR:
                self._broken(fd)
            return
        if out_of.received >= out_of.splice_at:
            self._splice(out_of)
            return
        # The usual case, inline: one read, one write.
        chunk = self.chunk
        try:
            data = out_of.src.recv(chunk, DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._broken(fd)
            return
        if not data:
            self._eof(out_of)
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
            self._wait_for(out_of, memoryview(data)[sent:])
        elif count == chunk or events & RDHUP:
            # A full read, or the peer's EOF is waiting behind the bytes: there is more,
            # and no event will say so.
            self._copy(out_of, READS_PER_EVENT - 1, drain=bool(events & RDHUP))

    def shutdown(self, reason: End = End.SHUTDOWN) -> None:
        """Close both sides now (grace period over, idle timeout, backend disabled)."""
        if self.end is None or self.end in _CLOSED_WORDS:
            self.end = reason
        self._close()

    # --- moving bytes ------------------------------------------------------------------

    def _pump(self, flow: Flow) -> None:
        """Read what the source has and pass it on: its events may have come while it
        was not read (what they said is not known, so read until it has nothing)."""
        if flow.received >= flow.splice_at:
            self._splice(flow)
        else:
            self._copy(flow, READS_PER_EVENT, drain=True)

    def _copy(self, flow: Flow, reads: int, *, drain: bool) -> None:
        """Up to ``reads`` chunks through user space, until the source has no more: a
        read shorter than asked says so, unless ``drain`` (then only EAGAIN does)."""
        chunk = self.chunk
        for _ in range(reads):
            try:
                data = flow.src.recv(chunk, DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._broken(flow.src_fd)
                return
            if not data:
                self._eof(flow)
                return
            count = len(data)
            flow.received += count
            try:
                sent = flow.dst.send(data, DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._broken(flow.dst_fd)
                return
            if sent != count:
                self._wait_for(flow, memoryview(data)[sent:])
                return
            if count != chunk and not drain:
                # A short read took everything there was.
                return
            if flow.received >= flow.splice_at:
                self._splice(flow)
                return
        self._later(flow)

    def _wait_for(self, flow: Flow, rest: memoryview | None) -> None:
        """The destination is full: hold the rest until it can take more."""
        if rest is not None:
            flow.pending = rest
        if flow.dst_fd == self.up.src_fd and self.cmask != CLIENT_EVENTS_WRITING:
            # The client's socket is watched for writing only once it is needed.
            self.cmask = CLIENT_EVENTS_WRITING
            reactor = self.reactor
            assert reactor is not None
            reactor.modify(flow.dst_fd, CLIENT_EVENTS_WRITING)

    def _later(self, flow: Flow) -> None:
        """The source may have more: carry on in the next turn of the loop."""
        reactor = self.reactor
        assert reactor is not None
        reactor.loop.call_soon(self._resume, flow)

    def _resume(self, flow: Flow) -> None:
        if self.reactor is not None and not flow.eof and flow.pending is None and flow.pipe is None:
            try:
                self._pump(flow)
            except Exception as error:
                self.reactor_failed(error)

    def reactor_failed(self, error: Exception) -> None:
        reactor = self.reactor
        if reactor is not None:
            reactor.report(self, error)  # type: ignore[arg-type]

    def _flush(self, flow: Flow) -> None:
        """Write what waits for the destination; then read the source again (its events
        came while it was not read), or pass its EOF on."""
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
        if flow.pipe is not None and not self._drain_pipe(flow):
            return
        if flow.eof:
            self._eof(flow)
        else:
            self._pump(flow)

    def _eof(self, flow: Flow) -> None:
        """The source sent its EOF: pass it on once nothing of it waits any more."""
        flow.eof = True
        if self.end is None:
            self.end = _CLIENT_CLOSED if flow is self.up else _BACKEND_CLOSED
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
            self.end = End.CLIENT_RESET if client else End.BACKEND_RESET
        other = up.dst if client else up.src
        with contextlib.suppress(OSError):
            other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        self._close()

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
        # What Reactor.forget does, for both: closing takes them out of the epoll.
        handlers = reactor.handlers
        closed = reactor.closed
        fd = up.src_fd
        handlers.pop(fd, None)
        closed.add(fd)
        fd = up.dst_fd
        handlers.pop(fd, None)
        closed.add(fd)
        up.src.close()
        up.dst.close()
        self._finish(self.end or End.CLIENT_CLOSED)
