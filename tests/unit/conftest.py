"""A unit test opens no network socket: one that needs a peer belongs in tests/e2e."""

from __future__ import annotations

import socket
from typing import Any

import pytest

_NETWORK = (socket.AF_INET, socket.AF_INET6)


class _NoNetwork(socket.socket):
    def __init__(self, family: Any = -1, *args: Any, **kwargs: Any) -> None:
        # -1: the default family, AF_INET, unless a descriptor is adopted (socketpair).
        adopted = kwargs.get("fileno", args[2] if len(args) > 2 else None) is not None
        if not adopted and (socket.AF_INET if family == -1 else family) in _NETWORK:
            raise AssertionError("a unit test opened a network socket: it belongs in tests/e2e")
        super().__init__(family, *args, **kwargs)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "socket", _NoNetwork)
