"""Peers for the PROXY protocol tests: a recording backend, and real HAProxy, nginx
and Postfix processes started in the foreground on loopback ports.

Each real peer runs with a configuration written into the test's ``tmp_path`` and is
stopped by its own PID at the end of its ``with`` block. A peer whose binary is not
installed skips the test that asks for it (``.ci/install-peers.sh`` installs them).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from support import ThreadedServer, connect, recv_all, wait_until

# A client address that differs from the bouncer's own (127.0.0.1), so that a peer's log
# can only show it if a PROXY header carried it.
CLIENT_IP = "127.0.0.2"
PEER_START_TIMEOUT = 20.0
POSTFIX_DAEMONS = Path("/usr/lib/postfix/sbin")


def is_listening(port: int, pid: int | str = "self") -> bool:
    """Whether a TCP socket listens on ``port``, found without connecting to it.

    Connecting would not do: to a sender peer (HAProxy ``send-proxy``) a probe is a
    client, which it would relay to the tcpfwd under test. The sockets looked at are
    those of process ``pid``'s network namespace.
    """
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                # local_address is "ADDR:PORT" in hex; state 0A is LISTEN.
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    return True
    return False


def client_from(address: tuple[str, int], source_ip: str = CLIENT_IP) -> socket.socket:
    return connect(address, source=source_ip)


# --- a backend that records what each connection sent -------------------------------


class Recording:
    """What one connection to a :class:`RecordingBackend` sent."""

    def __init__(self) -> None:
        self.first_recv = b""
        self.data = b""
        self.done = threading.Event()


class RecordingBackend(ThreadedServer):
    """Records each connection's first ``recv()`` and all its bytes; replies ``reply``,
    echoes everything after it, and half-closes back at EOF."""

    def __init__(self, reply: bytes = b"") -> None:
        self.recordings: list[Recording] = []
        self._reply = reply
        super().__init__(self._handle)

    def _handle(self, conn: socket.socket) -> None:
        recording = Recording()
        self.recordings.append(recording)
        try:
            if self._reply:
                conn.sendall(self._reply)
            conn.settimeout(10)
            first = conn.recv(65536)
            recording.first_recv = first
            data = bytearray(first)
            if first:
                conn.sendall(first)
                while chunk := conn.recv(65536):
                    data += chunk
                    conn.sendall(chunk)
            recording.data = bytes(data)
            conn.shutdown(socket.SHUT_WR)
        finally:
            recording.done.set()

    def recording(self, index: int = 0, timeout: float = 10.0) -> Recording:
        wait_until(lambda: len(self.recordings) > index, "a backend connection", timeout)
        recording = self.recordings[index]
        assert recording.done.wait(timeout), "backend connection did not finish"
        return recording


# --- real peers -----------------------------------------------------------------------


def require_binary(name: str, path: str | None = None) -> str:
    found = path if path and os.access(path, os.X_OK) else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (.ci/install-peers.sh installs it)")
    return found


class PeerProcess:
    """A foreground child process whose output lines are collected as they come."""

    def __init__(self, name: str, argv: list[str], cwd: Path) -> None:
        self.name = name
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_port(self, port: int) -> None:
        def listening() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.process.returncode}:\n" + "\n".join(self.lines)
                )
            return is_listening(port, self.process.pid)

        # ignoring=(): a peer that exited will never listen.
        wait_until(
            listening, f"{self.name} to listen on port {port}", PEER_START_TIMEOUT, ignoring=()
        )

    def wait_for_line(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            return next((m for line in list(self.lines) if (m := regex.search(line))), None)

        return wait_until(found, f"{self.name} to log {pattern!r}", timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._reader.join(timeout=5)


@contextlib.contextmanager
def haproxy(tmp_path: Path, config: str, port: int) -> Iterator[PeerProcess]:
    """HAProxy in the foreground (``-db``) with ``config``'s proxies after our globals;
    it logs to stdout (``PeerProcess.lines``)."""
    binary = require_binary("haproxy")
    path = tmp_path / "haproxy.cfg"
    path.write_text(
        "global\n"
        "    log stdout format raw local0 info\n"
        "defaults\n"
        "    mode tcp\n"
        "    log global\n"
        "    timeout connect 2s\n"
        "    timeout client 10s\n"
        "    timeout server 10s\n" + config
    )
    peer = PeerProcess("haproxy", [binary, "-f", str(path), "-db"], tmp_path)
    try:
        peer.wait_for_port(port)
        yield peer
    finally:
        peer.stop()


NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


@contextlib.contextmanager
def nginx_stream(tmp_path: Path, servers: str, port: int) -> Iterator[PeerProcess]:
    """nginx with a ``stream {}`` block holding ``servers``; one process, no daemon."""
    binary = require_binary("nginx")
    if not NGINX_STREAM_MODULE.exists():
        pytest.skip("nginx's stream module is not installed (libnginx-mod-stream)")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"load_module {NGINX_STREAM_MODULE};\n"
        "daemon off;\n"
        # One process: the PID we hold is the whole server.
        "master_process off;\n"
        f"pid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/error.log info;\n"
        "events { worker_connections 64; }\n"
        f"stream {{\n{servers}\n}}\n"
    )
    argv = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    peer = PeerProcess("nginx", argv, prefix)
    try:
        peer.wait_for_port(port)
        yield peer
    finally:
        peer.stop()


class Postfix(PeerProcess):
    """A private Postfix instance: its own config, queue and data directories, and log."""

    def __init__(self, root: Path, argv: list[str]) -> None:
        self.root = root
        self.maillog = root / "maillog"
        super().__init__("postfix", argv, root)

    def log(self) -> str:
        return self.maillog.read_text() if self.maillog.exists() else ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        regex = re.compile(pattern)
        return wait_until(lambda: regex.search(self.log()), f"maillog: {pattern!r}", timeout)


# Only the daemons an smtpd needs to greet, talk and queue a message; chroot off.
_POSTFIX_MASTER_CF = """\
postlog   unix-dgram n  -       n       -       1       postlogd
anvil     unix  -       -       n       -       1       anvil
proxymap  unix  -       -       n       -       -       proxymap
rewrite   unix  -       -       n       -       -       trivial-rewrite
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
scache    unix  -       -       n       -       1       scache
flush     unix  n       -       n       1000?   0       flush
"""


@contextlib.contextmanager
def postfix(
    tmp_path: Path,
    services: str,
    main_cf: str = "",
    *,
    ports: tuple[int, ...],
    prefix: Sequence[str] = (),
) -> Iterator[Postfix]:
    """Postfix's ``master`` in the foreground with a private configuration directory.

    ``services`` are extra master.cf lines (the smtpd listeners under test); ``ports``
    are the TCP ports they listen on, awaited before the block runs. ``main_cf`` lines
    replace the defaults below of the same name. The instance logs to ``maillog``
    through postlogd (``maillog_file``, Postfix 3.4+), so no syslog is needed.
    ``master`` needs root, as Postfix always does. ``prefix`` goes before its command
    (e.g. ``ip netns exec NAME``).
    """
    require_binary("postfix")
    master = require_binary("master", str(POSTFIX_DAEMONS / "master"))
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root")
    # Not under tmp_path: its parents are private to root, and Postfix's daemons run as
    # the postfix user inside the queue directory. A short path also keeps the queue's
    # UNIX sockets under the 108-byte limit.
    root = Path(tempfile.mkdtemp(prefix="tcpfwd-postfix-"))
    root.chmod(0o755)
    conf, queue, data = root / "conf", root / "queue", root / "data"
    for directory in (conf, queue, data):
        directory.mkdir(parents=True)
    shutil.chown(data, user="postfix")
    defaults = (
        "compatibility_level = 3.6\n"
        f"queue_directory = {queue}\n"
        f"data_directory = {data}\n"
        f"maillog_file = {root}/maillog\n"
        f"maillog_file_prefixes = {root}\n"
        "myhostname = tcpfwd-test.localdomain\n"
        "inet_interfaces = loopback-only\n"
        "inet_protocols = ipv4\n"
        "mynetworks = 127.0.0.0/8\n"
        # Loopback peers have no useful reverse DNS; the log then says unknown[ip].
        "smtpd_peername_lookup = no\n"
        "alias_maps =\n"
        "alias_database =\n"
        "local_recipient_maps =\n"
        "smtp_tls_security_level = none\n"
        "smtpd_tls_security_level = none\n"
    )
    replaced = {line.split("=", 1)[0].strip() for line in main_cf.splitlines() if "=" in line}
    kept = [line for line in defaults.splitlines() if line.split("=", 1)[0].strip() not in replaced]
    (conf / "main.cf").write_text("\n".join(kept) + "\n" + main_cf)
    (conf / "master.cf").write_text(_POSTFIX_MASTER_CF + services)
    # "postfix check" creates the queue directories with the owners master expects.
    subprocess.run(["postfix", "-c", str(conf), "check"], check=True, timeout=60)
    _become_subreaper()
    peer = Postfix(root, [*prefix, master, "-s", "-c", str(conf)])
    try:
        for port in ports:
            peer.wait_for_port(port)
        yield peer
    finally:
        daemons = _descendants(peer.process.pid)
        peer.stop()
        _reap(daemons)
        # Keep the configuration and log with the test's other files; drop the queue.
        for keep in ("conf", "maillog"):
            if (root / keep).exists():
                shutil.move(root / keep, tmp_path / f"postfix-{keep}")
        shutil.rmtree(root, ignore_errors=True)


_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    """Adopt master's daemons when it exits, so that they can be waited for here.

    master ends its children with SIGTERM and exits without waiting for them; without
    this they would become zombies of PID 1, which in a container may never reap them.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found.append(int(child))
                found.extend(_descendants(int(child)))
    return found


def _reap(pids: list[int], timeout: float = 10.0) -> None:
    """Wait for these adopted processes (by PID, never any other child of ours)."""
    deadline = time.monotonic() + timeout
    waiting = set(pids)
    while waiting and time.monotonic() < deadline:
        for pid in list(waiting):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                waiting.discard(pid)  # not ours (reaped elsewhere, or never adopted)
                continue
            if done:
                waiting.discard(pid)
        if waiting:
            time.sleep(0.05)


def smtp_hello(address: tuple[str, int], source_ip: str = CLIENT_IP) -> bytes:
    """Connect from ``source_ip``, read the greeting, say QUIT; everything received."""
    with client_from(address, source_ip) as sock:
        greeting = sock.recv(1024)
        sock.sendall(b"QUIT\r\n")
        return greeting + recv_all(sock)
