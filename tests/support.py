"""The tests' shared helpers: one copy of each, for tests/unit and tests/e2e alike.

Backends, clients, the configuration files and documents tests write, waiting with a
deadline, and a handle on a real ``tcpfwd`` child process. Everything that talks uses
real sockets on loopback. Backends run in threads with blocking sockets so that a test
reads top to bottom; each starts in one line and stops itself at the end of a ``with``
block, like aiosmtpd's controller.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcpfwd.config import ConfigError, parse_config

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 20.0
# The event that says a daemon serves: a single process's, and a supervisor's once all
# its workers are ready (each worker logs its own "ready:" before that).
READY = "ready:"
WORKERS_READY = "workers serving"
SPLICE_AVAILABLE = sys.platform == "linux" and hasattr(os, "splice")
# SO_LINGER on with a zero timeout: close() sends a reset instead of a FIN.
RST_ON_CLOSE = struct.pack("ii", 1, 0)


# --- waiting ----------------------------------------------------------------------------

# What a poll may meet before the state it waits for is there: a server not listening
# yet (OSError), a key or series not there yet (LookupError), a document half written
# (ValueError), or the check's own assertion about a partial state.
TRANSIENT: tuple[type[Exception], ...] = (AssertionError, LookupError, OSError, ValueError)


class _Poll:
    """One wait's deadline, and the last error its check let pass."""

    def __init__(self, what: str, timeout: float, ignoring: tuple[type[Exception], ...]) -> None:
        self._what = what
        self._timeout = timeout
        self._ignoring = ignoring
        self._deadline = time.monotonic() + timeout
        self._last_error: Exception | None = None

    def attempt(self, check: Callable[[], T | None]) -> T | None:
        """The check's result when true; None to try again; fails once past the deadline."""
        try:
            result = check()
        except self._ignoring as error:
            self._last_error, result = error, None
        if result:
            return result
        if time.monotonic() > self._deadline:
            detail = f" (last error: {self._last_error!r})" if self._last_error else ""
            raise AssertionError(f"gave up waiting for {self._what} after {self._timeout}s{detail}")
        return None


def wait_until(
    check: Callable[[], T | None],
    what: str,
    timeout: float = 20.0,
    *,
    interval: float = 0.05,
    ignoring: tuple[type[Exception], ...] = TRANSIENT,
) -> T:
    """Poll ``check`` until it returns something true, and return that.

    Errors of the kinds in ``ignoring`` count as "not yet"; the last one is named if the
    wait fails. Pass ``ignoring=()`` where an error means the wait can never succeed.
    """
    poll = _Poll(what, timeout, ignoring)
    while True:
        result = poll.attempt(check)
        if result is not None:
            return result
        time.sleep(interval)


async def wait_until_async(
    check: Callable[[], T | None],
    what: str,
    timeout: float = 10.0,
    *,
    interval: float = 0.02,
    ignoring: tuple[type[Exception], ...] = TRANSIENT,
) -> T:
    """`wait_until` for a test on the event loop: the loop runs while it waits."""
    poll = _Poll(what, timeout, ignoring)
    while True:
        result = poll.attempt(check)
        if result is not None:
            return result
        await asyncio.sleep(interval)


# --- configuration ----------------------------------------------------------------------

# A service as parse_config takes it: one listen address, one backend, nothing else.
MINIMAL_SERVICE: dict[str, Any] = {"listen": "127.0.0.1:10025", "backends": ["127.0.0.1:25"]}


def service(**keys: Any) -> dict[str, Any]:
    """The minimal service's table with ``keys`` added or replaced, for parse_config."""
    return {**MINIMAL_SERVICE, **keys}


def config_issues(document: dict[str, Any], source: str = "test.toml") -> list[str]:
    """Every issue parse_config reports for ``document`` (it must report some)."""
    with pytest.raises(ConfigError) as caught:
        parse_config(document, source)
    return [str(issue) for issue in caught.value.issues]


