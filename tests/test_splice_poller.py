"""The splice relay's own epoll: wakes on readiness and hang-ups, forgets cleanly."""

from __future__ import annotations

import asyncio
import socket

import pytest

from conftest import SPLICE_AVAILABLE
from tcpfwd.splice import PipePool

pytestmark = pytest.mark.skipif(not SPLICE_AVAILABLE, reason="no splice(2) here")


async def test_readable_writable_and_hangup_wake_the_right_callbacks():
    pool = PipePool(keep=0)
    poller = pool.poller()
    assert pool.poller() is poller
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    woken: list[str] = []
    try:
        poller.set_writer(ours.fileno(), lambda: woken.append("write"))
        await asyncio.sleep(0.05)
        assert "write" in woken
        poller.set_writer(ours.fileno(), None)
        woken.clear()
        poller.set_reader(ours.fileno(), lambda: woken.append("read"))
        await asyncio.sleep(0.05)
        assert woken == []
        theirs.close()
        await asyncio.sleep(0.05)
        assert "read" in woken
        poller.forget(ours.fileno())
        woken.clear()
        await asyncio.sleep(0.05)
        assert woken == []
    finally:
        ours.close()
        pool.close()


async def test_a_failing_callback_is_reported_and_the_others_still_run():
    loop = asyncio.get_running_loop()
    reported: list[BaseException] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context["exception"]))
    pool = PipePool(keep=0)
    poller = pool.poller()
    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    woken: list[str] = []

    def fail() -> None:
        poller.set_writer(first.fileno(), None)
        raise RuntimeError("boom")

    def ok() -> None:
        poller.set_writer(second.fileno(), None)
        woken.append("second")

    try:
        poller.set_writer(first.fileno(), fail)
        poller.set_writer(second.fileno(), ok)
        await asyncio.sleep(0.05)
        assert woken == ["second"]
        assert [str(e) for e in reported] == ["boom"]
    finally:
        loop.set_exception_handler(None)
        for sock in (first, first_peer, second, second_peer):
            sock.close()
        pool.close()
