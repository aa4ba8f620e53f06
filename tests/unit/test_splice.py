"""The splice relay's pipe pool on its own: what it keeps, and what it refuses. The
relay through a running tcpfwd is tested in tests/e2e/test_splice.py."""

from __future__ import annotations

import os

import pytest

from support import SPLICE_AVAILABLE, open_descriptors
from tcpfwd.splice import PipePool, PipeTooSmall

pytestmark = pytest.mark.skipif(not SPLICE_AVAILABLE, reason="no splice(2) here")


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_pool_keeps_only_empty_pipes_and_no_more_than_it_may():
    pool = PipePool(keep=2)
    used, first, second, extra = (pool.acquire() for _ in range(4))
    os.write(used.write_fd, b"left over")
    used.pending = 9
    for pipe in (used, first, second, extra):
        pool.release(pipe)
    assert not is_open(used.read_fd), "a pipe with bytes in it was kept"
    assert not is_open(extra.read_fd), "more pipes were kept than allowed"
    assert len(pool) == 2
    assert {pool.acquire().read_fd, pool.acquire().read_fd} == {first.read_fd, second.read_fd}
    pool.close()


def test_pool_refuses_pipes_too_small_to_be_worth_splicing():
    before = open_descriptors(os.getpid())
    pool = PipePool(size=64 << 10, min_size=128 << 10)
    with pytest.raises(PipeTooSmall):
        pool.acquire()
    assert open_descriptors(os.getpid()) == before
