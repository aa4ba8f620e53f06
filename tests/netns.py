"""Network namespaces for tests: small private networks of veth pairs, made and removed
by the test that uses them.

A `Lab` creates namespaces under names unique to the test process and the lab (the
two pytest-xdist workers never collide), joins them with veth pairs created directly
inside them (nothing appears in the host's own namespace), and on `close` stops every
process still inside them, closes the sockets it made there and deletes them. The
routes, rules and iptables rules a test adds live inside those namespaces and go with
them; `close` checks that each namespace is gone, and runs on failure too (use
``with Lab() as lab:`` or the ``lab`` fixture).

Sockets inside a namespace are made from this process: a short-lived thread enters the
namespace (``setns``), creates the socket and leaves; the socket stays in the namespace
it was made in, and the test uses it like any other.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from support import wait_until

T = TypeVar("T")

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_COMMAND_TIMEOUT = 20.0
_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


@functools.cache
def unavailable() -> str | None:
    """Why namespace tests cannot run here, or None (found out once per process)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables", "ip6tables", "sysctl", "ss"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/setup.sh installs it)"
    probe = f"tf{os.getpid()}probe"
    made = run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns is not available here: {made.stderr.strip()}"
    run("ip", "netns", "delete", probe, check=False)
    return None


def require() -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result


class Namespace:
    """One network namespace of a lab."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    @property
    def prefix(self) -> list[str]:
        """Put before a command to run it inside: ``[*ns.prefix, "ss", "-tn"]``."""
        return ["ip", "netns", "exec", self.name]

    def ip(self, *args: str) -> str:
        return run("ip", "-n", self.name, *args).stdout

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(*self.prefix, *argv, check=check)

    def sh(self, script: str) -> None:
        """Each line of ``script`` as a command inside (comments and blanks skipped)."""
        for line in script.splitlines():
            command = line.split("#", 1)[0].split()
            if command:
                self.run(*command)

    def sysctl(self, key: str, value: str) -> None:
        # /proc/sys/net is per namespace: written from inside, it is this one's.
        self.run("sysctl", "-qw", f"{key}={value}")

    def call(self, function: Callable[[], T]) -> T:
        """``function()`` run by a thread that has entered this namespace."""
        outcome: list[T] = []
        failure: list[BaseException] = []

        def enter_and_call() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    if _libc.setns(fd, _CLONE_NEWNET) != 0:
                        code = ctypes.get_errno()
                        raise OSError(code, f"setns {self.name}: {os.strerror(code)}")
                finally:
                    os.close(fd)
                outcome.append(function())
            except BaseException as error:
                failure.append(error)

        thread = threading.Thread(target=enter_and_call, daemon=True)
        thread.start()
        thread.join(_COMMAND_TIMEOUT)
        if failure:
            raise failure[0]
        if not outcome:
            raise AssertionError(f"no result from inside {self.name}")
        return outcome[0]

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket of this namespace, closed with the lab if not before."""
        sock = self.call(lambda: socket.socket(family, kind))
        self.lab.sockets.append(sock)
        return sock

    def connect(self, address: tuple[str, int], timeout: float = 10.0) -> socket.socket:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = self.socket(family)
        sock.settimeout(timeout)
        sock.connect(address)
        return sock

    def link_ready(self, device: str) -> bool:
        return " state UP " in self.ip("link", "show", device)

    def pids(self) -> list[int]:
        return [int(pid) for pid in run("ip", "netns", "pids", self.name).stdout.split()]


class Lab:
    """Namespaces made for one test, and everything in them, removed by `close`."""

    def __init__(self) -> None:
        # Short: the names of the namespace files, unique per process and lab.
        self.tag = f"tf{os.getpid()}x{next(_counter)}"
        self.namespaces: list[Namespace] = []
        self.sockets: list[socket.socket] = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def namespace(self, role: str) -> Namespace:
        namespace = Namespace(self, f"{self.tag}-{role}")
        run("ip", "netns", "add", namespace.name)
        self.namespaces.append(namespace)
        namespace.ip("link", "set", "lo", "up")
        # No duplicate address detection on the links to come: until it has passed, a
        # link has no usable link-local address, and IPv6 neighbour discovery for a
        # packet from a non-local (transparent) source waits for one.
        namespace.sysctl("net.ipv6.conf.default.accept_dad", "0")
        namespace.sysctl("net.ipv6.conf.all.accept_dad", "0")
        return namespace

    def link(self, a: Namespace, a_name: str, b: Namespace, b_name: str) -> None:
        """A veth pair from ``a`` (``a_name``) to ``b`` (``b_name``), both up."""
        a.ip("link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name)
        a.ip("link", "set", a_name, "up")
        b.ip("link", "set", b_name, "up")
        # Until the kernel's link watcher has run (up to a second), a new link drops what
        # it is given to send: wait for it to say the link is up at both ends.
        wait_until(
            lambda: a.link_ready(a_name) and b.link_ready(b_name),
            f"{a_name}-{b_name} to come up",
            5,
            interval=0.02,
            ignoring=(),
        )

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self.sockets.clear()
        for namespace in reversed(self.namespaces):
            if namespace.path.exists():
                _stop_all(namespace)
                run("ip", "netns", "delete", namespace.name, check=False)
        leftovers = [n.name for n in self.namespaces if n.path.exists()]
        self.namespaces.clear()
        assert not leftovers, f"namespaces left behind: {leftovers}"


def _stop_all(namespace: Namespace, timeout: float = 10.0) -> None:
    """Kill what still runs inside (only this lab's processes can be there), by PID."""

    def none_left() -> bool:
        pids = [pid for pid in namespace.pids() if pid != os.getpid()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Not reaped here: whoever started them waits for them (a dead process waiting
        # to be reaped is no longer listed as inside).
        return not pids

    wait_until(none_left, f"the processes in {namespace.name} to stop", timeout, ignoring=())


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    require()
    with Lab() as made:
        yield made
