from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from support import Tcpfwd


@pytest.fixture
def run_tcpfwd() -> Iterator[Callable[..., Tcpfwd]]:
    """Start the real ``tcpfwd`` command; every process started is stopped after the test."""
    started: list[Tcpfwd] = []

    def start(*args: str, **kwargs: Any) -> Tcpfwd:
        process = Tcpfwd(args, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
