"""A session's client before the relay: its PROXY header, and its leaving.

With ``accept_proxy``, the client's PROXY header is read and checked first; from then on
the header's client address is the session's client (for the backend order, the log
line and the header sent on), and the peer is shown as ``via``. While a dial takes a
while, or the session is held, the client's socket is watched for the client leaving: a
reset ends the session at once; in hold mode, an EOF does too. Its bytes wait in its
socket meanwhile, for the relay.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from .proxy_accept import ClientGone, HeaderReader, HeaderRejected, addresses_of
from .reactor import DONTWAIT, EDGE, ERR, HUP, IN, RDHUP
from .vocabulary import AcceptProxy, End

if TYPE_CHECKING:
    from .proxy_protocol import ProxyHeader
    from .session import Session

# A session's stages.
HEADER: Final = 1
DIALING: Final = 2
HELD: Final = 3
RELAYING: Final = 4
ENDED: Final = 5
# How the client's socket is watched before the relay: for the PROXY header, or only
# for the client leaving (its EOF; a reset is always reported).
READING_HEADER: Final = IN | RDHUP | EDGE
LEAVING: Final = RDHUP | EDGE
# The kind of the watch's one timer: the PROXY header's time is up.
HEADER_TIMER: Final = 1
# Bytes read at once while looking for a PROXY header (one header at most: the rest
# waits in the socket for the relay, except what came in the same read).
_HEADER_READ: Final = 4096


def expect_header(session: Session) -> None:
    """Read the session's PROXY header first, for at most ``proxy_header_timeout``."""
    settings = session.service.settings
    session.stage = HEADER
    watch = session.watch_client(
        READING_HEADER, HeaderReader(optional=settings.accept_proxy == AcceptProxy.OPTIONAL)
    )
    reactor = session.reactor
    assert reactor is not None and watch is not None
    reactor.call_later(settings.proxy_header_timeout, watch, HEADER_TIMER)


class ClientWatch:
    """Owns the client's socket in the reactor until the session relays (the session
    itself then does): its events are the PROXY header, or the client leaving."""

    __slots__ = ("reader", "session")

    def __init__(self, session: Session, reader: HeaderReader | None) -> None:
        self.session = session
        self.reader = reader

    def on_event(self, fd: int, events: int) -> None:
        stage = self.session.stage
        if stage == HEADER:
            self._read_header(events)
        elif stage in (DIALING, HELD):
            self._stirred(events)

    def on_failure(self, error: BaseException) -> None:
        self.session.on_failure(error)

    def _stirred(self, events: int) -> None:
        """The client's socket spoke while no backend is joined: has the client left?"""
        session = self.session
        if events & (ERR | HUP):
            session.abandon(End.CLIENT_ABORTED)
            return
        if events & RDHUP:
            session.client_eof = True
            if session.stage == HELD:
                # While held, an EOF counts as leaving too (as HAProxy's abortonclose): a
                # client that has heard nothing from us and stopped sending is almost
                # always gone, and a FIN cannot be told from a half-close without writing.
                session.abandon(End.CLIENT_ABORTED)
                return
            # A half-close after the request: it waits in the socket for the relay.

    def _read_header(self, events: int) -> None:
        """Read what the client sent (all of it: its events come once) into the header
        reader, until the header is complete or more must come. A read shorter than
        asked took all there was, unless the client's EOF waits behind it."""
        reader = self.reader
        assert reader is not None
        session = self.session
        sock = session.csock
        try:
            while True:
                result: tuple[ProxyHeader | None, bytes] | None
                try:
                    data = sock.recv(_HEADER_READ, DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    result = reader.feed_eof(reset=True)
                else:
                    result = reader.feed(data) if data else reader.feed_eof(reset=False)
                if result is not None:
                    self._header_done(*result)
                    return
                if len(data) < _HEADER_READ and not events & RDHUP:
                    return
        except HeaderRejected as rejected:
            session.refuse(rejected.end, rejected.reason)
        except ClientGone as gone:
            session.abandon(End.CLIENT_ABORTED if gone.reset else End.CLIENT_CLOSED)

    def on_timer(self, kind: int) -> None:
        """The header's time is up: an optional one is not coming; else the client goes."""
        reader = self.reader
        if reader is None or self.session.stage != HEADER:
            return
        try:
            result = reader.timed_out(self.session.service.settings.proxy_header_timeout)
        except HeaderRejected as rejected:
            self.session.refuse(rejected.end, rejected.reason)
            return
        self._header_done(*result)

    def _header_done(self, header: ProxyHeader | None, rest: bytes) -> None:
        """The header is read (or there is none): adopt its addresses, then dial."""
        self.reader = None
        session = self.session
        session.early = rest
        if header is not None:
            addresses = addresses_of(header)
            if addresses is not None:
                session.client, session.destination = addresses
        session.counted, refused = session.service.readmit(session.counted, session.client[0])
        if refused is not None:
            session.refuse(*refused)
            return
        session.dial_began = now = time.monotonic()
        session.start_dial(now)
