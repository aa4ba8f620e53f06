"""The data plane's epoll and timers: readiness goes to the owner, timers to their target."""

from __future__ import annotations

import asyncio
import socket
import time

from tcpfwd.reactor import IN, OUT, Reactor


class Owner:
    def __init__(self) -> None:
        self.events: list[tuple[int, int]] = []
        self.timers: list[tuple[int, float]] = []
        self.failures: list[BaseException] = []
        self.fail_next = False

    def on_event(self, fd: int, events: int) -> None:
        self.events.append((fd, events))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")

    def on_timer(self, kind: int) -> None:
        self.timers.append((kind, time.monotonic()))

    def on_failure(self, error: BaseException) -> None:
        self.failures.append(error)


async def test_readiness_goes_to_the_owner_of_the_descriptor():
    reactor = Reactor(asyncio.get_running_loop())
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    owner, other = Owner(), Owner()
    try:
        reactor.add(ours.fileno(), OUT, owner)
        await asyncio.sleep(0.05)
        assert (ours.fileno(), OUT) in owner.events
        reactor.modify(ours.fileno(), IN)
        owner.events.clear()
        await asyncio.sleep(0.05)
        assert owner.events == []
        theirs.sendall(b"x")
        await asyncio.sleep(0.05)
        assert owner.events and owner.events[0][1] & IN
        reactor.hand_over(ours.fileno(), other)
        await asyncio.sleep(0.05)
        assert other.events, "events go to the new owner"
        reactor.remove(ours.fileno())
        other.events.clear()
        await asyncio.sleep(0.05)
        assert other.events == []
    finally:
        reactor.close()
        ours.close()
        theirs.close()


async def test_a_failing_owner_is_told_and_the_others_still_run():
    reactor = Reactor(asyncio.get_running_loop())
    pairs = [socket.socketpair() for _ in range(2)]
    owners = [Owner(), Owner()]
    owners[0].fail_next = True
    try:
        for (ours, _), owner in zip(pairs, owners, strict=True):
            reactor.add(ours.fileno(), OUT, owner)
        await asyncio.sleep(0.05)
        assert len(owners[0].failures) == 1
        assert owners[1].events
    finally:
        reactor.close()
        for pair in pairs:
            for sock in pair:
                sock.close()


async def test_events_of_a_descriptor_closed_in_the_same_batch_are_dropped():
    # The number of a closed descriptor may be reused at once by a new socket: an event
    # polled for the old one must not reach the new one's owner.
    reactor = Reactor(asyncio.get_running_loop())
    first, peer = socket.socketpair()
    reused: list[socket.socket] = []
    victim, late = Owner(), Owner()
    numbers: list[int] = []

    class Closer(Owner):
        def on_event(self, fd: int, events: int) -> None:
            super().on_event(fd, events)
            if numbers:
                return
            number = first.fileno()
            reactor.forget(number)
            first.close()
            replacement, other = socket.socketpair()
            reused.extend([replacement, other])
            numbers.append(replacement.fileno() == number)
            # Watched for reading only: nothing is ever sent to it.
            reactor.add(replacement.fileno(), IN, late)

    try:
        # Both are writable at once; the epoll reports them in the order they became
        # ready, so the closer's event comes first and first's is already polled.
        reactor.add(peer.fileno(), OUT, Closer())
        reactor.add(first.fileno(), OUT, victim)
        await asyncio.sleep(0.05)
    finally:
        reactor.close()
        for sock in [first, peer, *reused]:
            sock.close()
    assert numbers == [True], "the test needs the number to be reused"
    assert victim.events == []
    assert late.events == []


async def test_timers_fire_in_order_of_their_deadlines_whatever_their_lengths():
    reactor = Reactor(asyncio.get_running_loop())
    owner = Owner()
    started = time.monotonic()
    try:
        reactor.call_later(0.2, owner, 3)
        reactor.call_later(0.05, owner, 1)
        reactor.call_later(0.2, owner, 4)
        reactor.call_later(0.1, owner, 2)
        await asyncio.sleep(0.4)
    finally:
        reactor.close()
    assert [kind for kind, _ in owner.timers] == [1, 2, 3, 4]
    for (kind, when), due in zip(owner.timers, (0.05, 0.1, 0.2, 0.2), strict=True):
        assert when - started >= due - 0.002, f"timer {kind} fired early"


async def test_work_asked_for_several_times_in_a_batch_runs_once_after_it():
    reactor = Reactor(asyncio.get_running_loop())
    runs: list[int] = []

    def flush() -> None:
        runs.append(len(owner.events))

    class Asker(Owner):
        def on_event(self, fd: int, events: int) -> None:
            super().on_event(fd, events)
            reactor.after_batch(flush)

    owner = Asker()
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        for ours, _ in pairs:
            reactor.add(ours.fileno(), OUT, owner)
        await asyncio.sleep(0.01)
    finally:
        reactor.close()
        for pair in pairs:
            for sock in pair:
                sock.close()
    # Asked by each of the three events of the first batch, run once, after all three.
    assert runs[0] == 3
