"""Hedged attempts: an attempt with no answer after its backend's hedge delay has the
next backend tried beside it.

The first to answer wins; of two that answer in the same batch of events, the earlier in
the order. An attempt that loses is closed before any byte of the client reaches it; one
still trying goes on, detached, until it answers or fails, so that its outcome still
tells passive health whether that backend is there. A backend with an overdue attempt
is suspect: new sessions try it after the others until it answers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from .attempt import NOT_THE_BACKENDS, OVER, Attempt
from .vocabulary import Outcome

if TYPE_CHECKING:
    import asyncio

    from .dialer import DialOwner
    from .reactor import Reactor
    from .service import ServiceRuntime, Target

# Hedges: the delay is this many times the backend's slowest answer of late (a decaying
# maximum, about its recent p99), and never less than the floor, so that a backend that
# is slow but there (far away) is not hedged on every connection.
HEDGE_FACTOR: Final = 3.0
HEDGE_FLOOR: Final = 0.1
# The slowest answer of late forgets a little with each new answer.
SLOWEST_DECAY: Final = 0.98
# Hedges (and losers still trying) per service at once: an outage must not double the
# load on the next backend's listen queue for long.
MAX_HEDGES_IN_FLIGHT: Final = 64


class Hedging:
    """The race of a `~.dialer.Dial` between an overdue attempt and its hedges."""

    if TYPE_CHECKING:
        owner: DialOwner
        service: ServiceRuntime
        plan: Sequence[Target]
        reactor: Reactor
        over: bool
        _position: int
        _addresses: Sequence[tuple[str, int]] | None
        _attempt: Attempt | None
        _racing: list[Attempt] | None
        _ready: list[Attempt] | None
        _resolving: asyncio.Task[None] | None

        def _next(self, *, hedge: bool = False) -> None: ...
        def _win(self, attempt: Attempt) -> None: ...

    def _answered_in_race(self, attempt: Attempt) -> None:
        """``attempt`` answered while others raced it: the winner is decided once every
        event of this batch is in (of attempts that answered together, the earlier in
        the order wins)."""
        ready = self._ready
        if ready is None:
            ready = self._ready = []
            self.reactor.after_batch(self._decide)
        ready.append(attempt)

    def _loser_ended(self, attempt: Attempt, outcome: str) -> None:
        """An attempt that lost (or was overtaken) failed: only health hears of it."""
        self._let_go(attempt)
        if outcome not in NOT_THE_BACKENDS:
            self.service.failed(attempt.target, outcome)

    def _in_flight(self) -> list[Attempt]:
        attempts = [] if self._attempt is None else [self._attempt]
        if self._racing:
            attempts += self._racing
        if self._ready:
            attempts += [a for a in self._ready if a is not self._attempt and a not in attempts]
        return attempts

    def _decide(self) -> None:
        ready = self._ready
        self._ready = None
        if not ready or self.over:
            return
        winner = min(ready, key=_RANK)
        now = time.monotonic()
        losers = [a for a in self._in_flight() if a is not winner]
        current = self._attempt
        self._attempt = self._racing = None
        for attempt in losers:
            attempt.detached = True
            self.owner.attempt_failed(
                attempt.target, attempt.address, Outcome.OVERTAKEN, now - attempt.started
            )
            if attempt.state == OVER:
                # Answered too, later in the order: closed untouched.
                attempt.abandon()
                self._let_go(attempt)
                self.service.succeeded(attempt.target)
            elif not attempt.extra:
                # Still trying: it goes on alone, its outcome for health only.
                attempt.extra = True
                self.service.hedging += 1
        if current is None:
            # No attempt holds the place of the backend being tried: give it back.
            self._release_current(winner)
        if winner.extra:
            winner.extra = False
            self.service.hedging -= 1
        if winner.hedge:
            winner.target.stats.hedge_wins += 1
        self._win(winner)

    def _release_current(self, winner: Attempt) -> None:
        if self._resolving is not None:
            self._resolving.cancel()
            self._resolving = None
        if self._addresses is not None and self._position < len(self.plan):
            if winner.rank != self._position:
                self.service.release(self.plan[self._position])
            self._addresses = None

    def _let_go(self, attempt: Attempt) -> None:
        """An attempt that no session will use has ended: its backend's place, its
        overdue mark and its share of the hedges go."""
        self.service.release(attempt.target)
        if attempt.overdue:
            attempt.target.overdue -= 1
            attempt.overdue = False
        if attempt.extra:
            attempt.extra = False
            self.service.hedging -= 1

    def overdue(self, attempt: Attempt) -> None:
        """No answer from ``attempt`` after its hedge delay: its backend is suspect for
        new sessions, and the next backend is tried beside it (if hedging may)."""
        attempt.overdue = True
        attempt.target.overdue += 1
        service = self.service
        if (
            attempt is not self._attempt
            or self.over
            or self._position + 1 >= len(self.plan)
            or service.hedging >= MAX_HEDGES_IN_FLIGHT
        ):
            return
        racing = self._racing
        if racing is None:
            racing = self._racing = []
        racing.append(attempt)
        attempt.extra = True
        service.hedging += 1
        attempt.target.stats.hedges += 1
        # The overtaken attempt keeps its backend's place; the next backend is started.
        self._attempt = None
        self._addresses = None
        self._position += 1
        self._next(hedge=True)


def _rank(attempt: Attempt) -> int:
    return attempt.rank


_RANK: Final = _rank
