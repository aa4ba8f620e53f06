"""The Linux zero-copy relay: splice(2) through one pipe per direction.

Why: the copy relay brings every byte up into a Python object and writes it out again,
with a loop callback per chunk. ``splice`` moves page references socket → pipe → socket
inside the kernel, so the CPU per byte falls several times and one stream runs as fast
as the sockets allow.

Handoff: dialing and holding stay on asyncio transports, so there is one dialer and one
way to hold a client's early bytes and a backend's greeting. When the relay starts it
duplicates each transport's socket (``os.dup``), takes the bytes the endpoint held as the
first bytes to send, and closes the transport: the kernel socket lives on in our
descriptor, and the loop unregisters its own descriptor before closing it. From then on
the loop only says when a descriptor is readable or writable (``add_reader`` /
``add_writer``), and the relay moves the bytes itself.

Flow control, per direction: splice source → pipe only while the pipe is empty, then
pipe → destination; when the destination cannot take it all, watch the destination for
writability and stop watching the source. Each direction watches one descriptor at a
time, at most one pipe of data waits per direction, and a slow peer leaves us idle.
Why only into an empty pipe: a pipe's capacity counts page slots, not bytes; a socket
splice can fill every slot with fewer bytes than the pipe's size, and then a readable
source in front of a full pipe would wake the loop forever.

Half-close, resets, idle timeout, shutdown and the end words are the copy relay's
(:class:`~tcpfwd.relay.BaseRelay`): an EOF becomes ``shutdown(SHUT_WR)`` on the other
socket once the pipe has drained; an error on either socket resets the other one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import logging
import os
import select
import socket
import struct
import sys
from collections.abc import Callable
from typing import Final

from .relay import END_SHUTDOWN, BaseRelay, Endpoint

log = logging.getLogger("tcpfwd")

RELAY_SPLICE: Final = "splice"
RELAY_COPY: Final = "copy"

# Bytes per pipe: at most what one splice call moves, and what may wait in the kernel
# per direction (as buffer_size does for the copy relay). Measured on loopback, 256 KiB
# costs no more CPU per GB than 1 MiB, while 64 KiB costs half as much again; and an
# unprivileged user's pipes share fs.pipe-user-pages-soft (64 MiB by default), so each
# pipe should take no more than it needs.
PIPE_SIZE: Final = 256 << 10
# Past that quota the kernel makes new pipes 8 KiB: too small to beat copying, so a
# session that would get one is copied instead.
MIN_PIPE_SIZE: Final = 64 << 10
# What one spliced session holds for its whole life: its two sockets. A direction takes a
# pipe from the pool only while it has bytes to move and gives it back once the pipe has
# drained, so idle sessions hold no pipe and the pipes in use are bounded by the pool.
DESCRIPTORS_PER_SESSION: Final = 2
# Empty pipes kept for the next sessions, saving four syscalls per pipe per session
# (and the kernel's setup and teardown of a 256 KiB pipe). Each spliced session takes
# two, so this serves 32 concurrent sessions from the pool: with 16, a short-connection
# load at 16 concurrent clients created and closed pipes for most sessions. An idle
# empty pipe holds two descriptors and a page at most; it counts against the user's
# pipe quota only as the pipes the busiest moment needed anyway.
PIPE_POOL_MAX: Final = 64
# Moves per wakeup before other sessions get a turn (each moves up to a pipe's worth).
ROUNDS_PER_WAKEUP: Final = 8

_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_RESET_ON_CLOSE: Final = struct.pack("ii", 1, 0)

_SHORTAGE: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})

_IDLE, _READING, _WRITING = 0, 1, 2


def splice_available() -> bool:
    """Whether this system can splice sockets through pipes (Linux, Python 3.10+)."""
    return sys.platform == "linux" and hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")


def choose_relay(mode: str) -> str:
    """The relay a service uses: ``auto`` becomes splice where available, else copy."""
    if mode == RELAY_COPY or not splice_available():
        return RELAY_COPY
    return RELAY_SPLICE


class Pipe:
    """A non-blocking pipe and how many bytes we have put in it and not yet taken out."""

    __slots__ = ("pending", "read_fd", "size", "write_fd")

    def __init__(self, size: int = PIPE_SIZE) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.size = fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, size)
        except OSError:
            # Over pipe-max-size or the user's pipe quota: keep what the kernel gave.
            self.size = fcntl.fcntl(self.write_fd, fcntl.F_GETPIPE_SZ)
        self.pending = 0

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


_READABLE: Final = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITABLE: Final = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


class Poller:
    """Readiness of the spliced sockets through one epoll of our own.

    Why not the loop's ``add_reader``: uvloop gives every descriptor it is asked to
    watch a poll handle of its own, and setting one up and tearing it down costs six
    ``epoll_ctl`` and an ``ioctl`` per descriptor, for descriptors a short session
    watches once. Here a descriptor costs one ``epoll_ctl`` to add and one to remove,
    and the loop watches only this epoll's descriptor. Level-triggered, as the loop's
    watches are. A descriptor must be ``forget``-ten before it is closed: the kernel
    keeps a registration as long as the socket lives under any descriptor.
    """

    __slots__ = ("_epoll", "_masks", "_readers", "_writers", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], None]] = {}
        self._writers: dict[int, Callable[[], None]] = {}
        # What each registered descriptor is registered for (never 0: a registration
        # always reports hang-ups and errors, so a descriptor watched for nothing is
        # removed rather than kept with an empty mask, which would wake us forever).
        self._masks: dict[int, int] = {}
        loop.add_reader(self._epoll.fileno(), self._ready)

    def set_reader(self, fd: int, callback: Callable[[], None] | None) -> None:
        if callback is None:
            self._readers.pop(fd, None)
        else:
            self._readers[fd] = callback
        self._update(fd)

    def set_writer(self, fd: int, callback: Callable[[], None] | None) -> None:
        if callback is None:
            self._writers.pop(fd, None)
        else:
            self._writers[fd] = callback
        self._update(fd)

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` at all (it is about to be closed)."""
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        self._update(fd)

    def _update(self, fd: int) -> None:
        mask = (select.EPOLLIN if fd in self._readers else 0) | (
            select.EPOLLOUT if fd in self._writers else 0
        )
        old = self._masks.get(fd, 0)
        if mask == old:
            return
        if not mask:
            del self._masks[fd]
            self._epoll.unregister(fd)
            return
        if old:
            self._epoll.modify(fd, mask)
        else:
            self._epoll.register(fd, mask)
        self._masks[fd] = mask

    def _ready(self) -> None:
        try:
            events = self._epoll.poll(0)
        except InterruptedError:
            return
        readers, writers = self._readers, self._writers
        # Looked up one by one: a callback may stop watching, or close, a descriptor
        # that comes later in this batch. Hang-ups and errors wake both sides.
        for fd, mask in events:
            if mask & _READABLE:
                callback = readers.get(fd)
                if callback is not None:
                    self._call(callback)
            if mask & _WRITABLE:
                callback = writers.get(fd)
                if callback is not None:
                    self._call(callback)

    def _call(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception as error:
            # As the loop does for its own callbacks: report, and go on with the others.
            self.loop.call_exception_handler(
                {"message": "splice relay callback failed", "exception": error}
            )

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._readers.clear()
        self._writers.clear()
        self._masks.clear()


class PipeTooSmall(OSError):
    """The kernel gave a pipe too small to be worth splicing through."""


class PipeBudgetSpent(OSError):
    """Every pipe the pool may have open is in use: copy this chunk instead."""


class PipePool:
    """Pipes shared by all sessions: at most ``limit`` open at once (in use or idle), of
    which at most ``keep`` idle ones are kept; only empty pipes are ever kept."""

    __slots__ = ("_idle", "_open", "_poller", "_warned", "keep", "limit", "min_size", "size")

    def __init__(
        self,
        keep: int = PIPE_POOL_MAX,
        size: int = PIPE_SIZE,
        min_size: int = MIN_PIPE_SIZE,
        limit: int | None = None,
    ) -> None:
        self.keep = keep
        self.limit = limit
        self.size = size
        self.min_size = min_size
        self._open = 0
        self._idle: list[Pipe] = []
        self._warned = False
        self._poller: Poller | None = None

    def poller(self) -> Poller:
        """The readiness watcher of the sessions spliced with these pipes, on this loop."""
        loop = asyncio.get_running_loop()
        poller = self._poller
        if poller is None or poller.loop is not loop:
            if poller is not None:
                poller.close()
            poller = self._poller = Poller(loop)
        return poller

    def __len__(self) -> int:
        return len(self._idle)

    def acquire(self) -> Pipe:
        """An empty pipe.

        Raises OSError when no descriptor is left for a new one, and PipeTooSmall when
        the user's pipe quota is spent (the kernel then hands out 8 KiB pipes).
        """
        if self._idle:
            return self._idle.pop()
        if self.limit is not None and self._open >= self.limit:
            raise PipeBudgetSpent(errno.EMFILE, "every pipe of the pool is in use")
        pipe = Pipe(self.size)
        if pipe.size < self.min_size:
            pipe.close()
            if not self._warned:
                self._warned = True
                log.warning(
                    "pipes are down to %d bytes (fs.pipe-user-pages-soft reached?): "
                    "sessions beyond it are copied, not spliced",
                    pipe.size,
                )
            raise PipeTooSmall(errno.ENOBUFS, "pipe too small to splice through")
        self._open += 1
        return pipe

    def release(self, pipe: Pipe) -> None:
        # A pipe with bytes left in it (a session cut short) would leak them into the
        # next session: such a pipe is closed, never kept.
        if pipe.pending == 0 and len(self._idle) < self.keep:
            self._idle.append(pipe)
        else:
            pipe.close()
            self._open -= 1

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
            self._open -= 1
        if self._poller is not None:
            self._poller.close()
            self._poller = None


class _Direction:
    """One direction of a session: source socket → pipe → destination socket."""

    __slots__ = (
        "destination",
        "dst",
        "eof",
        "finished",
        "pipe",
        "prefix",
        "source",
        "src",
        "wake",
        "watching",
    )

    def __init__(self, source: Endpoint, destination: Endpoint, src: int, dst: int) -> None:
        self.source = source
        self.destination = destination
        self.src = src
        self.dst = dst
        # Held only while there are bytes to move (see DESCRIPTORS_PER_SESSION).
        self.pipe: Pipe | None = None
        # What the source's endpoint held before the relay started: sent first, in order.
        self.prefix = memoryview(b"")
        self.eof = False
        self.finished = False
        self.watching = _IDLE
        # What the poller calls when this direction can move (set by the relay).
        self.wake: Callable[[], None] = _nothing


def _nothing() -> None:
    pass


class SpliceRelay(BaseRelay):
    """The zero-copy relay; build it with :func:`take_over`, which may decline."""

    __slots__ = ("_closed", "_directions", "_poller", "_pool", "_sockets")

    kind = RELAY_SPLICE

    def __init__(
        self,
        client: Endpoint,
        backend: Endpoint,
        sockets: tuple[socket.socket, socket.socket],
        pool: PipePool,
        *,
        idle_timeout: float | None = None,
    ) -> None:
        super().__init__(client, backend, idle_timeout=idle_timeout)
        self._sockets = sockets
        self._pool = pool
        self._closed = False
        client_fd, backend_fd = sockets[0].fileno(), sockets[1].fileno()
        self._directions = (
            _Direction(client, backend, client_fd, backend_fd),
            _Direction(backend, client, backend_fd, client_fd),
        )
        self._poller = pool.poller()
        for direction in self._directions:
            direction.wake = functools.partial(self._pump, direction)

    def start(self) -> None:
        """Close the transports (our duplicates keep the sockets), then move the bytes."""
        for direction in self._directions:
            endpoint = direction.source
            endpoint.on_change = None
            direction.prefix = memoryview(bytes(endpoint.held))
            endpoint.held.clear()
            direction.eof = endpoint.eof
            if endpoint.transport is not None:
                endpoint.transport.close()
        for direction in self._directions:
            if direction.eof:
                self._closed_by(direction.source)
        for direction in self._directions:
            if self._closed:
                break
            self._begin(direction)
        self._start_idle_timer()

    def _begin(self, direction: _Direction) -> None:
        """Send what the source held, then wait for the source rather than try it now.

        The watch is level-triggered, so bytes already waiting wake us at once; a source
        with nothing yet (a backend that has just been sent the request, a client whose
        request was held) is spared a splice that fails with EAGAIN and its exception.
        """
        if direction.eof:
            self._pump(direction)
            return
        if direction.prefix:
            try:
                sent = os.write(direction.dst, direction.prefix)
            except BlockingIOError:
                sent = 0
            except OSError as error:
                self._failed(direction.destination, error)
                return
            direction.prefix = direction.prefix[sent:]
            if direction.prefix:
                self._watch(direction, _WRITING)
                return
        self._watch(direction, _READING)

    def shutdown(self, reason: str = END_SHUTDOWN) -> None:
        """Close both sides at once (grace period over, idle timeout)."""
        self._shut_down_for(reason)
        self._close()

    def _pump(self, direction: _Direction) -> None:
        """Move what can be moved now; then watch the one descriptor we wait for."""
        if self._closed:
            # A readiness callback already queued when the other direction ended it all.
            return
        failing = direction.destination
        try:
            for _ in range(ROUNDS_PER_WAKEUP):
                failing = direction.destination
                if direction.prefix:
                    sent = os.write(direction.dst, direction.prefix)
                    direction.prefix = direction.prefix[sent:]
                    if direction.prefix:
                        self._watch(direction, _WRITING)
                        return
                pipe = direction.pipe
                if pipe is not None and pipe.pending:
                    pipe.pending -= os.splice(
                        pipe.read_fd, direction.dst, pipe.pending, flags=_SPLICE_FLAGS
                    )
                    if pipe.pending:
                        # The destination is full: wait until it drains, reading nothing.
                        self._watch(direction, _WRITING)
                        return
                if direction.eof:
                    self._end_direction(direction)
                    return
                failing = direction.source
                if pipe is None:
                    pipe = direction.pipe = self._pipe()
                if pipe is None:
                    # No pipe to be had: this chunk goes through user space, as the copy
                    # relay would move it (bounded the same way: one read per turn).
                    data = os.read(direction.src, PIPE_SIZE)
                    if not data:
                        direction.eof = True
                        self._closed_by(direction.source)
                        continue
                    direction.source.received += len(data)
                    direction.prefix = memoryview(data)
                    continue
                moved = os.splice(direction.src, pipe.write_fd, pipe.size, flags=_SPLICE_FLAGS)
                if moved == 0:
                    direction.eof = True
                    self._closed_by(direction.source)
                    continue
                direction.source.received += moved
                pipe.pending = moved
        except BlockingIOError:
            pass
        except OSError as error:
            self._failed(failing, error)
            return
        self._park(direction)

    def _pipe(self) -> Pipe | None:
        try:
            return self._pool.acquire()
        except OSError:
            return None

    def _park(self, direction: _Direction) -> None:
        """Wait for what this direction needs next; an empty pipe goes back to the pool."""
        pipe = direction.pipe
        if direction.prefix or (pipe is not None and pipe.pending):
            self._watch(direction, _WRITING)
            return
        if pipe is not None:
            direction.pipe = None
            self._pool.release(pipe)
        self._watch(direction, _READING)

    def _watch(self, direction: _Direction, want: int) -> None:
        # Registrations change only when the state does: in a steady stream the source
        # stays watched and no epoll_ctl is made per chunk.
        if direction.watching == want:
            return
        poller = self._poller
        if direction.watching == _READING:
            poller.set_reader(direction.src, None)
        elif direction.watching == _WRITING:
            poller.set_writer(direction.dst, None)
        if want == _READING:
            poller.set_reader(direction.src, direction.wake)
        elif want == _WRITING:
            poller.set_writer(direction.dst, direction.wake)
        direction.watching = want

    def _end_direction(self, direction: _Direction) -> None:
        """The source sent EOF and the pipe is empty: pass the half-close on."""
        self._watch(direction, _IDLE)
        direction.finished = True
        if direction.pipe is not None:
            self._pool.release(direction.pipe)
            direction.pipe = None
        destination = self._socket_of(direction.destination)
        try:
            destination.shutdown(socket.SHUT_WR)
        except OSError as error:
            self._failed(direction.destination, error)
            return
        if all(each.finished for each in self._directions):
            self._close()

    def _failed(self, side: Endpoint, error: OSError) -> None:
        """A socket failed: that side reset; pass the reset on to the other at once."""
        log.debug("splice relay: %s failed: %s", side.role, error)
        self._reset_by(side)
        other = self._socket_of(self.backend if side is self.client else self.client)
        with contextlib.suppress(OSError):
            other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        self._close()

    def _socket_of(self, side: Endpoint) -> socket.socket:
        return self._sockets[0] if side is self.client else self._sockets[1]

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for direction in self._directions:
            self._watch(direction, _IDLE)
            if direction.pipe is not None:
                self._pool.release(direction.pipe)
                direction.pipe = None
        for sock in self._sockets:
            self._poller.forget(sock.fileno())
            sock.close()
        self._finish()


def take_over(
    client: Endpoint,
    backend: Endpoint,
    pool: PipePool,
    *,
    idle_timeout: float | None = None,
) -> SpliceRelay | None:
    """A splice relay for these endpoints, or None where the copy relay must serve.

    Declines, leaving everything as it was, when an endpoint is already lost (the copy
    relay reports that), when a transport still has bytes to write (they must go first,
    and only the transport can send them), or when no descriptor is left for the
    duplicates (a session is worth more than its speed). Pipes are taken per chunk: a
    direction that cannot get one (the pool's budget spent, the kernel's pipes too small
    to be faster) copies that chunk instead.
    """
    endpoints = (client, backend)
    fds: list[int] = []
    families: list[int] = []
    for endpoint in endpoints:
        transport = endpoint.transport
        if endpoint.lost or transport is None or transport.get_write_buffer_size():
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        fds.append(sock.fileno())
        families.append(sock.family)
    sockets: list[socket.socket] = []
    try:
        for fd, family in zip(fds, families, strict=True):
            duplicate = os.dup(fd)
            try:
                # Family, type and protocol given: not asked of the kernel again.
                sockets.append(socket.socket(family, socket.SOCK_STREAM, 0, duplicate))
            except OSError:
                os.close(duplicate)
                raise
    except OSError as error:
        # Out of descriptors: expected under load, and the copy relay serves the
        # session. Anything else is worth a word.
        if error.errno not in _SHORTAGE:
            log.warning("splice relay unavailable for a session: %s", error)
        for sock in sockets:
            sock.close()
        return None
    return SpliceRelay(
        client,
        backend,
        (sockets[0], sockets[1]),
        pool,
        idle_timeout=idle_timeout,
    )