def toml_value(value: object) -> str:
    """``value`` written as TOML: tables inline, strings quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON's string escapes are TOML's basic-string escapes.
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_table(name: str, **keys: object) -> str:
    """``[name]`` and its keys, for a configuration file."""
    lines = [f"[{name}]", *(f"{key} = {toml_value(value)}" for key, value in keys.items())]
    return "\n".join(lines) + "\n"


def named_backends(**addresses: str) -> list[dict[str, str]]:
    """Backend tables named as the keywords: ``named_backends(a=first, b=second)``."""
    return [{"address": address, "name": name} for name, address in addresses.items()]


def service_config(
    backends: str | Sequence[str | Mapping[str, object]],
    *,
    name: str = "main",
    listen: str = "127.0.0.1:0",
    **keys: object,
) -> str:
    """A ``[services.NAME]`` table for a running tcpfwd, on a port the kernel picks unless
    ``listen`` says otherwise; ``backends`` is one address, or addresses and tables."""
    listed = [backends] if isinstance(backends, str) else list(backends)
    return toml_table(f"services.{name}", **service(listen=listen, backends=listed, **keys))


def write_config(folder: Path, text: str | bytes) -> Path:
    """``folder``/tcpfwd.toml holding ``text``; its path, for ``--config``.

    Written beside and renamed over, as an operator's editor or config management does,
    so that a daemon reloading it never reads half a file.
    """
    path = folder / "tcpfwd.toml"
    temporary = folder / "tcpfwd.toml.tmp"
    if isinstance(text, bytes):
        temporary.write_bytes(text)
    else:
        temporary.write_text(text)
    temporary.replace(path)
    return path


# --- backends ---------------------------------------------------------------------------


class ThreadedServer:
    """A listening socket on loopback whose connections are each handled in a thread."""

    def __init__(
        self,
        handler: Callable[[socket.socket], None],
        host: str = LOOPBACK,
        *,
        dormant: bool = False,
    ) -> None:
        """``dormant``: bound but not listening (connects are refused) until `open`."""
        self._handler = handler
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.dormant = dormant
        if not dormant:
            self.sock.listen(512)
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __enter__(self) -> ThreadedServer:
        if not self.dormant:
            self._thread.start()
        return self

    def open(self) -> float:
        """Start listening on the address held so far (the backend "comes back"); when."""
        assert self.dormant, "already listening"
        self.dormant = False
        self.sock.listen(512)
        opened = time.time()
        self._thread.start()
        return opened

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _peer = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self._handler(conn)
        with contextlib.suppress(OSError):
            conn.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def echo_handler(greeting: bytes = b"") -> Callable[[socket.socket], None]:
    """Send ``greeting``, echo everything until EOF, then half-close back."""

    def handle(conn: socket.socket) -> None:
        if greeting:
            conn.sendall(greeting)
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        # Wait for the other side to finish before closing, so no RST is sent.
        conn.settimeout(10)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    return handle


def echo_server(greeting: bytes = b"", host: str = LOOPBACK) -> ThreadedServer:
    return ThreadedServer(echo_handler(greeting), host)


def greeter_server(greeting: bytes, host: str = LOOPBACK) -> ThreadedServer:
    """Sends ``greeting`` (e.g. ``421 too busy``) and closes, as an overloaded server does."""

    def handle(conn: socket.socket) -> None:
        conn.sendall(greeting)
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(10)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    return ThreadedServer(handle, host)


def closing_server(host: str = LOOPBACK) -> ThreadedServer:
    """Accepts each connection and closes it at once without a byte."""
    return ThreadedServer(lambda conn: None, host)


def silent_server(host: str = LOOPBACK) -> ThreadedServer:
    """Accepts and says nothing until the peer goes away (a hung server)."""

    def handle(conn: socket.socket) -> None:
        conn.settimeout(30)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    return ThreadedServer(handle, host)


def failed_attempts(record: dict[str, Any]) -> list[str]:
    """The ``failed=`` attempts of a text access record: ``target/outcome/elapsed``."""
    return [] if record["failed"] == "-" else record["failed"].split(",")


@contextlib.contextmanager
def refused_port() -> Iterator[str]:
    """An address where nothing listens: the port is held (bound, never listening)."""
    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    try:
        yield f"{LOOPBACK}:{sock.getsockname()[1]}"
    finally:
        sock.close()


@contextlib.contextmanager
def blackhole() -> Iterator[str]:
    """An address where connects hang: a listener whose accept queue is full.

    With ``listen(0)`` the kernel queues one connection; once that one is waiting,
    further SYNs are dropped and a connect times out, as it would to a blackholed host.
    """
    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    sock.listen(0)
    address = (LOOPBACK, sock.getsockname()[1])
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.settimeout(0.2)
            fillers.append(filler)
            try:
                filler.connect(address)
            except OSError:
                break
        else:
            raise RuntimeError("the accept queue never filled up")
        yield f"{address[0]}:{address[1]}"
    finally:
        for filler in fillers:
            filler.close()
        sock.close()


# --- clients ----------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nothing listens on right now, for what must be told its port."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def connect(
    address: tuple[str, int], timeout: float = 10.0, *, source: str | None = None
) -> socket.socket:
    """A client connection, from the local address ``source`` when given."""
    bound = (source, 0) if source is not None else None
    sock = socket.create_connection(address, timeout=timeout, source_address=bound)
    sock.settimeout(timeout)
    return sock


def recv_all(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    """Read until EOF (raises on reset or timeout)."""
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {count} bytes")
        data += chunk
    return bytes(data)


def closed_without_reply(sock: socket.socket) -> bool:
    """True once the other side has closed (or reset) without sending a byte."""
    try:
        return recv_all(sock) == b""
    except ConnectionResetError:
        return True


def run_command(*args: str, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """``python -m tcpfwd ARGS`` to completion (check, reload, status, ...), after
    ``prefix`` (e.g. a command that drops capabilities)."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "tcpfwd", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def exchange(address: tuple[str, int], payload: bytes, timeout: float = 10.0) -> bytes:
    """Connect, send ``payload``, half-close, and return everything received until EOF."""
    with connect(address, timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


# --- the admin endpoint -----------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def admin_url(proxy: Tcpfwd) -> str:
    """``http://host:port`` of the admin endpoint, as the daemon logged it (text or JSON)."""
    line = proxy.wait_for_event("admin endpoint on ")
    event = json.loads(line)["event"] if line.startswith("{") else line
    return str(event.split("admin endpoint on ", 1)[1].strip())


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def metric_samples(url: str) -> Samples:
    """Every sample of ``url``/metrics by name and sorted labels."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        body = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


# --- the tcpfwd process ----------------------------------------------------------------

_LISTENING = re.compile(r"listening on (\S+) for service ([\w.-]+)")
_WORKER_STARTED = re.compile(r"worker (\d+) started: pid (\d+)")


# Starts a program the way systemd's socket activation does: the listening socket as
# descriptor 3, LISTEN_FDS=1 and LISTEN_PID set to the program's own pid (kept by exec).
_SOCKET_ACTIVATE = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); "
    "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


def socket_activation(sock: socket.socket) -> dict[str, Any]:
    """Keyword arguments for Tcpfwd that hand it ``sock`` as systemd would."""
    return {
        "prefix": [sys.executable, "-c", _SOCKET_ACTIVATE, str(sock.fileno())],
        "pass_fds": [sock.fileno()],
    }


def parse_logfmt(line: str) -> dict[str, str]:
    """Fields of a text access line (``key=value`` words after the timestamp)."""
    fields: dict[str, str] = {}
    for word in line.split()[1:]:
        key, _, value = word.partition("=")
        fields[key] = value
    return fields


def split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Tcpfwd:
    """A running ``python -m tcpfwd`` child process and what it has written.

    Started, it is awaited until it logs ``ready`` (`READY`, or `WORKERS_READY` for a
    supervisor; None: not awaited, e.g. a start expected to fail).
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        cwd: Path | None = None,
        ready: str | None = READY,
        prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.args = list(args)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "tcpfwd", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=env,
            pass_fds=tuple(pass_fds),
        )
        self.access: list[str] = []
        self.events: list[str] = []
        self.listening: dict[str, list[tuple[str, int]]] = {}
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(
                target=self._read, args=(self.process.stdout, self.access), daemon=True
            ),
            threading.Thread(
                target=self._read, args=(self.process.stderr, self.events), daemon=True
            ),
        ]
        for reader in self._readers:
            reader.start()
        if ready is not None:
            self.wait_for_event(ready, START_TIMEOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self, stream: Any, into: list[str]) -> None:
        for raw_line in stream:
            line = raw_line.rstrip("\n")
            with self._changed:
                into.append(line)
                match = _LISTENING.search(line)
                if match and into is self.events:
                    self.listening.setdefault(match.group(2), []).append(
                        split_hostport(match.group(1))
                    )
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def address(self, service: str = "default") -> tuple[str, int]:
        return self.listening[service][0]

    def wait_for_event(self, text: str, timeout: float = 10.0) -> str:
        return self._wait(lambda: next((e for e in self.events if text in e), None), timeout, text)

    def wait_for_access(self, count: int, timeout: float = 10.0) -> list[str]:
        self._wait(lambda: len(self.access) >= count or None, timeout, f"{count} access lines")
        return list(self.access)

    def access_records(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        lines = self.wait_for_access(count, timeout)
        return [json.loads(line) if line.startswith("{") else parse_logfmt(line) for line in lines]

    def _wait(self, found: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                result = found()
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and not found()):
                    if self.process.poll() is not None:
                        time.sleep(0.1)
                        result = found()
                        if result:
                            return result
                    raise AssertionError(
                        f"tcpfwd: no {what!r} after {timeout}s; exit={self.process.poll()}\n"
                        + "\n".join(self.events[-20:])
                    )
                self._changed.wait(min(remaining, 0.2))

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout=5)
        return code

    def stop(self, timeout: float = 15.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.wait(5)
            raise

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def capacity(self) -> int:
        """How many sessions it said it holds at once ("ready: ... up to N ...")."""
        return int(self.wait_for_event(READY).split("up to ")[1].split()[0])

    def worker_pids(self) -> dict[int, int]:
        """The latest pid of each worker index, from the supervisor's event lines."""
        pids: dict[int, int] = {}
        for line in list(self.events):
            match = _WORKER_STARTED.search(line)
            # A worker's own lines are tagged "[worker N pid P]": not the supervisor's.
            if match and not line.split(" ", 3)[2].startswith("[worker"):
                pids[int(match.group(1))] = int(match.group(2))
        return pids

    def kill_workers(self) -> None:
        """Kill, by pid, the workers a killed supervisor may have left behind."""
        for pid in self.worker_pids().values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class NotifyRecorder:
    """An sd_notify socket, as systemd would provide, that records every datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, timeout: float = 10.0) -> dict[str, str]:
        """The first message with ``key``; each try waits for a datagram a moment."""

        def received() -> dict[str, str] | None:
            found = next((message for message in self.messages if key in message), None)
            if found is None:
                data = self.sock.recv(4096)  # TimeoutError: nothing yet
                self.messages.append(
                    dict(line.split("=", 1) for line in data.decode().splitlines())
                )
            return found

        return wait_until(received, f"{key} on the notify socket", timeout, interval=0)

    def close(self) -> None:
        self.sock.close()


def event_time(line: str) -> float:
    """The wall-clock time of a daemon event line (``2024-05-01T12:00:00.123Z ...``)."""
    stamp = line.split(" ", 1)[0]
    whole, _, millis = stamp.rstrip("Z").partition(".")
    moment = time.strptime(whole, "%Y-%m-%dT%H:%M:%S")
    return calendar.timegm(moment) + int(millis or 0) / 1000


class SmtpBackend:
    """A real SMTP server (aiosmtpd) on loopback, and what it logged, per client.

    ``with SmtpBackend() as smtp:`` starts it in its own thread; ``smtp.log`` holds its
    ``mail.log`` records as ``(peer port, level, message)``.
    """

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller  # noqa: PLC0415 -- test extra only

        # aiosmtpd's controller cannot listen on port 0: take a free port, then hand it over.
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.log: list[tuple[int, int, str]] = []
        self._logger = logging.getLogger("mail.log")
        self._handler = _ListHandler(self.log)
        self._controller = Controller(_AcceptAll(), hostname=LOOPBACK, port=self.port)

    def __enter__(self) -> SmtpBackend:
        self._controller.start()
        # The controller's own readiness probe is not a client of the test: forget it.
        self._logger.addHandler(self._handler)
        self._previous_level = self._logger.level
        self._logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._controller.stop()
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._previous_level)

    def sessions(self) -> dict[int, list[str]]:
        """Messages by client port, in order."""
        by_peer: dict[int, list[str]] = {}
        for peer, _level, message in list(self.log):
            by_peer.setdefault(peer, []).append(message)
        return by_peer


class _AcceptAll:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


class _ListHandler(logging.Handler):
    _PEER = re.compile(r"^\('[\d.]+', (\d+)\) (.*)$")

    def __init__(self, into: list[tuple[int, int, str]]) -> None:
        super().__init__(logging.DEBUG)
        self._into = into

    def emit(self, record: logging.LogRecord) -> None:
        match = self._PEER.match(record.getMessage())
        if match:
            self._into.append((int(match.group(1)), record.levelno, match.group(2)))


# --- web pages ---------------------------------------------------------------------------


class PageHandler(BaseHTTPRequestHandler):
    """A request handler of a test's own web server: answers with `reply`, logs nothing."""

    def reply(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """``handler`` serving on a loopback port of its own, in a thread; the port."""
    server = ThreadingHTTPServer((LOOPBACK, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
