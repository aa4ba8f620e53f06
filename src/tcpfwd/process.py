"""This process and its operating system: the one place for what a daemon asks of it.

- the descriptor budget: how far the descriptor limit is raised, and how it is split
  between sessions, the splice relay's pipes and a reserve;
- the log targets, configured from the file and switched on reload;
- the pid file, written before privileges are dropped and removed at exit;
- the privilege drop, and the capabilities the configuration needs after it;
- the event loop (uvloop where installed) and the collector's settings once started.

The single process, the supervisor and each worker use these alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import grp
import os
import pwd
import resource
from collections.abc import Iterator
from types import ModuleType

from .accesslog import configure_logging
from .config import Config
from .listener import ListenError
from .splice import PIPE_POOL_MAX
from .transparent import capability_problem

# Imported up front, not when the loop is made: after dropping privileges the
# interpreter's own files may no longer be readable.
_uvloop: ModuleType | None
try:
    import uvloop as _uvloop
except ImportError:  # pragma: no cover - platforms without uvloop
    _uvloop = None

__all__ = [
    "configure_logging_for",
    "drop_privileges",
    "logging_settings",
    "new_event_loop",
    "pid_file",
    "pipe_budget",
    "pipes_to_keep",
    "raise_descriptor_limit",
    "require_capabilities",
    "session_capacity",
    "settle_memory",
    "write_pid_file",
]

# --- descriptors ----------------------------------------------------------------------


def raise_descriptor_limit() -> int:
    """Raise the soft descriptor limit as far as it goes; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def _reserve(limit: int) -> int:
    # Kept free for listeners, logs, resolver and checks.
    return 32 + limit // 20


def pipe_budget(limit: int) -> int:
    """How many pipes the splice relay may have open at once (in use or idle).

    A pipe is held only while its direction has bytes in flight, so this bounds the
    busy directions spliced at the same moment; beyond it, chunks are copied. A 64th of
    the descriptors keeps idle sessions' capacity close to the copy relay's.
    """
    return limit // 64


def pipes_to_keep(limit: int) -> int:
    """How many idle pipes the splice relay may keep: none when descriptors are scarce."""
    return min(PIPE_POOL_MAX, limit // 256, pipe_budget(limit))


def session_capacity(limit: int, per_session: int = 2, held: int = 0) -> int:
    """How many sessions ``limit`` descriptors allow.

    A session holds ``per_session`` descriptors (two sockets; the splice relay adds two
    pipes); ``held`` are kept outside sessions (idle pipes). Past this many we stop
    accepting, so extra clients wait in the kernel's queue rather than being accepted
    and then dropped for want of a descriptor towards the backend.
    """
    return max(1, (limit - _reserve(limit) - held) // per_session)


# --- logs -----------------------------------------------------------------------------


def configure_logging_for(config: Config) -> None:
    configure_logging(
        config.log_format,
        config.log_level,
        access_target=config.access_log,
        event_target=config.event_log,
        syslog_facility=config.syslog_facility,
        syslog_address=config.syslog_address,
    )


def logging_settings(config: Config) -> tuple[object, ...]:
    """What ``configure_logging_for`` reads: a reload reconfigures only when it changed."""
    return (
        config.log_format,
        config.log_level,
        config.access_log,
        config.event_log,
        config.syslog_facility,
        config.syslog_address,
    )


# --- pid file and privileges ----------------------------------------------------------


def write_pid_file(path: str | None) -> None:
    """Write this process's pid to ``path`` (if set); ListenError when it cannot."""
    if not path:
        return
    try:
        with open(path, "w") as stream:
            stream.write(f"{os.getpid()}\n")
    except OSError as error:
        raise ListenError(f"cannot write pid file {path}: {error.strerror}") from None


@contextlib.contextmanager
def pid_file(path: str | None) -> Iterator[None]:
    """The pid file for as long as the block runs (nothing when ``path`` is unset)."""
    write_pid_file(path)
    try:
        yield
    finally:
        if path:
            # Privileges may be gone by now and the folder root's: then it stays.
            with contextlib.suppress(OSError):
                os.unlink(path)


def drop_privileges(user: str | None, group: str | None) -> None:
    """Become ``user``/``group`` (names or numbers) when running as root."""
    if os.geteuid() != 0 or (user is None and group is None):
        return
    try:
        uid = int(user) if user and user.isdigit() else pwd.getpwnam(user).pw_uid if user else None
        if group is not None:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        elif user is not None:
            gid = pwd.getpwuid(uid).pw_gid if uid is not None else os.getgid()
        else:
            gid = os.getgid()
    except KeyError as error:
        raise ListenError(f"cannot switch user: no such user or group {error}") from None
    try:
        os.setgroups([gid])
        os.setgid(gid)
        if uid is not None:
            os.setuid(uid)
    except OSError as error:
        raise ListenError(f"cannot switch to user {user} group {group}: {error.strerror}") from None


def require_capabilities(config: Config) -> None:
    """ListenError if ``config`` needs a capability this process lacks.

    Called once privileges are dropped, since switching user drops capabilities too:
    a missing one is one clear line at start, not a failure of every connection.
    """
    problem = capability_problem(config)
    if problem is not None:
        raise ListenError(problem)


# --- the event loop and the collector -------------------------------------------------


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (Linux, macOS), asyncio's own loop elsewhere."""
    if _uvloop is None:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = _uvloop.new_event_loop()
    return loop


# Young-generation collections: sessions allocate a few container objects each and hold
# no reference cycles, so the collector runs far less often than the default 700.
GC_THRESHOLD = (20_000, 20, 20)


def settle_memory() -> None:
    """Once started: what start-up allocated (modules, config, the HTTP stack) is kept
    out of every later collection, and young collections come less often. At thousands
    of connections a second the default settings made the collector a tenth of the
    Python time, most of it walking start-up objects that never die."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
