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
import logging.handlers
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO, cast

from .vocabulary import End, EndWord, Outcome, Reject, RelayMode

ACCESS_LOGGER = "tcpfwd.access"
EVENT_LOGGER = "tcpfwd"


@dataclass(slots=True)
class AttemptResult:
    """One attempt to reach a backend, as the log tells it."""

    backend: str
    address: str
    outcome: str
    elapsed: float


@dataclass(slots=True)
class SessionRecord:
    session: str
    started: float
    client: str
    listener: str
    service: str
    # The attempts that failed, in the order they were made.
    failed: Sequence[AttemptResult] = ()
    backend: str | None = None
    backend_address: str | None = None
    local_address: str | None = None
    # How long the attempt that succeeded took by itself.
    attempt_time: float = 0.0
    # From the first attempt to the backend the session used.
    connect_time: float | None = None
    # Hold mode: how long the client was kept waiting for a backend (None: not held).
    held: float | None = None
    # Attempts left out of ``failed`` to keep the line short (a long hold).
    attempts_omitted: int = 0
    from_client: int = 0
    from_backend: int = 0
    # Which relay moved the bytes (splice or copy); None when no backend was reached.
    relay: RelayMode | None = None
    duration: float = 0.0
    end: EndWord = End.CLIENT_CLOSED
    # The peer that connected, when a trusted PROXY header named another client.
    via: str | None = None
    # The backend was reached from the client's own address (transparent mode).
    transparent: bool = False

    @property
    def attempts(self) -> list[AttemptResult]:
        """Every attempt in order, the one that succeeded last."""
        if self.backend is None:
            return list(self.failed)
        ok = AttemptResult(self.backend, self.backend_address or "?", Outcome.OK, self.attempt_time)
        return [*self.failed, ok]


# The words of the line as plain strings: formatting an enum member costs a method call,
# a dict look-up does not.
_PLAIN: Final[dict[str, str]] = {
    word: str.__str__(word) for words in (End, Reject, RelayMode) for word in words
}

# gmtime + strftime cost more than the rest of a session line, and most lines share
# their second with the one before: the whole-second part is formatted once per second.
_SECONDS: dict[int, str] = {}


def _second_prefix(whole: int) -> str:
    prefix = _SECONDS.get(whole)
    if prefix is None:
        if len(_SECONDS) > 16:
            _SECONDS.clear()
        prefix = _SECONDS[whole] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return prefix


# Formatting numbers with a precision costs a session line more than everything else in
# it; the usual values are looked up instead: a timestamp's milliseconds, a connect time
# under 100 ms in tenths of a millisecond, a duration under 10 s in milliseconds.
_MILLIS: Final = tuple(f".{ms:03d}Z" for ms in range(1000))
_TENTHS_OF_MS: Final = tuple(f"{tenths // 10}.{tenths % 10}ms" for tenths in range(1000))
_SECONDS_3: Final = tuple(f"{ms // 1000}.{ms % 1000:03d}s" for ms in range(10_000))


def format_timestamp(seconds: float) -> str:
    whole = int(seconds)
    return _second_prefix(whole) + _MILLIS[int((seconds - whole) * 1000)]


def _ms(seconds: float) -> str:
    """Milliseconds to a tenth, as ``3.1ms``."""
    tenths = int(seconds * 10_000 + 0.5)
    if tenths < 1000:
        return _TENTHS_OF_MS[tenths]
    return f"{seconds * 1000:.1f}ms"


def _s(seconds: float) -> str:
    """Seconds to a millisecond, as ``1.234s``."""
    ms = int(seconds * 1000 + 0.5)
    if ms < 10_000:
        return _SECONDS_3[ms]
    return f"{seconds:.3f}s"


def _attempt_target(attempt: AttemptResult) -> str:
    if attempt.backend == attempt.address:
        return attempt.address
    return f"{attempt.backend}/{attempt.address}"


