"""Readiness events and timers for the data plane, on one epoll the event loop watches.

Why not the loop's own transports or ``add_reader``: a uvloop transport per socket sets
itself up with several system calls and objects, and a poll handle per watched
descriptor costs six ``epoll_ctl`` and an ``ioctl`` to set up and tear down. Here a
descriptor costs one ``epoll_ctl`` to add (closing it removes it), the loop watches
the one epoll descriptor, and each readiness event goes straight to the object that
owns the descriptor (its ``on_event(fd, events)``): a session, a connection attempt, a
listener. Level-triggered, as the loop's own watches are.

Timers of the data plane (connect, greeting and header timeouts, hold pauses) are
plentiful, mostly of a few fixed lengths, and mostly made moot before they are due (an
attempt connects in well under its timeout). They are kept in one first-in-first-out
queue per length, where first in is first due, and are never cancelled: when one is
due its target is asked (``on_timer(kind)``) and decides by its own state whether it
still matters. One loop timer is armed for the earliest of them.

Work that is best done once per batch of events rather than once per event (writing
the access lines of every session that ended) registers itself with ``after_batch``.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import time
from _socket import socket as RawSocket
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

log = logging.getLogger("tcpfwd")

IN: Final = select.EPOLLIN
OUT: Final = select.EPOLLOUT
# The peer shut down its sending side: reported without reading the data before it.
RDHUP: Final = select.EPOLLRDHUP
ERR: Final = select.EPOLLERR
HUP: Final = select.EPOLLHUP
# Edge-triggered: reported when something changes, not for as long as a state lasts.
EDGE: Final = select.EPOLLET

# The data plane's sockets are the C type itself: the Python subclass adds a frame to
# every creation and close, and nothing the data plane uses.
__all__ = ["RawSocket", "Reactor"]
# Accepted sockets stay in blocking mode (making them non-blocking is one more system
# call per connection): every read and write on them says not to wait.
DONTWAIT: Final = socket.MSG_DONTWAIT

# Events taken per wake-up; the rest wait for the next turn of the loop.
MAX_EVENTS: Final = 1024
# Watches of what ticks (connection attempts, until they connect or fail): how often
# they are looked at. An attempt costs two set operations, where a timer of its own
# would cost more than a whole connect on loopback; its timeout and the moment it turns
# slow are then known to within this.
TICK: Final = 0.01

# Timers due within this of each other are handled in one wake-up of the loop: at
# thousands of connections a second, one wake-up per timer would be most of the
# loop's turns. Data-plane timeouts are tenths of seconds and more; a timer fires up
# to this much late, never early.
TIMER_RESOLUTION: Final = 0.01


# Addresses as the kernel writes them, one string object each: every session keeps its
# peer's and its own local address, and most sessions share them with many others.
_ADDRESSES: dict[str, str] = {}
_MAX_ADDRESSES: Final = 4096


def shared_address(host: str) -> str:
    """``host``, as the one string object all sessions with this address hold."""
    shared = _ADDRESSES.get(host)
    if shared is None:
        if len(_ADDRESSES) >= _MAX_ADDRESSES:
            _ADDRESSES.clear()
        shared = _ADDRESSES[host] = host
    return shared


class Handler(Protocol):
    """What owns a watched descriptor."""

    def on_event(self, fd: int, events: int) -> None: ...

    def on_failure(self, error: BaseException) -> None:
        """``on_event`` or ``on_timer`` raised: end whatever this is, cleanly."""


class Ticking(Protocol):
    def on_tick(self, now: float) -> None: ...

    def on_failure(self, error: BaseException) -> None: ...


class TimerTarget(Protocol):
    def on_timer(self, kind: int) -> None: ...

    def on_failure(self, error: BaseException) -> None: ...


class Reactor:
    """The data plane's epoll and timers, attached to one event loop."""

    __slots__ = (
        "_after",
        "_armed",
        "_armed_at",
        "_batch",
        "_closed",
        "_epoll",
        "_firing",
        "_flush_scheduled",
        "_queues",
        "_ticker",
        "closed",
        "handlers",
        "loop",
        "register",
        "ticking",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._epoll = select.epoll()
        # The owner of every descriptor registered here.
        self.handlers: dict[int, Handler] = {}
        # Descriptors closed since the last poll: a batch may still hold their events,
        # and the number may already belong to a new socket.
        self.closed: set[int] = set()
        self._queues: dict[int, deque[tuple[float, TimerTarget, int]]] = {}
        self._armed: asyncio.TimerHandle | None = None
        self._armed_at = 0.0
        self._firing = False
        # Inside a batch of events or timers: deferred work runs at its end.
        self._batch = False
        self._after: list[Callable[[], None]] = []
        # What is told the time every TICK (``on_tick(now)``) until it leaves the set.
        self.ticking: set[Ticking] = set()
        self._ticker: asyncio.TimerHandle | None = None
        self._flush_scheduled = False
        # The epoll's own method: the hot paths register a descriptor with it and set its
        # handler themselves (``add`` in one call less).
        self.register = self._epoll.register
        loop.add_reader(self._epoll.fileno(), self._ready)

    # --- descriptors ---------------------------------------------------------------

    def add(self, fd: int, events: int, handler: Handler) -> None:
        self._epoll.register(fd, events)
        self.handlers[fd] = handler

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def hand_over(self, fd: int, handler: Handler) -> None:
        """Events of a registered ``fd`` go to ``handler`` from now on."""
        self.handlers[fd] = handler

    def remove(self, fd: int) -> None:
        """Stop watching ``fd``, which stays open."""
        if self.handlers.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def forget(self, fd: int) -> None:
        """``fd`` is about to be closed: closing it is what takes it out of the epoll
        (no descriptor of ours is ever duplicated), so no system call is needed."""
        if self.handlers.pop(fd, None) is not None:
            self.closed.add(fd)

    def _ready(self) -> None:
        closed = self.closed
        closed.clear()
        try:
            events = self._epoll.poll(0, MAX_EVENTS)
        except InterruptedError:
            return
        handlers = self.handlers
        self._batch = True
        for fd, mask in events:
            if fd in closed:
                continue
            handler = handlers.get(fd)
            if handler is None:
                continue
            try:
                handler.on_event(fd, mask)
            except Exception as error:
                self._failed(handler, error)
        self._batch = False
        self._run_after()

    # --- timers ----------------------------------------------------------------------

    def call_later(self, delay: float, target: TimerTarget, kind: int) -> None:
        """Ask ``target.on_timer(kind)`` in ``delay`` seconds (it may no longer care)."""
        due = time.monotonic() + delay
        # One queue per length, to the millisecond: within a queue first in is first due
        # (to within that millisecond, well inside the resolution).
        length = int(delay * 1000)
        queue = self._queues.get(length)
        if queue is None:
            queue = self._queues[length] = deque()
        queue.append((due, target, kind))
        if not self._firing:
            self._arm(due)

    def _arm(self, due: float) -> None:
        if self._armed is not None:
            if self._armed_at <= due + TIMER_RESOLUTION:
                # Armed soon enough: this one waits at most a resolution longer.
                return
            self._armed.cancel()
        self._armed_at = due + TIMER_RESOLUTION
        self._armed = self.loop.call_later(
            max(0.0, due + TIMER_RESOLUTION - time.monotonic()), self._fire
        )

    def _fire(self) -> None:
        self._armed = None
        self._firing = self._batch = True
        try:
            now = time.monotonic()
            for delay, queue in list(self._queues.items()):
                while queue and queue[0][0] <= now:
                    _due, target, kind = queue.popleft()
                    try:
                        target.on_timer(kind)
                    except Exception as error:
                        self._failed(target, error)
                if not queue:
                    del self._queues[delay]
        finally:
            self._firing = self._batch = False
        heads = [queue[0][0] for queue in self._queues.values() if queue]
        if heads:
            self._arm(min(heads))
        self._run_after()

    # --- ticks ------------------------------------------------------------------------

    def tick(self, target: Ticking) -> None:
        """Tell ``target`` the time every ``TICK`` until it leaves ``ticking`` (which it
        does itself, with ``ticking.discard``)."""
        self.ticking.add(target)
        if self._ticker is None:
            self._ticker = self.loop.call_later(TICK, self._tick)

    def _tick(self) -> None:
        self._ticker = None
        now = time.monotonic()
        self._batch = True
        for target in list(self.ticking):
            try:
                target.on_tick(now)
            except Exception as error:
                self.ticking.discard(target)
                self._failed(target, error)
        self._batch = False
        if self.ticking:
            self._ticker = self.loop.call_later(TICK, self._tick)
        self._run_after()

    # --- once per batch ---------------------------------------------------------------

    def after_batch(self, work: Callable[[], None]) -> None:
        """Run ``work`` once the current batch of events or timers has been handled."""
        after = self._after
        if work not in after:
            after.append(work)
        if not self._batch and not self._flush_scheduled:
            # Outside a batch (a callback of the loop's own): make sure it runs soon.
            self._flush_scheduled = True
            self.loop.call_soon(self._run_after)

    def _run_after(self) -> None:
        self._flush_scheduled = False
        after = self._after
        while after:
            work = after.pop()
            try:
                work()
            except Exception:
                log.exception("data plane: deferred work failed")

    def report(self, owner: Handler | TimerTarget | Ticking, error: Exception) -> None:
        """``owner`` failed outside an event or timer (a callback of the loop's own)."""
        self._failed(owner, error)
        self._run_after()

    def _failed(self, owner: Handler | TimerTarget | Ticking, error: Exception) -> None:
        log.error("data plane: %r failed", owner, exc_info=error)
        try:
            owner.on_failure(error)
        except Exception:
            log.exception("data plane: cleaning up after %r failed", owner)

    def close(self) -> None:
        if self._armed is not None:
            self._armed.cancel()
            self._armed = None
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        self.ticking.clear()
        self._queues.clear()
        if not self.loop.is_closed():
            self.loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self.handlers.clear()
