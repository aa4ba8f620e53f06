"""One client connection from accept to end: a small state machine on readiness events.

Stages: (PROXY header →) dial (→ hold → dial ...) → relay → ended. A session has no
transport, task or future of its own: the reactor calls it when one of its sockets is
ready or one of its timers is due, and it does what that stage needs.

- header: with ``accept_proxy``, the client's PROXY header is read and checked; from then
  on the header's client address is the session's client (for the backend order, the
  log line and the header sent on), and the peer is shown as ``via``.
- dial: a `~.dialer.Dial` tries the service's backends in order. The client's bytes
  wait in its socket meanwhile. Should the dial take a while, the client is watched for
  leaving (a reset ends the session at once; in hold mode, an EOF does too).
- hold: with ``hold_timeout``, a pass that found no backend is followed by another after
  a pause, while the client waits.
- relay: the byte pump of `~.relay.Relay`, which this class extends.
- ended: one access line, the counters, the session's place freed.

A client that is turned away (no backend, a limit, a bad header) gets a FIN, not a
reset: what it already sent is read and dropped first. Nothing that goes wrong inside a
session escapes it: the reactor reports the error and the session ends as
``internal_error``.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import TYPE_CHECKING, Final

from .accesslog import AttemptResult, SessionRecord
from .attempt import Attempt
from .config import SendProxySettings, format_hostport
from .daemonstate import NEW_CONNECTION
from .dialer import Dial, apply_options
from .intake import DIALING, ENDED, HELD, LEAVING, RELAYING, ClientWatch, expect_header
from .proxy_accept import HeaderReader
from .proxy_send import SessionHeaders
from .reactor import DONTWAIT, RawSocket
from .relay import UNWATCHED, Relay
from .vocabulary import End, EndWord, HostPort, Reject, RelayMode

if TYPE_CHECKING:
    from .listener import Listener
    from .service import ServiceRuntime, Target

log = logging.getLogger("tcpfwd")


# Hold mode: pauses between passes over the backends, doubling up to the maximum.
HOLD_FIRST_PAUSE: Final = 0.25
HOLD_MAX_PAUSE: Final = 2.0
# A session line lists at most this many attempts; a long hold counts the rest.
MAX_LOGGED_ATTEMPTS: Final = 32
# What a turned-away client's socket is drained of, at most, before it is closed.
_DRAIN_ROUNDS: Final = 4

# Taken from their enum once (see relay._CLOSED_WORDS).
_SPLICED: Final = RelayMode.SPLICE
_COPIED: Final = RelayMode.COPY


# Session ids: unique per process start (random prefix) and ordered within it.
_ID_PREFIX: Final = os.urandom(3).hex()
_next_number = itertools.count(1)


class Session(Relay):
    """One client connection; see the module docstring."""

    __slots__ = (
        "_attempt_time",
        "_backend_address",
        "_began",
        "_connect_time",
        "_dial",
        "_failed",
        "_headers",
        "_held",
        "_hold_pause",
        "_omitted",
        "_remote",
        "backend",
        "client",
        "client_eof",
        "counted",
        "csock",
        "destination",
        "dial_began",
        "early",
        "idle_seen",
        "idle_ticks",
        "listener",
        "local",
        "number",
        "peer",
        "service",
        "stage",
    )

    def __init__(
        self,
        service: ServiceRuntime,
        listener: Listener,
        sock: RawSocket,
        peer: HostPort,
    ) -> None:
        self.service = service
        self.listener = listener
        self.csock = sock
        self.peer = peer
        # Who the client is and what it connected to: the peer and our socket's own
        # address, unless a trusted PROXY header says otherwise.
        self.client = peer
        self.destination: HostPort | None = None
        self.number = next(_next_number)
        self._began = time.monotonic()
        self.stage = DIALING
        self.reactor = service.daemon.reactor
        self.cmask = UNWATCHED
        self.end = None
        self.client_eof = False
        self.backend: Target | None = None
        self.local: HostPort | None = None
        self._dial: Dial | None = None
        self._failed: list[AttemptResult] | None = None
        self._omitted = 0
        self._held: float | None = None
        self.early = b""
        self._headers: SessionHeaders | None = None
        self._connect_time: float | None = None
        self._hold_pause = HOLD_FIRST_PAUSE

    def __repr__(self) -> str:
        return f"Session({self.session_id}, {self.service.name})"

    @property
    def session_id(self) -> str:
        return f"{_ID_PREFIX}-{self.number:x}"

    # --- start -----------------------------------------------------------------------

    def start(self) -> None:
        service = self.service
        service.stats.active += 1
        self.counted = (
            service.session_started(self.peer[0]) if service.per_client_limit is not None else None
        )
        service.daemon.session_started(self, service)
        if service.expects_header:
            expect_header(self)
            return
        self.dial_began = began = self._began
        self.start_dial(began)

    def start_dial(self, now: float) -> None:
        service = self.service
        self.stage = DIALING
        if service.needs_destination and self.destination is None:
            try:
                name = self.csock.getsockname()
                self.destination = (name[0], name[1])
            except OSError:
                pass
        reactor = self.reactor
        assert reactor is not None
        dial = self._dial = Dial(self, service.plan(self.client[0]), reactor, now)
        dial.start()

    # --- events ----------------------------------------------------------------------

    def on_timer(self, kind: int) -> None:
        # The one timer of a session: the pause between passes of a hold.
        if self.stage == HELD:
            self.start_dial(time.monotonic())

    @property
    def remote(self) -> HostPort:
        return self._remote

    def is_new(self, now: float) -> bool:
        """Just connected to its backend and nothing heard back (see OwnConnections)."""
        return (
            self.stage == RELAYING
            and self.down.received == 0
            and now - self.dial_began - (self._connect_time or 0.0) < NEW_CONNECTION
        )

    def dial_slow(self) -> None:
        # A dial that takes a while: watch the client, whose leaving would end it.
        if self.stage == DIALING and self.cmask == UNWATCHED:
            self.watch_client(LEAVING)

    def grown_up(self) -> None:
        """The session has lived long enough for keepalive towards its backend (the
        client side inherits it from the listening socket)."""
        if self.stage == RELAYING and self.reactor is not None:
            apply_options(self.up.dst, self.service.keepalive_options)

    def on_failure(self, error: BaseException) -> None:
        if self.stage == RELAYING:
            self.shutdown(End.INTERNAL_ERROR)
        elif self.stage != ENDED:
            self.abandon(End.INTERNAL_ERROR)

    def watch_client(self, mask: int, reader: HeaderReader | None = None) -> ClientWatch | None:
        """Watch the client's socket before the relay (edge-triggered, as the relay does:
        each change is told once): for its PROXY header, read by ``reader``, or for its
        leaving."""
        if self.cmask != UNWATCHED:
            return None
        reactor = self.reactor
        assert reactor is not None
        watch = ClientWatch(self, reader)
        reactor.add(self.csock.fileno(), mask, watch)
        self.cmask = mask
        return watch

    def proxy_header(self, settings: SendProxySettings) -> bytes | None:
        headers = self._headers
        if headers is None:
            if self.destination is None:
                return None
            headers = self._headers = SessionHeaders(
                self.client, self.destination, self.session_id.encode("ascii")
            )
        return headers.for_backend(settings)

    # --- dial ------------------------------------------------------------------------

    def attempt_failed(self, target: Target, address: str, outcome: str, elapsed: float) -> None:
        failed = self._failed
        if failed is None:
            failed = self._failed = []
        failed.append(AttemptResult(target.name, address, outcome, elapsed))

    def dial_connected(self, attempt: Attempt) -> None:
        self._dial = None
        now = time.monotonic()
        self.backend = attempt.target
        self._backend_address = attempt.address
        local = self.local = attempt.local
        self._remote = attempt.remote
        service = self.service
        service.daemon.outgoing.hand_over(local, attempt, self)  # type: ignore[arg-type]
        self._attempt_time = now - attempt.started
        self._connect_time = waited = now - self.dial_began
        if self._held is not None:
            self._held = waited
        if self._failed is not None:
            self._trim_attempts()
        settings = service.settings
        self.stage = RELAYING
        reactor = self.reactor
        assert reactor is not None
        if settings.idle_timeout is not None:
            self.idle_seen = -1
            self.idle_ticks = 0
            service.watch_idle(self)
        if service.keepalive_options:
            service.daemon.grow_up(self)
        self._start_relay(
            reactor,
            self.csock,
            self.cmask,
            attempt.take(),
            self.early,
            attempt.greeting,
            attempt.readable,
            service.daemon.pipes,
            service.splice_after,
            service.chunk,
        )
        self.early = b""

    def dial_failed(self) -> None:
        self._dial = None
        self._trim_attempts()
        hold = self.service.settings.hold_timeout
        waited = time.monotonic() - self.dial_began
        if hold is None or waited >= hold:
            if hold is not None:
                self._held = waited
            self.abandon(End.NO_BACKEND)
            return
        # Held: the client waits, its bytes kept in its socket; its leaving ends it.
        self._held = waited
        if self.client_eof:
            self.abandon(End.CLIENT_ABORTED)
            return
        self.stage = HELD
        self.watch_client(LEAVING)
        pause = self._hold_pause
        reactor = self.reactor
        assert reactor is not None
        reactor.call_later(min(pause, hold - waited), self, 0)
        self._hold_pause = min(pause * 2, HOLD_MAX_PAUSE)

    def _trim_attempts(self) -> None:
        failed = self._failed
        if failed is not None and len(failed) > MAX_LOGGED_ATTEMPTS:
            # Keep the first pass and the latest attempts: the story's start and end.
            half = MAX_LOGGED_ATTEMPTS // 2
            self._omitted += len(failed) - MAX_LOGGED_ATTEMPTS
            del failed[half : len(failed) - half]

    # --- ending ------------------------------------------------------------------------

    def abort(self) -> None:
        """End the session now (the grace period after a stop request is over)."""
        if self.stage == RELAYING:
            self.shutdown(End.SHUTDOWN)
        elif self.stage != ENDED:
            self.abandon(End.SHUTDOWN)

    def idle_check(self) -> None:
        """One sweep of the idle timeout (a quarter of it): four quiet ones in a row end it."""
        if self.stage != RELAYING:
            return
        moved = self.up.received + self.down.received
        if moved != self.idle_seen:
            self.idle_seen = moved
            self.idle_ticks = 0
            return
        self.idle_ticks += 1
        if self.idle_ticks >= 4:
            self.shutdown(End.IDLE_TIMEOUT)

    def refuse(self, cause: Reject, reason: str) -> None:
        """Turned away after acceptance (a bad header, a client the header named)."""
        self.service.turned_away(cause, self.peer, reason)
        self.abandon(cause)

    def abandon(self, end: EndWord) -> None:
        """End before (or instead of) the relay: close what is open."""
        dial = self._dial
        if dial is not None:
            self._dial = None
            dial.cancel()
        sock = self.csock
        if self.cmask != UNWATCHED:
            reactor = self.reactor
            assert reactor is not None
            reactor.forget(sock.fileno())
            self.cmask = UNWATCHED
        if end == End.CLIENT_ABORTED:
            sock.close()
        else:
            turn_away(sock)
        self._finish(end)

    def _finish(self, end: EndWord) -> None:
        self.stage = ENDED
        service = self.service
        daemon = service.daemon
        target = self.backend
        if target is not None:
            daemon.outgoing.discard(self.local, self)  # type: ignore[arg-type]
            if service.relaying:
                service.relaying.discard(self)
        record = _record_of(self, end, target)
        # Free the session's place (and its backend's) before saying it ended: whoever
        # reads the line may rely on the place being free.
        service.session_ended(self.counted, record, target)
        daemon.session_ended(self)
        service.access_log.emit(record)


def turn_away(sock: RawSocket) -> None:
    """Close a client's socket with a FIN, not a reset: what it already sent is read and
    dropped first (closing with unread bytes resets, and a reset can overtake what the
    client has not read yet). A client that keeps sending may still see a reset."""
    try:
        for _ in range(_DRAIN_ROUNDS):
            if not sock.recv(65536, DONTWAIT):
                break
    except OSError:
        pass
    sock.close()


def _record_of(session: Session, end: EndWord, target: Target | None) -> SessionRecord:
    """What the access line and the counters say of a session that ended."""
    elapsed = time.monotonic() - session._began
    peer = session.peer
    client = session.client
    host = client[0]
    shown = f"{host}:{client[1]}" if ":" not in host else f"[{host}]:{client[1]}"
    via = None if client is peer else format_hostport(peer[0], peer[1])
    # Positional, one call: a record per session is built for every line.
    if target is None:
        backend = address = local_shown = relay = None
        attempt_time = 0.0
        up_bytes = down_bytes = 0
        transparent = False
    else:
        local = session.local
        if local is None:
            local_shown = "?"
        else:
            host = local[0]
            local_shown = f"{host}:{local[1]}" if ":" not in host else f"[{host}]:{local[1]}"
        backend = target.name
        address = session._backend_address
        attempt_time = session._attempt_time
        up = session.up
        down = session.down
        up_bytes = up.received
        down_bytes = down.received
        relay = _SPLICED if up_bytes >= up.splice_at or down_bytes >= down.splice_at else _COPIED
        transparent = target.config.transparent
    return SessionRecord(
        session.session_id,
        time.time() - elapsed,
        shown,
        session.listener.name,
        session.service.name,
        session._failed or (),
        backend,
        address,
        local_shown,
        attempt_time,
        session._connect_time,
        session._held,
        session._omitted,
        up_bytes,
        down_bytes,
        relay,
        elapsed,
        end,
        via,
        transparent,
    )