def format_text(record: SessionRecord) -> str:
    # One f-string: this runs for every session, and the parts-and-join form it replaces
    # cost a list and seventeen strings more.
    failed = record.failed
    if not failed and not record.attempts_omitted:
        tried = "-"
    else:
        tried = ",".join(f"{_attempt_target(a)}/{a.outcome}/{_ms(a.elapsed)}" for a in failed)
        if record.attempts_omitted:
            tried += f",+{record.attempts_omitted}"
        tried = tried.lstrip(",") or "-"
    connect = "-" if record.connect_time is None else _ms(record.connect_time)
    held = "-" if record.held is None else _s(record.held)
    started = record.started
    whole = int(started)
    second = _SECONDS.get(whole) or _second_prefix(whole)
    return (
        f"{second}{_MILLIS[int((started - whole) * 1000)]} session={record.session}"
        f" client={record.client} via={record.via or '-'} listener={record.listener}"
        f" service={record.service} backend={record.backend or '-'}"
        f" backend_addr={record.backend_address or '-'} local={record.local_address or '-'}"
        f" transparent={1 if record.transparent else 0}"
        f" failed={tried} connect={connect} held={held}"
        f" from_client={record.from_client} from_backend={record.from_backend}"
        f" relay={_PLAIN[record.relay] if record.relay else '-'}"
        f" duration={_s(record.duration)} end={_PLAIN.get(record.end, record.end)}"
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
        "transparent": record.transparent,
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
    """Writes one line per session.

    The usual setup (one stream or file handler of ours, nothing else listening) gets
    the lines written directly: the logging module's record, filters and formatter
    would produce exactly these bytes at several times the cost. Where a ``defer``
    is given (the data plane's once-per-batch hook), lines are gathered and written
    together once the batch of events that ended their sessions has been handled:
    one write for many sessions. Any other setup (syslog, a handler added by an
    embedding program or a test) takes the logging path, line by line.
    """

    def __init__(self, log_format: str = "text") -> None:
        self._logger = logging.getLogger(ACCESS_LOGGER)
        self._lines: list[str] = []
        self._defer: Callable[[Callable[[], None]], None] | None = None
        # The handler lines were last found to go to directly, and the setup then.
        self._direct: logging.StreamHandler[TextIO] | None = None
        self.set_format(log_format)

    def set_format(self, log_format: str) -> None:
        self._format = format_json if log_format == "json" else format_text

    def batch_with(self, defer: Callable[[Callable[[], None]], None] | None) -> None:
        self.flush()
        self._defer = defer

    def _direct_handler(self) -> logging.StreamHandler[TextIO] | None:
        logger = self._logger
        handlers = logger.handlers
        if len(handlers) != 1 or logger.filters:
            return None
        handler = handlers[0]
        if (
            handler.__class__ in _DIRECT_HANDLERS
            and handler.formatter is _MESSAGE_ONLY
            and not handler.filters
            and handler.level <= logging.INFO
        ):
            direct = cast(logging.StreamHandler[TextIO], handler)
            if direct.stream is not None:
                return direct
        return None

    def emit(self, record: SessionRecord) -> None:
        logger = self._logger
        handlers = logger.handlers
        direct = self._direct
        # The usual case, checked cheaply: still the one handler found to be ours.
        if direct is None or len(handlers) != 1 or handlers[0] is not direct:
            direct = self._direct = self._direct_handler()
            if direct is None:
                if logger.isEnabledFor(logging.INFO) and not (
                    len(handlers) == 1 and type(handlers[0]) is logging.NullHandler
                ):
                    logger.info(self._format(record))
                return
        line = self._format(record)
        if self._defer is not None:
            lines = self._lines
            lines.append(line)
            if len(lines) == 1:
                self._defer(self.flush)
            return
        if not self._write(line, direct):
            logger.info(line)

    def flush(self) -> None:
        lines = self._lines
        if not lines:
            return
        self._lines = []
        handler = self._direct
        terminator = handler.terminator if handler is not None else "\n"
        if handler is None or not self._write(terminator.join(lines), handler):
            for line in lines:
                self._logger.info(line)

    def _write(self, text: str, handler: logging.StreamHandler[TextIO] | None = None) -> bool:
        handler = handler or self._direct_handler()
        if handler is None:
            return False
        handler.acquire()
        try:
            handler.stream.write(text + handler.terminator)
            handler.stream.flush()
            return True
        except Exception:
            # A failing stream: let the logging path report it its own way.
            return False
        finally:
            handler.release()


def _traceback(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    """The record's traceback (and stack, if asked for), or None.

    Cached on the record as logging's own formatter does, so several handlers format
    it once.
    """
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    parts = [part for part in (record.exc_text, record.stack_info) if part]
    return "\n".join(parts) if parts else None


class _JsonEventFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": format_timestamp(record.created),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        trace = _traceback(self, record)
        if trace is not None:
            document["exception"] = trace
        return json.dumps(document, separators=(",", ":"))


class _TextEventFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{format_timestamp(record.created)} {record.levelname.lower()} {record.getMessage()}"
        )
        trace = _traceback(self, record)
        if trace is None:
            return line
        # Indented, so a reader (or a log shipper's multi-line rule) can tell the lines
        # that belong to the event from the next event.
        return line + "".join(f"\n    {each}" for each in trace.splitlines())


# The admin endpoint's HTTP server (aiohttp) logs under this name and its children.
HTTP_SERVER_LOGGER = "aiohttp"
# Its records are passed on under this name, so the event handler and formatter of
# ``tcpfwd`` write them (JSON lines with log_format = "json").
HTTP_EVENT_LOGGER = "tcpfwd.http"
# At most this many lines of the HTTP server per window; the rest are counted.
HTTP_LOG_BURST = 10
HTTP_LOG_WINDOW = 10.0
# How much of a client's rejected request line or header makes it into the log.
HTTP_DETAIL_CHARS = 160


class _HttpServerLog(logging.Handler):
    """Passes aiohttp's records to the event log: one line each, at most a burst a window.

    A request its parser rejects (an over-long line, a bad request line, too many
    headers) is the client's doing and may come from anyone who reaches the port, before
    any token is checked: it becomes one warning naming the client and the reason,
    without aiohttp's traceback. Anything else (a fault of ours) keeps its traceback.
    """

    def __init__(self, burst: int = HTTP_LOG_BURST, window: float = HTTP_LOG_WINDOW) -> None:
        super().__init__()
        self._burst = burst
        self._window = window
        self._window_start = -window
        self._in_window = 0
        self._dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            now = time.monotonic()
            if now - self._window_start >= self._window:
                dropped, self._dropped = self._dropped, 0
                self._window_start, self._in_window = now, 0
                if dropped:
                    self._pass_on(
                        record,
                        logging.WARNING,
                        f"admin: {dropped} more messages of the HTTP server were not logged "
                        f"(at most {self._burst} every {self._window:g}s)",
                    )
            if self._in_window >= self._burst:
                self._dropped += 1
                return
            self._in_window += 1
            error = record.exc_info[1] if record.exc_info else None
            if _is_bad_request(error):
                args = record.args if isinstance(record.args, tuple) else ()
                client = _one_line(str(args[0])) if args else "a client"
                code = getattr(error, "code", 400)
                reason = _one_line(str(getattr(error, "message", "") or error))
                message = f"admin: bad request from {client} refused ({code}): {reason}"
                # A client's mistake, not ours: a warning at most (aiohttp says "error").
                self._pass_on(record, min(record.levelno, logging.WARNING), message)
            else:
                self._pass_on(
                    record, record.levelno, f"admin: {record.getMessage()}", record.exc_info
                )
        except Exception:
            self.handleError(record)

    @staticmethod
    def _pass_on(
        record: logging.LogRecord,
        level: int,
        message: str,
        exc_info: Any = None,
    ) -> None:
        target = logging.getLogger(HTTP_EVENT_LOGGER)
        if not target.isEnabledFor(level):
            return
        passed = target.makeRecord(
            target.name, level, record.pathname, record.lineno, message, (), exc_info
        )
        passed.created = record.created
        target.handle(passed)


def _is_bad_request(error: BaseException | None) -> bool:
    """Whether aiohttp refused the request as malformed (its HttpProcessingError)."""
    if error is None:
        return False
    # Looked up, not imported: aiohttp is loaded only when the admin endpoint is on.
    module = sys.modules.get("aiohttp.http_exceptions")
    kind = getattr(module, "HttpProcessingError", None) if module is not None else None
    return kind is not None and isinstance(error, kind)


def _one_line(text: str) -> str:
    """Client-supplied text made safe for one log line: whitespace runs collapsed,
    anything but printable ASCII escaped, and cut short."""
    flat = " ".join(text.split())
    safe = flat.encode("ascii", "backslashreplace").decode("ascii")
    safe = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in safe)
    if len(safe) > HTTP_DETAIL_CHARS:
        safe = safe[:HTTP_DETAIL_CHARS] + "..."
    return safe


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
    http = logging.getLogger(HTTP_SERVER_LOGGER)
    for old in list(http.handlers):
        http.removeHandler(old)
    http.addHandler(_HttpServerLog())
    http.propagate = False
    http.setLevel(level.upper())
