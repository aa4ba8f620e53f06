"""The words tcpfwd uses for its choices and outcomes: one set of each, in one place.

The configuration reads them, the access log and the status document write them, the
metrics use them as label values and the tests assert against them. Each set is a
``StrEnum``: a member is the very string that is written (``f"{End.NO_BACKEND}"`` is
``no_backend``) and compares equal to that string read back, so a word can neither be
misspelt in one place nor drift between two.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Final, TypeAlias

__all__ = [
    "ADMIN_ACTIONS",
    "AcceptProxy",
    "AdminState",
    "CheckKind",
    "End",
    "EndWord",
    "HostPort",
    "Outcome",
    "Policy",
    "Reject",
    "RelayMode",
]

#: A host (an IP address as the kernel writes it, or a name) and a port.
HostPort: TypeAlias = tuple[str, int]


class End(StrEnum):
    """Why a session ended: the access line's last word and the ``end`` label."""

    # In relay; the first cause wins.
    CLIENT_CLOSED = "client_closed"
    BACKEND_CLOSED = "backend_closed"
    CLIENT_RESET = "client_reset"
    BACKEND_RESET = "backend_reset"
    IDLE_TIMEOUT = "idle_timeout"
    # The grace period after a stop request ran out, or the operator cut the session.
    SHUTDOWN = "shutdown"
    # Before the relay: no backend answered, or the client left while we tried.
    NO_BACKEND = "no_backend"
    CLIENT_ABORTED = "client_aborted"
    # Something went wrong inside tcpfwd; the session, and only it, is ended.
    INTERNAL_ERROR = "internal_error"


class Reject(StrEnum):
    """Why a connection was turned away (the ``cause`` label). One turned away after it
    was accepted (by its PROXY header, or the client that header named) also ends its
    session with this word."""

    DENIED = "denied"
    SERVICE_LIMIT = "service_limit"
    CLIENT_LIMIT = "client_limit"
    GLOBAL_LIMIT = "global_limit"
    # The peer is one of tcpfwd's own connections to a backend: the backend is tcpfwd.
    LOOP = "loop"
    # accept_proxy: the peer may not send a header; its header was bad; it sent none.
    UNTRUSTED_SOURCE = "untrusted_source"
    BAD_PROXY_HEADER = "bad_proxy_header"
    PROXY_HEADER_TIMEOUT = "proxy_header_timeout"


#: A session's end word: how it ended, or why it was turned away after acceptance.
EndWord: TypeAlias = End | Reject


class Outcome(StrEnum):
    """How one attempt to one backend address went (the access line's ``failed=`` and the
    ``outcome`` label). A rarer connect failure is worded by its errno, lower-cased, and
    a greeting mismatch carries the greeting's first word: ``greeting_mismatch:421``."""

    OK = "ok"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    DNS = "dns"
    # The failover deadline cut the attempt short: says nothing about the backend.
    FAILOVER_TIMEOUT = "failover_timeout"
    # The backend is at its max_connections: skipped without a connect.
    FULL = "full"
    GREETING_TIMEOUT = "greeting_timeout"
    GREETING_CLOSED = "greeting_closed"
    GREETING_RESET = "greeting_reset"
    GREETING_TOO_LONG = "greeting_too_long"
    GREETING_MISMATCH = "greeting_mismatch"
    # A hedge to another backend answered first.
    OVERTAKEN = "overtaken"
    # Transparent mode: our socket could not take the client's address (not the
    # backend's fault either).
    TRANSPARENT_BIND = "transparent_bind"


class AdminState(StrEnum):
    """What the operator says of a backend (``tcpfwd backend``)."""

    ENABLED = "enabled"
    # No new sessions; those in flight go on.
    DRAINING = "draining"
    # No new sessions, and those in flight are ended.
    DISABLED = "disabled"


class RelayMode(StrEnum):
    """How a service moves bytes (``relay``); a session's line names SPLICE or COPY."""

    # Copy, then splice a direction once it has shown it is bulk.
    AUTO = "auto"
    SPLICE = "splice"
    COPY = "copy"


class Policy(StrEnum):
    """The order in which a service tries its backends within a tier (``policy``)."""

    FAILOVER = "failover"
    ROUND_ROBIN = "round-robin"
    LEAST_CONNECTIONS = "least-connections"
    RANDOM = "random"
    SOURCE_HASH = "source-hash"


class CheckKind(StrEnum):
    """A backend's active health check (``health.check``)."""

    # Only a recovery probe while the backend is down.
    NONE = "none"
    TCP = "tcp"
    SEND = "send"
    SMTP = "smtp"


class AcceptProxy(StrEnum):
    """Whether clients of a service must start with a PROXY header (``accept_proxy``)."""

    OFF = "off"
    REQUIRED = "required"
    # Trusted sources may also connect without a header (their own address is then used).
    OPTIONAL = "optional"


#: The operator's verbs (``tcpfwd backend SERVICE BACKEND ACTION``) and the state each sets.
ADMIN_ACTIONS: Final[Mapping[str, AdminState]] = MappingProxyType(
    {"drain": AdminState.DRAINING, "disable": AdminState.DISABLED, "enable": AdminState.ENABLED}
)
