"""The dialer's per-attempt timer: a timeout when time is up, never one that hides a
cancellation from outside (the client left), and nothing left behind otherwise."""

from __future__ import annotations

import asyncio

import pytest

from tcpfwd.dialer import _Timer


async def _wait_under_timer(delay: float, hold: asyncio.Future[None]) -> bool:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    timer = _Timer(loop, task, delay)
    try:
        try:
            await hold
        finally:
            timer.stop()
    except asyncio.CancelledError:
        if not timer.expired:
            raise
        return True
    return False


async def test_time_up_is_a_timeout_and_the_task_is_not_left_cancelling():
    hold = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(_wait_under_timer(0.01, hold))
    assert await task is True
    assert task.cancelling() == 0


async def test_an_outside_cancellation_stays_a_cancellation():
    hold = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(_wait_under_timer(10.0, hold))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_outside_cancellation_wins_over_an_expiry_at_the_same_time():
    hold = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(_wait_under_timer(0.0, hold))
    await asyncio.sleep(0)
    # The timer is due at once; the outside cancellation comes before the task runs
    # again. Whichever is seen first, the task must end cancelled, not timed out.
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_finishing_in_time_cancels_the_timer():
    loop = asyncio.get_running_loop()
    hold = loop.create_future()
    loop.call_soon(hold.set_result, None)
    task = asyncio.create_task(_wait_under_timer(0.05, hold))
    assert await task is False
    # Past the delay, nothing fires into the finished task or anyone else.
    await asyncio.sleep(0.1)
    assert task.cancelling() == 0
