"""Where the daemon's words go: one access line per session, and daemon events.

The session line answers "what happened to this connection?" in one place, after
HAProxy's tcplog: who connected where, every backend tried and why it failed, the
backend chosen and the local address used towards it (so the backend's own log line can
be matched to the real client), bytes each way, duration, and how it ended.

Access lines go to stdout through the ``tcpfwd.access`` logger; daemon events (start,
stop, errors) go to stderr through ``tcpfwd``. Both are text, or JSON objects on request.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

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
    from_client: int = 0
    from_backend: int = 0
    # Which relay moved the bytes ("splice" or "copy"); None when no backend was reached.
    relay: str | None = None
    duration: float = 0.0
    end: str = ""


def _timestamp(seconds: float) -> str:
    moment = time.gmtime(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", moment) + f".{int(seconds % 1 * 1000):03d}Z"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms"


def _attempt_target(attempt: Attempt) -> str:
    if attempt.backend == attempt.address:
        return attempt.address
    return f"{attempt.backend}/{attempt.address}"


def format_text(record: SessionRecord) -> str:
    failed = [a for a in record.attempts if a.outcome != OUTCOME_OK]
    tried = ",".join(f"{_attempt_target(a)}/{a.outcome}/{_ms(a.elapsed)}" for a in failed)
    parts = [
        _timestamp(record.started),
        f"session={record.session}",
        f"client={record.client}",
        f"listener={record.listener}",
        f"service={record.service}",
        f"backend={record.backend or '-'}",
        f"backend_addr={record.backend_address or '-'}",
        f"local={record.local_address or '-'}",
        f"failed={tried or '-'}",
        f"connect={_ms(record.connect_time) if record.connect_time is not None else '-'}",
        f"from_client={record.from_client}",
        f"from_backend={record.from_backend}",
        f"relay={record.relay or '-'}",
        f"duration={record.duration:.3f}s",
        f"end={record.end}",
    ]
    return " ".join(parts)


def format_json(record: SessionRecord) -> str:
    document: dict[str, Any] = {
        "time": _timestamp(record.started),
        "session": record.session,
        "client": record.client,
        "listener": record.listener,
        "service": record.service,
        "backend": record.backend,
        "backend_address": record.backend_address,
        "local_address": record.local_address,
        "attempts": [
            {
                "backend": a.backend,
                "address": a.address,
                "outcome": a.outcome,
                "ms": round(a.elapsed * 1000, 3),
            }
            for a in record.attempts
        ],
        "connect_ms": None if record.connect_time is None else round(record.connect_time * 1000, 3),
        "from_client": record.from_client,
        "from_backend": record.from_backend,
        "relay": record.relay,
        "duration_s": round(record.duration, 6),
        "end": record.end,
    }
    return json.dumps(document, separators=(",", ":"))


class AccessLog:
    def __init__(self, log_format: str = "text") -> None:
        self._format = format_json if log_format == "json" else format_text
        self._logger = logging.getLogger(ACCESS_LOGGER)

    def emit(self, record: SessionRecord) -> None:
        if self._logger.isEnabledFor(logging.INFO):
            self._logger.info(self._format(record))


class _JsonEventFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        return json.dumps(document, separators=(",", ":"))


class _TextEventFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{_timestamp(record.created)} {record.levelname.lower()} {record.getMessage()}"


def configure_logging(log_format: str = "text", level: str = "info") -> None:
    """Send access lines to stdout and daemon events to stderr, replacing earlier setup."""
    access = logging.getLogger(ACCESS_LOGGER)
    events = logging.getLogger(EVENT_LOGGER)
    for logger in (access, events):
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
    access_handler = logging.StreamHandler(sys.stdout)
    access_handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(access_handler)
    access.propagate = False
    access.setLevel(logging.INFO)
    event_handler = logging.StreamHandler(sys.stderr)
    event_handler.setFormatter(
        _JsonEventFormatter() if log_format == "json" else _TextEventFormatter()
    )
    events.addHandler(event_handler)
    events.propagate = False
    events.setLevel(level.upper())
    # The access logger is a child of the event logger; keep it from inheriting its level.
