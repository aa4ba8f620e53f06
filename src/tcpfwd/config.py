"""Configuration: TOML files and quick-mode arguments become frozen, typed objects.

Every problem is collected with the key path where it was found
(``services.smtp.backends[1]``) so that one run of ``tcpfwd check`` reports them all.
Defaults live in the dataclass fields below and nowhere else.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from .patterns import Pattern, PatternError, compile_pattern
from .vocabulary import AcceptProxy, CheckKind, Policy, RelayMode

T = TypeVar("T")
_Word = TypeVar("_Word", bound=StrEnum)

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_TARGETS = ("stdout", "stderr", "syslog", "off")
SYSLOG_FACILITIES = (
    "daemon",
    "mail",
    "user",
    "local0",
    "local1",
    "local2",
    "local3",
    "local4",
    "local5",
    "local6",
    "local7",
)
# How bytes are moved: "splice" (Linux, zero-copy through a pipe), "copy" (portable), or


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """Every problem found in one configuration source."""

    def __init__(self, source: str, issues: Sequence[ConfigIssue]) -> None:
        self.source = source
        self.issues = tuple(issues)
        super().__init__(self.report())

    def report(self) -> str:
        return "\n".join(f"{self.source}: {issue}" for issue in self.issues)


class _Invalid(ValueError):
    """Raised by value parsers; the reader attaches the key path."""


# --- addresses ------------------------------------------------------------------------


class Address(NamedTuple):
    """A `HostPort` as configured: the host is a name, an IPv4 or IPv6 literal, or ""
    for every interface."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)


def format_hostport(host: str, port: int) -> str:
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host or '*'}:{port}"


# Every pattern here is used with fullmatch and re.ASCII: "$" would let a trailing newline
# through (splitting log lines), and "\d" would take any script's digits.
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?", re.ASCII)
_PORT = re.compile(r"[0-9]{1,5}", re.ASCII)
# An IPv6 zone: an interface name or index. Linux names are at most 15 bytes; anything
# beyond these characters could only serve to smuggle text into logs or pages.
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,32}", re.ASCII)


def parse_address(
    text: object, *, allow_any_host: bool = False, allow_port_zero: bool = False
) -> Address:
    """Parse ``host:port``, ``[v6]:port`` and, for listeners, ``*:port`` or ``:port``."""
    if not isinstance(text, str):
        raise _Invalid(f"expected a string like 'host:port', got {_kind(text)}")
    text = text.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text[close + 1 :].startswith(":"):
            raise _Invalid(f"{text!r} is not '[ipv6]:port'")
        host, port_text = text[1:close], text[close + 2 :]
        bare, percent, zone = host.partition("%")
        try:
            ipaddress.IPv6Address(bare)
        except ValueError:
            raise _Invalid(f"{host!r} in {text!r} is not an IPv6 address") from None
        if percent and not _ZONE.fullmatch(zone):
            raise _Invalid(
                f"zone {zone!r} in {text!r} is not an interface name or number "
                "(letters, digits, '_', '-', '.')"
            )
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise _Invalid(f"{text!r} has no port: write 'host:port'")
        if ":" in host:
            raise _Invalid(f"{text!r}: write IPv6 addresses in brackets, like '[::1]:25'")
        if host in ("", "*"):
            if not allow_any_host:
                raise _Invalid(f"{text!r} has no host")
            host = ""
        elif not _HOSTNAME.fullmatch(host):
            raise _Invalid(f"{host!r} in {text!r} is not a valid host name or address")
    if not _PORT.fullmatch(port_text):
        raise _Invalid(f"port {port_text!r} in {text!r} is not a number from 0 to 65535")
    port = int(port_text)
    lowest = 0 if allow_port_zero else 1
    if not lowest <= port <= 65535:
        raise _Invalid(f"port {port} in {text!r} is out of range {lowest}-65535")
    return Address(host, port)


# --- value parsers --------------------------------------------------------------------

_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(ms|s|m|h)?\s*", re.ASCII)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"\s*([0-9]{1,12})\s*([kmg]i?b?|b)?\s*", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}

# The longest duration any setting takes: 30 days. Longer is a slip of the unit, and
# some timers (the kernel's, the event loop's) cannot hold it.
MAX_DURATION = 30 * 86400.0
# The shortest timeout: below a millisecond no loopback handshake completes.
MIN_TIMEOUT = 0.001
# The shortest interval between active checks of one backend; shorter only burns CPU.
MIN_CHECK_INTERVAL = 0.1
# TCP keepalive times go to the kernel in whole seconds, at most 32767
# (MAX_TCP_KEEPIDLE and MAX_TCP_KEEPINTVL on Linux).
KEEPALIVE_MAX = 32767.0


def parse_duration(value: object) -> float:
    """Seconds from ``"1.5s"``, ``"300ms"``, ``"2m"``, ``"1h"`` or a bare number of seconds,
    from zero up to `MAX_DURATION`."""
    if isinstance(value, bool):
        raise _Invalid(f"expected a duration like '2s', got {_kind(value)}")
    if isinstance(value, int | float):
        # Compared before converting: an integer too large for a float would raise.
        if value > MAX_DURATION:
            raise _Invalid(f"{value!r} is longer than {_show_seconds(MAX_DURATION)}")
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if not match:
            raise _Invalid(f"{value!r} is not a duration: write e.g. '1.5s', '300ms', '2m'")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise _Invalid(f"expected a duration like '2s', got {_kind(value)}")
    if not math.isfinite(seconds) or seconds < 0:
        raise _Invalid(f"{value!r} is not a non-negative duration")
    if seconds > MAX_DURATION:
        raise _Invalid(f"{value!r} is longer than {_show_seconds(MAX_DURATION)}")
    return seconds


