"""The daemon's event log stays one event per line (or one JSON object per line) whatever
reaches the admin port, and keeps the traceback of a real internal error."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from support import (
    LOOPBACK,
    admin_url,
    connect,
    recv_all,
    service_config,
    toml_table,
    write_config,
)

# Requests aiohttp's parser rejects before any handler (or token check) runs.
BAD_REQUESTS = {
    "long header line": b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 10000 + b"\r\n\r\n",
    "long request line": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
    "too many headers": b"GET / HTTP/1.1\r\n"
    + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
    + b"\r\n",
    "control bytes in a header": b"GET / HTTP/1.1\r\nX-A: \x01\x1b[2J\r\n\r\n",
    "bad request line": b"GET / HTTP/9.9 junk\r\n\r\n",
}


def start(run_tcpfwd, tmp_path: Path, log_format: str):
    config = write_config(
        tmp_path,
        toml_table("global", log_format=log_format)
        + toml_table("admin", listen="127.0.0.1:0", token="a-token-of-sixteen-or-more")
        # The service is never used: only the admin port is.
        + service_config("127.0.0.1:9", name="s"),
    )
    proxy = run_tcpfwd("run", "--config", str(config))
    return proxy, urlsplit(admin_url(proxy)).port


def send_raw(port: int, data: bytes) -> bytes:
    with connect((LOOPBACK, port)) as sock:
        sock.sendall(data)
        return recv_all(sock)


def settle(proxy, count: int, timeout: float = 5.0) -> list[str]:
    """The event lines once ``count`` are there and no more arrive for a moment."""
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        if len(proxy.events) >= count and len(proxy.events) == seen:
            break
        seen = len(proxy.events)
        time.sleep(0.3)
    return list(proxy.events)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_each_bad_admin_request_is_one_event_line(run_tcpfwd, tmp_path, log_format):
    proxy, port = start(run_tcpfwd, tmp_path, log_format)
    before = len(proxy.events)
    for data in BAD_REQUESTS.values():
        assert send_raw(port, data).startswith(b"HTTP/1.")
    lines = settle(proxy, before + 4)[before:]
    refused = [line for line in lines if "bad request" in line]
    # One line per request the server logs (a bad request line it counts as noise and
    # logs only at debug level), and not a line more: no traceback.
    assert len(refused) >= 4, lines
    assert len(lines) == len(refused), lines
    for line in lines:
        assert "Traceback" not in line
        assert "\x1b" not in line and "\x01" not in line
        if log_format == "json":
            document = json.loads(line)
            assert document["level"] == "warning"
            assert document["event"].startswith("admin: bad request from 127.0.0.1 refused")
            assert "exception" not in document
        else:
            assert line.split(" ", 2)[1] == "warning"
            assert " admin: bad request from 127.0.0.1 refused (400): " in line
    assert any("Too many headers" in line for line in lines)
    assert any("8190 bytes" in line for line in lines)
    assert proxy.process.poll() is None


def test_bad_admin_requests_are_logged_at_a_bounded_rate(run_tcpfwd, tmp_path):
    proxy, port = start(run_tcpfwd, tmp_path, "json")
    before = len(proxy.events)
    flood = 60
    started = time.monotonic()
    for _ in range(flood):
        send_raw(port, BAD_REQUESTS["too many headers"])
    assert time.monotonic() - started < 10, "the flood outlasted the rate window"
    lines = settle(proxy, before + 10)[before:]
    for line in lines:
        json.loads(line)
    assert 1 <= len(lines) <= 10, lines


EXCEPTION_PROGRAM = """
import logging, sys
from tcpfwd.accesslog import configure_logging
configure_logging(sys.argv[1], "info", event_target=sys.argv[2])
log = logging.getLogger("tcpfwd")
def inner():
    raise ValueError("the detail")
try:
    inner()
except ValueError:
    log.exception("session %s failed", "s-1")
log.info("after")
"""


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_an_internal_error_keeps_its_traceback(tmp_path, log_format):
    # tcpfwd's own logging set-up, in a process of its own, writing to a real file.
    target = tmp_path / "events.log"
    done = subprocess.run(
        [sys.executable, "-c", EXCEPTION_PROGRAM, log_format, str(target)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = target.read_text().splitlines()
    if log_format == "json":
        first, after = (json.loads(line) for line in lines)
        assert first["event"] == "session s-1 failed"
        assert first["level"] == "error"
        trace = first["exception"]
        assert trace.startswith("Traceback (most recent call last):")
        assert "in inner" in trace
        assert trace.rstrip().endswith("ValueError: the detail")
        assert "exception" not in after
    else:
        assert lines[0].endswith(" error session s-1 failed")
        trace = lines[1:-1]
        assert trace[0] == "    Traceback (most recent call last):"
        assert all(line.startswith("    ") for line in trace)
        assert any("in inner" in line for line in trace)
        assert trace[-1] == "    ValueError: the detail"
        assert lines[-1].endswith(" info after")
