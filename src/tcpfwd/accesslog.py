"""Where the daemon's words go: one access line per session, and daemon events.

The session line answers "what happened to this connection?" in one place, after
HAProxy's tcplog: who connected where, every backend tried and why it failed, the
backend chosen and the local address used towards it (so the backend's own log line can
be matched to the real client), bytes each way, duration, and how it ended.

Access lines go to stdout through the ``tcpfwd.access`` logger; daemon events (start,
stop, errors) go to stderr through ``tcpfwd``. Both are text, or JSON objects on request.
"""

from __future__ import annotations

import functools
import json
import logging
import logging.handlers
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO, cast

from .dialer import OUTCOME_OK, Attempt

ACCESS_LOGGER = "tcpfwd.access"
EVENT_LOGGER = "tcpfwd"


@dataclass(slots=True)
class SessionRecord:
    session: str
    started: float
    client: str
    listener: str
    service: str
    attempts: list[Attempt] = field(default_factory=list)
    backend: str | None = None
    backend_address: str | None = None
    local_address: str | None = None
    connect_time: float | None = None
    # Hold mode: how long the client was kept waiting for a backend (None: not held).
    held: float | None = None
    # Attempts left out of ``attempts`` to keep the line short (a long hold).
    attempts_omitted: int = 0
    from_client: int = 0
    from_backend: int = 0
    # Which relay moved the bytes ("splice" or "copy"); None when no backend was reached.
    relay: str | None = None
    duration: float = 0.0
    end: str = ""
    # The peer that connected, when a trusted PROXY header named another client.
    via: str | None = None


