"""Pipes for the Linux zero-copy relay: splice(2) moves bytes socket → pipe → socket.

Why: copying brings every byte up into a Python object and writes it out again.
``splice`` moves page references inside the kernel, so the CPU per byte falls several
times and one stream runs as fast as the sockets allow. The relay (``relay.py``) splices
a direction that has shown it is bulk, through a pipe it takes from the shared pool
only while it has bytes in flight and gives back once the pipe has drained, so idle
sessions hold no pipe and the pipes open at once are bounded by the pool's budget;
a chunk that gets no pipe is copied instead.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sys
from typing import TYPE_CHECKING, Final

from .vocabulary import RelayMode

if TYPE_CHECKING:
    from .relay import Flow

log = logging.getLogger("tcpfwd")


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

SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


def splice_available() -> bool:
    """Whether this system can splice sockets through pipes (Linux, Python 3.10+)."""
    return sys.platform == "linux" and hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")


def choose_relay(mode: str) -> str:
    """The relay a service uses: ``auto`` becomes splice where available, else copy."""
    if mode == RelayMode.COPY or not splice_available():
        return RelayMode.COPY
    return RelayMode.SPLICE


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


class PipeTooSmall(OSError):
    """The kernel gave a pipe too small to be worth splicing through."""


class PipeBudgetSpent(OSError):
    """Every pipe the pool may have open is in use: copy this chunk instead."""


class PipePool:
    """Pipes shared by all sessions: at most ``limit`` open at once (in use or idle), of
    which at most ``keep`` idle ones are kept; only empty pipes are ever kept."""

    __slots__ = ("_idle", "_open", "_warned", "keep", "limit", "min_size", "size")

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

    def take(self) -> Pipe | None:
        """An empty pipe, or None when the budget, descriptors or pipe quota say no."""
        try:
            return self.acquire()
        except OSError:
            return None

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


class Splicing:
    """The relay's moves through the kernel (see `~.relay`): a flow past its
    ``splice_at`` goes socket → pipe → socket, through a pipe of the pool held only
    while bytes are in it."""

    __slots__ = ("spliced",)

    # Whether the session's sockets were made non-blocking for splice(2).
    spliced: bool

    if TYPE_CHECKING:
        pool: PipePool

        def _copy(self, flow: Flow, reads: int, *, drain: bool) -> None: ...
        def _wait_for(self, flow: Flow, rest: memoryview | None) -> None: ...
        def _later(self, flow: Flow) -> None: ...
        def _eof(self, flow: Flow) -> None: ...
        def _broken(self, fd: int) -> None: ...

    def _splice(self, flow: Flow) -> None:
        pipe = flow.pipe
        if pipe is None:
            pipe = self.pool.take()
            if pipe is None:
                # No pipe to be had (budget, descriptors, quota): copy this chunk.
                self._copy(flow, 1, drain=True)
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
                # Drained: wait for the source's next event.
                flow.pipe = None
                self.pool.release(pipe)
                return
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
                pass
            except OSError:
                self._broken(flow.dst_fd)
                return
            if pipe.pending:
                # The destination is full: wait until it drains, reading nothing.
                self._wait_for(flow, None)
                return
        # More may wait (a splice can stop short of what the source holds).
        flow.pipe = None
        self.pool.release(pipe)
        self._later(flow)

    def _drain_pipe(self, flow: Flow) -> bool:
        """Write what waits in the flow's pipe; True once it is empty (and given back)."""
        pipe = flow.pipe
        assert pipe is not None
        try:
            pipe.pending -= os.splice(pipe.read_fd, flow.dst_fd, pipe.pending, flags=SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self._broken(flow.dst_fd)
            return False
        if pipe.pending:
            return False
        flow.pipe = None
        self.pool.release(pipe)
        return True
