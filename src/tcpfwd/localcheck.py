"""Checks of a configuration that need this machine: names resolved, local addresses known.

``config.py`` is pure, so it can only compare what is written. Run by ``tcpfwd check``,
at start and on every reload, this adds what only the system can tell:

- a backend name that resolves to one of tcpfwd's own listen addresses (a loop: every
  connection to it would come back to tcpfwd, which would dial it again);
- a backend at an address of this machine other than loopback, on the port of a
  wildcard listen address (``*:P`` serves every local address);
- a listen name (``localhost``) that resolves to an address another listener takes.

Only names that could matter are resolved (a backend name whose port some listener
uses; a listen name whose port another listener uses), all at once, within a time
budget. A name that does not resolve in time, or at all, is not an error: backends are
resolved when they are tried, and a listener that cannot bind says so at start.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterable

from .config import (
    Config,
    ConfigError,
    ConfigIssue,
    IPAddress,
    always_local,
    host_ips,
    listen_overlaps,
    self_loops,
)

# How long all look-ups together may take. A reload runs this on the event loop, so it
# must stay short; names are usually in a cache or /etc/hosts and take microseconds.
RESOLVE_BUDGET = 2.0
# Look-ups in flight at once.
RESOLVERS = 8


def check_local(config: Config, budget: float = RESOLVE_BUDGET) -> Config:
    """``config`` itself, or ConfigError listing every problem found against this machine."""
    issues = local_problems(config, budget)
    if issues:
        raise ConfigError(config.source, issues)
    return config


def local_problems(config: Config, budget: float = RESOLVE_BUDGET) -> list[ConfigIssue]:
    resolved = resolve_names(names_to_resolve(config), budget)
    return [
        *listen_overlaps(config.services, config.admin, resolved.get),
        *self_loops(config.services, resolved.get, is_local_address),
    ]


def names_to_resolve(config: Config) -> list[str]:
    """Host names whose addresses could reveal a loop or an overlap; literals need none."""
    listens = [a for s in config.services for a in s.listen if a.port]
    if config.admin.listen is not None and config.admin.listen.port:
        listens.append(config.admin.listen)
    ports = [a.port for a in listens]
    names: dict[str, None] = {}
    for address in listens:
        if ports.count(address.port) > 1 and host_ips(address.host) is None:
            names[address.host] = None
    for service in config.services:
        for backend in service.backends:
            address = backend.address
            if address.port in ports and host_ips(address.host) is None:
                names[address.host] = None
    return list(names)


def resolve_names(names: Iterable[str], budget: float) -> dict[str, tuple[str, ...]]:
    """The addresses of each name that resolved within ``budget`` seconds.

    Look-ups run in daemon threads: one that hangs is abandoned at the deadline and
    keeps neither the caller nor the process's exit waiting.
    """
    pending: queue.SimpleQueue[str] = queue.SimpleQueue()
    count = 0
    for name in names:
        pending.put(name)
        count += 1
    if not count:
        return {}
    results: dict[str, tuple[str, ...]] = {}
    lock = threading.Lock()
    done = threading.Condition(lock)
    finished = [0]

    def work() -> None:
        while True:
            try:
                name = pending.get_nowait()
            except queue.Empty:
                return
            found = _lookup(name)
            with done:
                if found is not None:
                    results[name] = found
                finished[0] += 1
                done.notify_all()

    for index in range(min(RESOLVERS, count)):
        threading.Thread(target=work, name=f"tcpfwd-check-{index}", daemon=True).start()
    deadline = time.monotonic() + budget
    with done:
        while finished[0] < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            done.wait(remaining)
        return dict(results)


def _lookup(name: str) -> tuple[str, ...] | None:
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    return tuple(dict.fromkeys(str(info[4][0]) for info in infos))


def is_local_address(ip: IPAddress) -> bool:
    """Whether ``ip`` is an address of this machine (where ``*:P`` would serve it).

    Found by binding a socket to it, which succeeds only for a local address, unless
    the system lets programs bind any address (``ip_nonlocal_bind``): then only loopback
    counts, as nothing else can be told apart.
    """
    if always_local(ip):
        return True
    if _binds_any_address(ip.version):
        return False
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        infos = socket.getaddrinfo(str(ip), 0, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(infos[0][4])
    except OSError:
        return False
    return True


def _binds_any_address(version: int) -> bool:
    path = f"/proc/sys/net/ipv{version}/ip_nonlocal_bind"
    try:
        with open(path) as setting:
            return setting.read().strip() != "0"
    except OSError:
        return False
