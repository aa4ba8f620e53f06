"""Fixtures for every test below this folder (tests/unit, tests/e2e): the real ``tcpfwd``
command, and each relay in turn."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from support import ROOT, SPLICE_AVAILABLE, Tcpfwd, parse_logfmt
from tcpfwd.vocabulary import RelayMode

# Child processes (``python -m tcpfwd``, workers, benchmarks) run this checkout's code,
# whatever copy of the package is installed: a second work tree tests its own changes.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
)

RELAYS = [
    RelayMode.COPY,
    pytest.param(
        RelayMode.SPLICE, marks=pytest.mark.skipif(not SPLICE_AVAILABLE, reason="no splice(2) here")
    ),
]
QUICK_MODE_COMMANDS = ("run", "check")


@pytest.fixture(params=RELAYS)
def relay_mode(request: pytest.FixtureRequest) -> RelayMode:
    """Each relay in turn; ``run_tcpfwd`` forces it in tests that use this fixture."""
    mode: RelayMode = request.param
    return mode


@pytest.fixture
def run_tcpfwd(request: pytest.FixtureRequest) -> Iterator[Callable[..., Tcpfwd]]:
    """Start the real ``tcpfwd`` command; every process started is stopped after the test.

    In a test that uses ``relay_mode`` the relay is forced with ``--relay``, and every
    session logged must name that relay: a silent fallback would test the wrong code.
    """
    relay = request.getfixturevalue("relay_mode") if "relay_mode" in request.fixturenames else None
    started: list[Tcpfwd] = []

    def start(*args: str, **kwargs: Any) -> Tcpfwd:
        if relay is not None and (not args or args[0] not in QUICK_MODE_COMMANDS):
            args = (*args, "--relay", relay)
        process = Tcpfwd(args, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
    # At the descriptor limit the splice relay rightly declines (copying instead).
    if relay is not None and request.node.get_closest_marker("relay_fallback_allowed") is None:
        for process in started:
            for line in process.access:
                used = _relay_used(line)
                # "-": the session never reached a backend, so no relay ran.
                assert used in (relay, "-"), f"a session used {used}, not {relay}: {line}"


def _relay_used(access_line: str) -> str:
    record = json.loads(access_line) if access_line.startswith("{") else parse_logfmt(access_line)
    return str(record.get("relay") or "-")