# gmtime + strftime cost more than the rest of a session line, and most lines share
# their second with the one before: the whole-second part is formatted once per second.
@functools.lru_cache(maxsize=8)
def _second_prefix(whole: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def format_timestamp(seconds: float) -> str:
    return f"{_second_prefix(int(seconds))}.{int(seconds % 1 * 1000):03d}Z"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms"


def _attempt_target(attempt: Attempt) -> str:
    if attempt.backend == attempt.address:
        return attempt.address
    return f"{attempt.backend}/{attempt.address}"


def _transparent(record: SessionRecord) -> bool:
    """Whether the backend was reached from the client's address (the last attempt's)."""
    attempts = record.attempts
    return bool(attempts) and attempts[-1].outcome == OUTCOME_OK and attempts[-1].transparent


def format_text(record: SessionRecord) -> str:
    # One f-string: this runs for every session, and the parts-and-join form it replaces
    # cost a list and seventeen strings more.
    attempts = record.attempts
    if len(attempts) == 1 and attempts[0].outcome == OUTCOME_OK and not record.attempts_omitted:
        tried = "-"
    else:
        tried = ",".join(
            f"{_attempt_target(a)}/{a.outcome}/{_ms(a.elapsed)}"
            for a in attempts
            if a.outcome != OUTCOME_OK
        )
        if record.attempts_omitted:
            tried += f",+{record.attempts_omitted}"
        tried = tried or "-"
    connect = "-" if record.connect_time is None else f"{record.connect_time * 1000:.1f}ms"
    held = "-" if record.held is None else f"{record.held:.3f}s"
    return (
        f"{format_timestamp(record.started)} session={record.session}"
        f" client={record.client} via={record.via or '-'} listener={record.listener}"
        f" service={record.service} backend={record.backend or '-'}"
        f" backend_addr={record.backend_address or '-'} local={record.local_address or '-'}"
        f" transparent={int(_transparent(record))} failed={tried} connect={connect} held={held}"
        f" from_client={record.from_client} from_backend={record.from_backend}"
        f" relay={record.relay or '-'} duration={record.duration:.3f}s end={record.end}"
    )


def format_json(record: SessionRecord) -> str:
    document: dict[str, Any] = {
        "time": format_timestamp(record.started),
        "session": record.session,
        "client": record.client,
        "via": record.via,
        "listener": record.listener,
        "service": record.service,
        "backend": record.backend,
        "backend_address": record.backend_address,
        "local_address": record.local_address,
        "transparent": _transparent(record),
        "attempts": [
            {
                "backend": a.backend,
                "address": a.address,
                "outcome": a.outcome,
                "ms": round(a.elapsed * 1000, 3),
            }
            for a in record.attempts
        ],
        "attempts_omitted": record.attempts_omitted,
        "connect_ms": None if record.connect_time is None else round(record.connect_time * 1000, 3),
        "held_s": None if record.held is None else round(record.held, 6),
        "from_client": record.from_client,
        "from_backend": record.from_backend,
        "relay": record.relay,
        "duration_s": round(record.duration, 6),
        "end": record.end,
    }
    return json.dumps(document, separators=(",", ":"))


class AccessLog:
    def __init__(self, log_format: str = "text") -> None:
        self._logger = logging.getLogger(ACCESS_LOGGER)
        self.set_format(log_format)

    def set_format(self, log_format: str) -> None:
        self._format = format_json if log_format == "json" else format_text

    def emit(self, record: SessionRecord) -> None:
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        line = self._format(record)
        # The usual setup (one stream or file handler of ours, nothing else listening)
        # gets the line written directly: the logging module's record, filters and
        # formatter would produce exactly these bytes at several times the cost. Any
        # other setup (syslog, a handler added by an embedding program or a test) takes
        # the logging path.
        handlers = logger.handlers
        if len(handlers) == 1 and not logger.filters:
            handler = handlers[0]
            if (
                handler.__class__ in _DIRECT_HANDLERS
                and handler.formatter is _MESSAGE_ONLY
                and not handler.filters
                and handler.level <= logging.INFO
            ):
                direct = cast(logging.StreamHandler[TextIO], handler)
                stream = direct.stream
                if stream is not None:
                    handler.acquire()
                    try:
                        stream.write(line + direct.terminator)
                        stream.flush()
                        return
                    except Exception:
                        # A failing stream: let the logging path report it its own way.
                        pass
                    finally:
                        handler.release()
        logger.info(line)


class _JsonEventFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": format_timestamp(record.created),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        return json.dumps(document, separators=(",", ":"))


class _TextEventFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return (
            f"{format_timestamp(record.created)} {record.levelname.lower()} {record.getMessage()}"
        )


# The formatter of the access handler: the line as it is (see ``AccessLog.emit``).
_MESSAGE_ONLY = logging.Formatter("%(message)s")
_DIRECT_HANDLERS = (logging.StreamHandler, logging.FileHandler)

_SYSLOG_FACILITIES = {
    "daemon": logging.handlers.SysLogHandler.LOG_DAEMON,
    "mail": logging.handlers.SysLogHandler.LOG_MAIL,
    "user": logging.handlers.SysLogHandler.LOG_USER,
    **{f"local{n}": logging.handlers.SysLogHandler.LOG_LOCAL0 + n for n in range(8)},
}

# Files we write to, reopened on request (SIGUSR1) so logrotate can move them away.
_open_files: list[logging.FileHandler] = []


def _handler(target: str, facility: str, syslog_address: str, tag: str) -> logging.Handler:
    if target == "stdout":
        return logging.StreamHandler(sys.stdout)
    if target == "stderr":
        return logging.StreamHandler(sys.stderr)
    if target == "off":
        return logging.NullHandler()
    if target == "syslog":
        handler = logging.handlers.SysLogHandler(
            address=syslog_address, facility=_SYSLOG_FACILITIES[facility]
        )
        handler.ident = f"{tag}: "
        return handler
    file_handler = logging.FileHandler(target, encoding="utf-8")
    _open_files.append(file_handler)
    return file_handler


def reopen_log_files() -> int:
    """Reopen every log file by its path; returns how many were reopened."""
    for handler in _open_files:
        handler.acquire()
        try:
            if handler.stream is not None:
                handler.stream.close()
            handler.stream = handler._open()
        finally:
            handler.release()
    return len(_open_files)


def configure_logging(
    log_format: str = "text",
    level: str = "info",
    *,
    access_target: str = "stdout",
    event_target: str = "stderr",
    syslog_facility: str = "daemon",
    syslog_address: str = "/dev/log",
) -> None:
    """Route access lines and daemon events to their targets, replacing earlier setup.

    Raises OSError when a log file or the syslog socket cannot be opened.
    """
    access = logging.getLogger(ACCESS_LOGGER)
    events = logging.getLogger(EVENT_LOGGER)
    for logger in (access, events):
        for old in list(logger.handlers):
            logger.removeHandler(old)
            old.close()
    _open_files.clear()
    access_handler = _handler(access_target, syslog_facility, syslog_address, "tcpfwd-access")
    access_handler.setFormatter(_MESSAGE_ONLY)
    access.addHandler(access_handler)
    access.propagate = False
    # The access logger is a child of the event logger: keep it from inheriting its level.
    access.setLevel(logging.INFO)
    event_handler = _handler(event_target, syslog_facility, syslog_address, "tcpfwd")
    event_handler.setFormatter(
        _JsonEventFormatter() if log_format == "json" else _TextEventFormatter()
    )
    events.addHandler(event_handler)
    events.propagate = False
    events.setLevel(level.upper())