def _show_seconds(seconds: float) -> str:
    """A duration limit as the operator would write it."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 1:
        return f"{seconds:g}s"
    return f"{seconds * 1000:g}ms"


def _duration_between(low: float, high: float = MAX_DURATION) -> Callable[[object], float]:
    """A duration from ``low`` to ``high``; zero is reported as such."""

    def parse(value: object) -> float:
        seconds = parse_duration(value)
        if seconds <= 0:
            raise _Invalid(f"{value!r} must be longer than zero")
        if not low <= seconds <= high:
            raise _Invalid(
                f"{value!r} is out of range {_show_seconds(low)} to {_show_seconds(high)}"
            )
        return seconds

    return parse


_positive_duration = _duration_between(MIN_TIMEOUT)
# The kernel's own limits; a value it refuses would fail every session.
_keepalive_duration = _duration_between(1.0, KEEPALIVE_MAX)
_check_interval = _duration_between(MIN_CHECK_INTERVAL)


def _optional_duration(value: object) -> float | None:
    """A duration, where ``"off"``, ``false`` or zero switches the timer off."""
    if value is False or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
        return None
    seconds = parse_duration(value)
    if 0 < seconds < MIN_TIMEOUT:
        raise _Invalid(f"{value!r} is shorter than {_show_seconds(MIN_TIMEOUT)}")
    return seconds or None


def _size(value: object) -> int:
    if isinstance(value, bool):
        raise _Invalid(f"expected a size like '64KiB', got {_kind(value)}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if not match:
            raise _Invalid(f"{value!r} is not a size: write e.g. 65536, '64KiB', '1MiB'")
        unit = (match.group(2) or "").lower()[:1]
        size = int(match.group(1)) * _SIZE_UNITS[unit]
    else:
        raise _Invalid(f"expected a size like '64KiB', got {_kind(value)}")
    if size < 1024 or size > 64 * 1024**2:
        raise _Invalid(f"{value!r} must be between 1KiB and 64MiB")
    return size


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_kind(value)}")
    return value


def _int_between(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected a whole number, got {_kind(value)}")
        if not low <= value <= high:
            raise _Invalid(f"{value} is out of range {low}-{high}")
        return value

    return parse


def _choice(options: Sequence[str]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if not isinstance(value, str) or value not in options:
            raise _Invalid(f"{value!r} is not one of: {', '.join(options)}")
        return value

    return parse


def _word(words: type[_Word]) -> Callable[[object], _Word]:
    """A choice among the members of ``words`` (see `vocabulary`), read as one."""
    options = tuple(words)

    def parse(value: object) -> _Word:
        if not isinstance(value, str) or value not in options:
            raise _Invalid(f"{value!r} is not one of: {', '.join(options)}")
        return words(value)

    return parse


def _ip_address(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected an IP address, got {_kind(value)}")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _Invalid(f"{value!r} is not an IP address") from None


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _optional_count(value: object) -> int | None:
    """A positive limit, where ``"off"``, ``false`` or zero mean none."""
    if value is False or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
        return None
    count = _int_between(0, 10_000_000)(value)
    return count or None


MAX_WORKERS = 256


def _workers(value: object) -> int:
    """A process count, or ``"auto"``: one per CPU this process may run on."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise _Invalid(f'expected "auto" or a whole number from 1 to {MAX_WORKERS}')
    return value


def _hedge_delay(value: object) -> float | None:
    """``"auto"`` (None: from the backend's own answer times) or a duration."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    seconds = parse_duration(value)
    if seconds < MIN_TIMEOUT:
        raise _Invalid(f"{value!r} is shorter than {_show_seconds(MIN_TIMEOUT)}; write 'auto'")
    return seconds


def _reserve(value: object) -> int | None:
    """Places kept for a service: ``"auto"`` (None) or a count (0: none)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    return _int_between(0, 10_000_000)(value)


# New connections a second per listener: far beyond what one process accepts.
MAX_RATE = 1_000_000


def _optional_rate(value: object) -> float | None:
    """Connections per second; ``"off"`` or zero mean no limit."""
    if value is False or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"expected connections per second, got {_kind(value)}")
    # Compared before converting: an integer too large for a float would raise.
    if value < 0 or value > MAX_RATE or (isinstance(value, float) and not math.isfinite(value)):
        raise _Invalid(f"{value} is not a rate from 0 to {MAX_RATE}")
    return float(value) or None


def _log_target(value: object) -> str:
    """``stdout``, ``stderr``, ``syslog``, ``off``, or an absolute file path."""
    if not isinstance(value, str) or not value:
        raise _Invalid(
            f"expected 'stdout', 'stderr', 'syslog', 'off' or a path, got {_kind(value)}"
        )
    if value in LOG_TARGETS or (value.startswith("/") and value.isprintable()):
        return value
    raise _Invalid(f"{value!r}: write 'stdout', 'stderr', 'syslog', 'off' or an absolute path")


def _absolute_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or not value.isprintable():
        raise _Invalid(f"expected an absolute path, got {value!r}")
    return value


def _identifier(value: object) -> str:
    if not isinstance(value, str) or not value.isprintable() or any(c.isspace() for c in value):
        raise _Invalid(f"expected a user or group name or number, got {value!r}")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"expected a non-empty string, got {_kind(value)}")
    return value


def _regex(value: object) -> str:
    """A pattern the linear-time engine compiles (no backreferences, no look-around)."""
    text = _text(value)
    try:
        compile_pattern(text)
    except PatternError as error:
        raise _Invalid(f"{text!r} is not a valid regular expression (RE2): {error}") from None
    return text


def _ehlo_name(value: object) -> str:
    text = _text(value)
    if not _HOSTNAME.fullmatch(text):
        raise _Invalid(f"{text!r} is not a host name")
    return text


def _network(value: object) -> IPNetwork:
    """A CIDR (``10.0.0.0/8``, ``::1/128``) or a single address (a /32 or /128)."""
    if not isinstance(value, str):
        raise _Invalid(f"expected an address or CIDR like '10.0.0.0/8', got {_kind(value)}")
    try:
        return ipaddress.ip_network(value.strip())
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise _Invalid(f"{value!r} is not an IP address or CIDR") from None
    # Host bits set usually means a mistyped prefix; trusting a wider range than meant
    # is the wrong way to fail, so say what it would mean instead of guessing.
    raise _Invalid(f"{value!r} has host bits set: write {str(network)!r} if that is meant")


def _networks(value: object) -> tuple[IPNetwork, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _Invalid(f"expected a list of CIDRs, got {_kind(value)}")
    networks: list[IPNetwork] = []
    problems: list[str] = []
    for item in items:
        try:
            networks.append(_network(item))
        except _Invalid as error:
            problems.append(str(error))
    if problems:
        raise _Invalid("; ".join(problems))
    return tuple(networks)


def _accept_proxy(value: object) -> AcceptProxy:
    if value is True:
        return AcceptProxy.REQUIRED
    if value is False:
        return AcceptProxy.OFF
    if value == AcceptProxy.OPTIONAL:
        return AcceptProxy.OPTIONAL
    raise _Invalid(f"expected true, false or 'optional', got {value!r}")


def _kind(value: object) -> str:
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    names |= {list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


# --- the configuration objects --------------------------------------------------------


SEND_PROXY_VERSIONS = {"v1": 1, "v2": 2}


@dataclass(frozen=True, slots=True)
class SendProxySettings:
    """``send_proxy``: a PROXY header goes to the backend before any byte of the client."""

    version: int
    # v2 only: the session id as a UNIQUE_ID TLV, and a CRC32C TLV over the header.
    unique_id: bool = False
    crc32c: bool = False


# Greeting presets for server-speaks-first protocols: the first line a ready server sends.
GREETING_PRESETS = {
    "smtp": "^220[ -]",
    "ftp": "^220[ -]",
    "pop3": r"^\+OK",
    "imap": r"^\* (OK|PREAUTH)",
}


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """Passive marks and active checks of one backend (``health = {...}``)."""

    # Count the outcome of real client connections (refused, timeout, bad greeting).
    passive: bool = True
    fall: int = 1
    rise: int = 2
    # The active check: none means only a recovery probe while the backend is down.
    check: CheckKind = CheckKind.NONE
    interval: float = 2.0
    timeout: float = 2.0
    send: str | None = None
    expect: str | None = None
    ehlo: str = "localhost"

    @property
    def tracked(self) -> bool:
        """Whether health is kept at all (otherwise the backend is always up)."""
        return self.passive or self.check != CheckKind.NONE

    @property
    def expect_pattern(self) -> Pattern | None:
        """``expect`` compiled for the linear-time engine (validated when read)."""
        return compile_pattern(self.expect) if self.expect else None


@dataclass(frozen=True, slots=True)
class GreetingSettings:
    """Wait for the backend's first line and require it to match before relaying."""

    expect: str
    timeout: float = 5.0
    # The preset it came from ("smtp", ...), if any: the recovery probe speaks it.
    preset: str | None = None

    @property
    def pattern(self) -> Pattern:
        """``expect`` compiled for the linear-time engine (validated when read)."""
        return compile_pattern(self.expect)


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str
    address: Address
    # Tiers are tried in ascending order; the policy orders backends within a tier.
    tier: int = 0
    weight: int = 1
    max_connections: int | None = None
    health: HealthSettings = field(default_factory=HealthSettings)
    # The service's send_proxy unless the backend's table sets its own (or "off").
    send_proxy: SendProxySettings | None = None
    # Connect from the client's address (IP_TRANSPARENT); the service's unless set here.
    transparent: bool = False


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """What a service can set for itself, or inherit from ``[defaults]``."""

    connect_timeout: float = 2.0
    # Bounds the whole failover sequence for one client; None: only per-attempt timeouts.
    failover_timeout: float | None = 30.0
    idle_timeout: float | None = None
    keepalive: bool = True
    keepalive_idle: float = 60.0
    keepalive_interval: float = 10.0
    keepalive_count: int = 6
    nodelay: bool = True
    # Per direction: how much may wait in user space before the other side is paused.
    buffer_size: int = 256 * 1024
    relay: RelayMode = RelayMode.AUTO
    source_address: str | None = None
    backlog: int = 511
    # Access control on the client's address: deny wins; a non-empty allow list admits
    # only what it names.
    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    # Limits; None means none. Excess connections are closed at once.
    max_connections: int | None = None
    max_connections_per_client: int | None = None
    # New connections per second per listener; excess ones wait in the listen queue.
    accept_rate: float | None = None
    # Session places kept for this service that other services cannot take; None:
    # "auto", half of the daemon's capacity split evenly among its services.
    reserved_connections: int | None = None
    policy: Policy = Policy.FAILOVER
    health: HealthSettings = field(default_factory=HealthSettings)
    greeting: GreetingSettings | None = None
    # Keep a client open while no backend can be reached, retrying; None: close at once.
    hold_timeout: float | None = None
    # Hedged attempts: an attempt with no answer after the hedge delay has the next
    # backend tried beside it. ``hedge_delay`` None: "auto", from the backend's own
    # recent answer times.
    hedge: bool = True
    hedge_delay: float | None = None
    # How long a resolved backend name is reused; 0 resolves on every attempt.
    dns_ttl: float = 30.0
    # PROXY protocol out: a header to every backend (a backend may override it).
    send_proxy: SendProxySettings | None = None
    # PROXY protocol in: only peers in trusted_sources may connect; their header's
    # source address then stands for the client everywhere.
    accept_proxy: AcceptProxy = AcceptProxy.OFF
    trusted_sources: tuple[IPNetwork, ...] = ()
    # How long a client may take to send its whole header.
    proxy_header_timeout: float = 3.0
    # Connect to backends from the client's address (needs CAP_NET_ADMIN); health
    # checks still use tcpfwd's own (source_address, if set).
    transparent: bool = False


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    listen: tuple[Address, ...]
    backends: tuple[BackendConfig, ...]
    settings: ServiceSettings = field(default_factory=ServiceSettings)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin HTTP endpoint: off unless ``listen`` is set."""

    listen: Address | None = None
    # Bearer token required by every admin path except /healthz and /readyz.
    token: str | None = None
    # Host names (and IPs) the endpoint answers to besides its own address, e.g. the name
    # of a reverse proxy in front of it; any other Host header is refused (DNS rebinding).
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    services: tuple[ServiceConfig, ...]
    admin: AdminConfig = field(default_factory=AdminConfig)
    grace_period: float = 30.0
    log_format: str = "text"
    log_level: str = "info"
    access_log: str = "stdout"
    event_log: str = "stderr"
    syslog_facility: str = "daemon"
    syslog_address: str = "/dev/log"
    # All services together; None: as many as the descriptor limit allows.
    max_connections: int | None = None
    # Dropped to after the listening sockets are bound, when started as root.
    user: str | None = None
    group: str | None = None
    # Where the daemon writes its pid (for `tcpfwd reload` and init scripts).
    pid_file: str | None = None
    # Processes serving the listeners (SO_REUSEPORT); 1 is a single process, no supervisor.
    workers: int = 1
    # With workers: a socket (and accept queue) per worker with SO_REUSEPORT, or False:
    # one socket per address that every worker accepts from.
    reuse_port: bool = True
    source: str = "<defaults>"


# Parsers for the service settings, by key; the dataclass above holds the defaults.
_SETTING_PARSERS: dict[str, Callable[[object], Any]] = {
    "connect_timeout": _positive_duration,
    "failover_timeout": _optional_duration,
    "idle_timeout": _optional_duration,
    "keepalive": _boolean,
    "keepalive_idle": _keepalive_duration,
    "keepalive_interval": _keepalive_duration,
    "keepalive_count": _int_between(1, 127),
    "nodelay": _boolean,
    "buffer_size": _size,
    "relay": _word(RelayMode),
    "source_address": _ip_address,
    "backlog": _int_between(1, 65535),
    "allow": _networks,
    "deny": _networks,
    "max_connections": _optional_count,
    "max_connections_per_client": _optional_count,
    "accept_rate": _optional_rate,
    "reserved_connections": _reserve,
    "policy": _word(Policy),
    "hold_timeout": _optional_duration,
    "hedge": _boolean,
    "hedge_delay": _hedge_delay,
    "dns_ttl": parse_duration,
    "accept_proxy": _accept_proxy,
    "trusted_sources": _networks,
    "proxy_header_timeout": _positive_duration,
    "transparent": _boolean,
}
# Settings that are tables (or a word standing for one), read by functions of their own.
_TABLE_SETTINGS = ("health", "greeting", "send_proxy")
assert set(_SETTING_PARSERS) | set(_TABLE_SETTINGS) == {f.name for f in fields(ServiceSettings)}

_HEALTH_PARSERS: dict[str, Callable[[object], Any]] = {
    "passive": _boolean,
    "fall": _int_between(1, 100),
    "rise": _int_between(1, 100),
    "check": _word(CheckKind),
    "interval": _check_interval,
    "timeout": _positive_duration,
    "send": _text,
    "expect": _regex,
    "ehlo": _ehlo_name,
}
assert set(_HEALTH_PARSERS) == {f.name for f in fields(HealthSettings)}

_GLOBAL_PARSERS: dict[str, Callable[[object], Any]] = {
    "grace_period": parse_duration,
    "log_format": _choice(LOG_FORMATS),
    "log_level": _choice(LOG_LEVELS),
    "access_log": _log_target,
    "event_log": _log_target,
    "syslog_facility": _choice(SYSLOG_FACILITIES),
    "syslog_address": _absolute_path,
    "max_connections": _optional_count,
    "user": _identifier,
    "group": _identifier,
    "pid_file": _absolute_path,
    "workers": _workers,
    "reuse_port": _boolean,
}

_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)


_BARE_KEY = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)


def _show_key(key: str) -> str:
    """A key as it goes into a key path: quoted and escaped unless it is a plain word, so a
    key holding a newline or a quote cannot split or forge a line of the report."""
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


class _Table:
    """Reads one TOML table, recording every problem under its key path."""

    def __init__(self, raw: Mapping[str, object], path: str, issues: list[ConfigIssue]) -> None:
        self.raw = raw
        self.path = path
        self.issues = issues
        self._seen: set[str] = set()

    def key_path(self, key: str) -> str:
        shown = _show_key(key)
        return f"{self.path}.{shown}" if self.path else shown

    def has(self, key: str) -> bool:
        self._seen.add(key)
        return key in self.raw

    def take(self, key: str, parse: Callable[[object], T], default: T) -> T:
        if not self.has(key):
            return default
        return self.parse_at(self.key_path(key), self.raw[key], parse, default)

    def parse_at(self, path: str, value: object, parse: Callable[[object], T], default: T) -> T:
        try:
            return parse(value)
        except _Invalid as error:
            self.issues.append(ConfigIssue(path, str(error)))
            return default

    def subtable(self, key: str) -> _Table | None:
        if not self.has(key):
            return None
        value = self.raw[key]
        if not isinstance(value, dict):
            self.issues.append(
                ConfigIssue(self.key_path(key), f"expected a table, got {_kind(value)}")
            )
            return None
        return _Table(value, self.key_path(key), self.issues)

    def reject_unknown(self) -> None:
        for key in self.raw:
            if key not in self._seen:
                self.issues.append(ConfigIssue(self.key_path(key), "unknown key"))


def _default(cls: type, name: str) -> Any:
    """A dataclass field's default (slots dataclasses have no class attribute for it)."""
    return next(f.default for f in fields(cls) if f.name == name)


def _read_settings(table: _Table | None, base: ServiceSettings) -> ServiceSettings:
    if table is None:
        return base
    changes = {
        key: table.take(key, parse, getattr(base, key)) for key, parse in _SETTING_PARSERS.items()
    }
    changes["health"] = _read_health(table, base.health)
    changes["greeting"] = _read_greeting(table, base.greeting)
    changes["send_proxy"] = _read_send_proxy(table, base.send_proxy)
    return replace(base, **changes)


def _read_health(parent: _Table, base: HealthSettings) -> HealthSettings:
    """``health = {...}``: each key given overrides the inherited one."""
    table = parent.subtable("health")
    if table is None:
        return base
    changes = {
        key: table.take(key, parse, getattr(base, key))
        for key, parse in _HEALTH_PARSERS.items()
        if table.has(key)
    }
    table.reject_unknown()
    health = replace(base, **changes)
    # Reported where the check kind is set, not again at every level that inherits it.
    missing_expect = health.expect is None and "expect" not in table.raw
    if "check" in changes and health.check == CheckKind.SEND and missing_expect:
        table.issues.append(
            ConfigIssue(table.key_path("check"), "check = 'send' needs 'expect' (a regex)")
        )
    for key in ("send", "expect"):
        if key in changes and health.check != CheckKind.SEND:
            table.issues.append(ConfigIssue(table.key_path(key), "only used with check = 'send'"))
    return health


def _read_greeting(parent: _Table, base: GreetingSettings | None) -> GreetingSettings | None:
    """``greeting = "smtp"`` (a preset), ``"off"``, ``{ expect = "^220", timeout = "5s" }``
    or ``{ preset = "smtp", timeout = "10s" }``."""
    if not parent.has("greeting"):
        return base
    path = parent.key_path("greeting")
    value = parent.raw["greeting"]
    if value is False or value == "off":
        return None
    if isinstance(value, str):
        if value not in GREETING_PRESETS:
            parent.issues.append(
                ConfigIssue(
                    path,
                    f"{value!r} is not a preset ({', '.join(GREETING_PRESETS)}) or 'off'; "
                    "write { expect = 'regex' } for others",
                )
            )
            return base
        return GreetingSettings(GREETING_PRESETS[value], preset=value)
    table = parent.subtable("greeting")
    if table is None:
        return base
    preset = table.take("preset", _choice(tuple(GREETING_PRESETS)), None)
    if table.has("expect") == table.has("preset"):
        table.issues.append(ConfigIssue(path, "needs either 'expect' (a regex) or 'preset'"))
    expect = table.take("expect", _regex, GREETING_PRESETS.get(preset or "", ""))
    timeout = table.take("timeout", _positive_duration, _default(GreetingSettings, "timeout"))
    table.reject_unknown()
    return GreetingSettings(expect, timeout, preset) if expect else base


def _read_send_proxy(parent: _Table, base: SendProxySettings | None) -> SendProxySettings | None:
    """``send_proxy = "v1" | "v2" | "off"`` or ``{ version = "v2", unique_id = true, ... }``."""
    if not parent.has("send_proxy"):
        return base
    path = parent.key_path("send_proxy")
    value = parent.raw["send_proxy"]
    if value is False or value == "off":
        return None
    if isinstance(value, str):
        if value not in SEND_PROXY_VERSIONS:
            parent.issues.append(
                ConfigIssue(path, f"{value!r} is not one of: v1, v2, off (or a table)")
            )
            return base
        return SendProxySettings(SEND_PROXY_VERSIONS[value])
    table = parent.subtable("send_proxy")
    if table is None:
        return base
    if not table.has("version"):
        table.issues.append(ConfigIssue(path, "missing key 'version' ('v1' or 'v2')"))
    version = table.take("version", _choice(tuple(SEND_PROXY_VERSIONS)), "")
    tlvs = {key: table.take(key, _boolean, False) for key in ("unique_id", "crc32c")}
    table.reject_unknown()
    if version == "v1":
        for key, wanted in tlvs.items():
            if wanted:
                table.issues.append(ConfigIssue(table.key_path(key), "TLVs need version = 'v2'"))
    if not version:
        return base
    return SendProxySettings(SEND_PROXY_VERSIONS[version], **tlvs)


def _read_backend(
    table: _Table,
    path: str,
    value: object,
    health: HealthSettings,
    send_proxy: SendProxySettings | None,
    *,
    transparent: bool = False,
) -> BackendConfig | None:
    if isinstance(value, str):
        address = table.parse_at(path, value, parse_address, None)
        if address is None:
            return None
        return BackendConfig(
            str(address), address, health=health, send_proxy=send_proxy, transparent=transparent
        )
    if not isinstance(value, dict):
        table.issues.append(
            ConfigIssue(path, f"expected 'host:port' or a table, got {_kind(value)}")
        )
        return None
    entry = _Table(value, path, table.issues)
    if not entry.has("address"):
        table.issues.append(ConfigIssue(path, "missing key 'address'"))
        entry.reject_unknown()
        return None
    address = entry.take("address", parse_address, None)
    name = entry.take("name", _name, str(address) if address else "")
    tier = entry.take("tier", _int_between(-1000, 1000), _default(BackendConfig, "tier"))
    weight = entry.take("weight", _int_between(0, 1000), _default(BackendConfig, "weight"))
    max_connections = entry.take("max_connections", _int_between(1, 10_000_000), None)
    backend_health = _read_health(entry, health)
    backend_send_proxy = _read_send_proxy(entry, send_proxy)
    backend_transparent = entry.take("transparent", _boolean, transparent)
    entry.reject_unknown()
    if address is None:
        return None
    return BackendConfig(
        name,
        address,
        tier,
        weight,
        max_connections,
        backend_health,
        backend_send_proxy,
        backend_transparent,
    )


def _name(value: object) -> str:
    if not isinstance(value, str) or not _SERVICE_NAME.fullmatch(value):
        raise _Invalid(
            f"{value!r} is not a valid name (letters, digits, '_', '-', '.'; at most 64)"
        )
    return value


def _read_list(table: _Table, key: str) -> list[object]:
    if not table.has(key):
        table.issues.append(ConfigIssue(table.key_path(key), "missing (at least one is needed)"))
        return []
    value = table.raw[key]
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        table.issues.append(ConfigIssue(table.key_path(key), "expected a non-empty list"))
        return []
    return value


def _read_service(name: str, table: _Table, defaults: ServiceSettings) -> ServiceConfig | None:
    if not _SERVICE_NAME.fullmatch(name):
        table.issues.append(
            ConfigIssue(table.path, "service names use letters, digits, '_-.' (at most 64)")
        )
    listen_path = table.key_path("listen")
    listen: list[Address] = []
    raw_listen = _read_list(table, "listen")
    for i, value in enumerate(raw_listen):
        path = f"{listen_path}[{i}]" if len(raw_listen) > 1 else listen_path
        parsed = table.parse_at(path, value, _listen_address, None)
        if parsed is None:
            continue
        if parsed in listen:
            table.issues.append(ConfigIssue(path, f"{parsed} is listed twice"))
        listen.append(parsed)
    # Settings first: backends inherit the service's health and send_proxy settings and
    # may override them.
    settings = _read_settings(table, defaults)
    _check_accept_proxy(table, settings)
    backends: list[BackendConfig] = []
    raw_backends = _read_list(table, "backends")
    for i, value in enumerate(raw_backends):
        path = f"{table.key_path('backends')}[{i}]"
        backend = _read_backend(
            table,
            path,
            value,
            settings.health,
            settings.send_proxy,
            transparent=settings.transparent,
        )
        if backend is None:
            continue
        if any(b.name == backend.name for b in backends):
            table.issues.append(ConfigIssue(path, f"backend name {backend.name!r} is used twice"))
        backends.append(backend)
    table.reject_unknown()
    if not listen or len(backends) != len(raw_backends) or not backends:
        return None
    return ServiceConfig(name, tuple(listen), tuple(backends), settings)


def _check_accept_proxy(table: _Table, settings: ServiceSettings) -> None:
    """No implicit trust: a service that accepts PROXY headers names who may send them."""
    path = table.key_path("trusted_sources")
    if any(issue.path == path for issue in table.issues):
        return
    if settings.accept_proxy != AcceptProxy.OFF and not settings.trusted_sources:
        table.issues.append(
            ConfigIssue(
                path,
                "required when accept_proxy is on: list the addresses (CIDRs) allowed to "
                "send a PROXY header; nothing is trusted implicitly",
            )
        )


def _listen_address(value: object) -> Address:
    return parse_address(value, allow_any_host=True, allow_port_zero=True)


def parse_config(data: Mapping[str, object], source: str) -> Config:
    """Validate a decoded TOML document; raise ConfigError listing every problem."""
    issues: list[ConfigIssue] = []
    root = _Table(data, "", issues)
    globals_table = root.subtable("global")
    global_values: dict[str, Any] = {}
    if globals_table is not None:
        for key, parse in _GLOBAL_PARSERS.items():
            if globals_table.has(key):
                global_values[key] = globals_table.take(key, parse, None)
        globals_table.reject_unknown()
    admin = _read_admin(root.subtable("admin"))
    defaults_table = root.subtable("defaults")
    defaults = _read_settings(defaults_table, ServiceSettings())
    if defaults_table is not None:
        defaults_table.reject_unknown()
    services: list[ServiceConfig] = []
    services_table = root.subtable("services")
    if services_table is None:
        if not root.has("services"):
            issues.append(ConfigIssue("services", "no service is defined"))
    else:
        for name in services_table.raw:
            service_table = services_table.subtable(name)
            if service_table is None:
                continue
            service = _read_service(name, service_table, defaults)
            if service is not None:
                services.append(service)
        if not services_table.raw:
            issues.append(ConfigIssue("services", "no service is defined"))
    root.reject_unknown()
    issues += listen_overlaps(services, admin)
    issues += self_loops(services)
    if issues:
        raise ConfigError(source, issues)
    return Config(
        services=tuple(services),
        admin=admin,
        source=source,
        **{k: v for k, v in global_values.items() if v is not None},
    )


def _read_admin(table: _Table | None) -> AdminConfig:
    if table is None:
        return AdminConfig()
    listen = table.take("listen", _listen_address, None)
    token = table.take("token", _token, None)
    if table.has("token_file"):
        path = table.key_path("token_file")
        if token is not None:
            table.issues.append(ConfigIssue(path, "set token or token_file, not both"))
        token = table.parse_at(path, table.raw["token_file"], _token_from_file, None)
    if token is not None and listen is None:
        table.issues.append(ConfigIssue(table.key_path("listen"), "needed when a token is set"))
    hosts: tuple[str, ...] = table.take("hosts", _host_names, ())
    table.reject_unknown()
    return AdminConfig(listen=listen, token=token, hosts=hosts)


def _host_names(value: object) -> tuple[str, ...]:
    """Names or IP addresses, as a Host header carries them (without the port)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _Invalid(f"expected a list of host names, got {_kind(value)}")
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise _Invalid(f"expected a host name, got {_kind(item)}")
        name = item.strip().lower()
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        try:
            name = str(ipaddress.ip_address(name))
        except ValueError:
            if not _HOSTNAME.fullmatch(name):
                raise _Invalid(f"{item!r} is not a host name or IP address") from None
        names.append(name)
    return tuple(names)


def _token(value: object) -> str:
    if not isinstance(value, str) or len(value) < 16 or any(c.isspace() for c in value):
        raise _Invalid("expected a token of at least 16 characters without spaces")
    return value


def _token_from_file(value: object) -> str:
    path = _absolute_path(value)
    try:
        with open(path, encoding="utf-8") as stream:
            return _token(stream.read().strip())
    except OSError as error:
        raise _Invalid(f"cannot read {path}: {error.strerror}") from None


# --- addresses tcpfwd serves itself: overlapping listeners, backends that loop back -----

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# The IP addresses of a host name, or None where they are not known. The checks below
# run with literals only (here, pure) and again with names resolved (localcheck.py).
Resolve = Callable[[str], "Sequence[str] | None"]


def _no_names(host: str) -> Sequence[str] | None:
    return None


def host_ips(host: str, resolve: Resolve = _no_names) -> tuple[IPAddress, ...] | None:
    """What ``host`` stands for: "" (every interface) is 0.0.0.0 and ::, a literal is
    itself, a name is what ``resolve`` says (None: not known)."""
    if not host:
        return (ipaddress.IPv4Address("0.0.0.0"), ipaddress.IPv6Address("::"))
    try:
        return (_plain(ipaddress.ip_address(host)),)
    except ValueError:
        pass
    found = resolve(host)
    if found is None:
        return None
    ips: list[IPAddress] = []
    for text in found:
        try:
            ip = _plain(ipaddress.ip_address(text))
        except ValueError:
            continue
        if ip not in ips:
            ips.append(ip)
    return tuple(ips)


def _plain(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address reaches the IPv4 socket: compare it as IPv4."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def always_local(ip: IPAddress) -> bool:
    """Addresses that are this machine's on every machine: loopback and "any"."""
    return ip.is_loopback or ip.is_unspecified


@dataclass(frozen=True, slots=True)
class _Listening:
    path: str
    owner: str
    service: str | None
    address: Address
    ips: tuple[IPAddress, ...]


def _listening(
    services: Sequence[ServiceConfig], admin: AdminConfig | None, resolve: Resolve
) -> list[_Listening]:
    """Every listen address with a fixed port, the admin endpoint's last."""
    entries: list[_Listening] = []
    for service in services:
        for i, address in enumerate(service.listen):
            ips = host_ips(address.host, resolve)
            if address.port and ips:
                path = f"services.{_show_key(service.name)}.listen[{i}]"
                entries.append(
                    _Listening(path, f"service {service.name!r}", service.name, address, ips)
                )
    if admin is not None and admin.listen is not None and admin.listen.port:
        ips = host_ips(admin.listen.host, resolve)
        if ips:
            entries.append(
                _Listening("admin.listen", "the admin endpoint", None, admin.listen, ips)
            )
    return entries


def _shared(first: tuple[IPAddress, ...], second: tuple[IPAddress, ...]) -> str | None:
    """Where two sets of bound addresses collide on one port, in words; None if nowhere.

    Each family is bound apart (IPv6 sockets are IPv6-only), and an "any" address takes
    the port on every address of its family.
    """
    for a in first:
        for b in second:
            if a.version != b.version:
                continue
            if a.is_unspecified or b.is_unspecified:
                return f"every IPv{a.version} address"
            if a == b:
                return str(a)
    return None


def listen_overlaps(
    services: Sequence[ServiceConfig], admin: AdminConfig | None, resolve: Resolve = _no_names
) -> list[ConfigIssue]:
    """Listen addresses (the admin endpoint's included) that cannot all be bound.

    Reported once, at the later of two; one address listed twice by one service is
    reported where the service is read.
    """
    issues: list[ConfigIssue] = []
    entries = _listening(services, admin, resolve)
    for j, later in enumerate(entries):
        for earlier in entries[:j]:
            if earlier.address.port != later.address.port:
                continue
            same_service = earlier.service is not None and earlier.service == later.service
            if earlier.address == later.address:
                if same_service:
                    continue
                message = f"{later.address} is already used by {earlier.owner}"
            else:
                where = _shared(earlier.ips, later.ips)
                if where is None:
                    continue
                message = (
                    f"{later.address} overlaps {earlier.address} of {earlier.owner} "
                    f"({earlier.path}): both take port {later.address.port} on {where}"
                )
            issues.append(ConfigIssue(later.path, message))
            break
    return issues


def self_loops(
    services: Sequence[ServiceConfig],
    resolve: Resolve = _no_names,
    is_local: Callable[[IPAddress], bool] = always_local,
) -> list[ConfigIssue]:
    """Backends that are one of tcpfwd's own listen addresses.

    A connection to such a backend arrives back at tcpfwd, which dials it again, and
    again, until every session place is taken. ``is_local`` says whether an address is
    this machine's, which a wildcard listen address serves.
    """
    issues: list[ConfigIssue] = []
    listening = _listening(services, None, resolve)
    for service in services:
        for i, backend in enumerate(service.backends):
            ips = host_ips(backend.address.host, resolve) or ()
            found = _loop_through(backend.address, ips, listening, is_local)
            if found is not None:
                path = f"services.{_show_key(service.name)}.backends[{i}]"
                issues.append(ConfigIssue(path, found))
    return issues


def _loop_through(
    address: Address,
    ips: tuple[IPAddress, ...],
    listening: Sequence[_Listening],
    is_local: Callable[[IPAddress], bool],
) -> str | None:
    """Why connecting to ``address`` comes back to one of tcpfwd's listeners, or None."""
    named = host_ips(address.host) is None
    for ip in ips:
        # Connecting to "any" reaches this machine: the loopback address of its family.
        if ip.is_unspecified:
            target: IPAddress = (
                ipaddress.IPv4Address("127.0.0.1")
                if ip.version == 4
                else ipaddress.IPv6Address("::1")
            )
        else:
            target = ip
        for entry in listening:
            if entry.address.port != address.port:
                continue
            for bound in entry.ips:
                if bound.version != target.version:
                    continue
                if bound == target or (bound.is_unspecified and is_local(target)):
                    what = f"{address} resolves to {ip}, which is" if named else f"{address} is"
                    if bound.is_unspecified:
                        what += f" a local address, and {entry.address} ({entry.path}) serves"
                        what += " every local address"
                    else:
                        what += f" tcpfwd's own listen address {entry.address} ({entry.path})"
                    return f"{what}: a connection to it would come back into tcpfwd and loop"
    return None


# A configuration is a few kilobytes; reading an arbitrary file whole (a device, a log
# given by mistake) would only fail later and slower.
MAX_CONFIG_BYTES = 4 << 20


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML file; raise ConfigError naming the file and every problem."""
    source = str(path)
    try:
        with open(path, "rb") as stream:
            raw = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(source, [ConfigIssue("", f"cannot read: {error.strerror}")]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(source, [ConfigIssue("", f"larger than {MAX_CONFIG_BYTES} bytes")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            source, [ConfigIssue("", f"not UTF-8: byte {error.start + 1} (line {line})")]
        ) from None
    try:
        return parse_config(tomllib.loads(text), source)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(source, [ConfigIssue("", f"not valid TOML: {error}")]) from None
    except RecursionError:
        # From the TOML reader, or from describing a value nested hundreds deep.
        raise ConfigError(
            source, [ConfigIssue("", "arrays or tables are nested too deeply")]
        ) from None


def quick_config(
    listen: str,
    backends: Sequence[str],
    *,
    settings: Mapping[str, object] | None = None,
    global_settings: Mapping[str, object] | None = None,
) -> Config:
    """The config of ``tcpfwd LISTEN BACKEND...``: one service named ``default``."""
    service: dict[str, object] = {"listen": [listen], "backends": list(backends)}
    service.update(settings or {})
    document: dict[str, object] = {"services": {"default": service}}
    if global_settings:
        document["global"] = dict(global_settings)
    try:
        return parse_config(document, "command line")
    except ConfigError as error:
        raise as_command_line_error(error) from None


def as_command_line_error(error: ConfigError) -> ConfigError:
    """The errors of a quick-mode config, each naming the argument it came from."""
    return ConfigError(error.source, [_as_argument(issue) for issue in error.issues])


def _as_argument(issue: ConfigIssue) -> ConfigIssue:
    """Name the command-line argument behind a quick-mode config path."""
    path = issue.path
    for prefix in ("services.default.", "global."):
        if path.startswith(prefix):
            path = path[len(prefix) :]
            break
    if path.startswith("backends["):
        index = int(path[len("backends[") : path.index("]")])
        return ConfigIssue(f"backend {index + 1}", issue.message)
    if path == "listen" or path.startswith("listen["):
        return ConfigIssue("LISTEN", issue.message)
    if path == "trusted_sources":
        return ConfigIssue("--trusted-source", issue.message)
    return ConfigIssue("--" + path.replace("_", "-"), issue.message)
