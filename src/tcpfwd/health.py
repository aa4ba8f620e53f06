"""Backend health: a pure up/down state machine per backend, and the table that holds them.

Pure: no asyncio, no sockets, no clock. Time comes in as ``now`` (a float from whatever
clock the caller uses throughout; wall-clock seconds make the status page readable).

The state machine, per backend:

=======  ===========================================  =====================================
state    event                                        result
=======  ===========================================  =====================================
UP       failure (passive or check), ``fall``-th in    DOWN
         a row
UP       success                                      UP (failure count reset)
DOWN     passive success (a real connection made it)  UP at once: just proven reachable
DOWN     check success, ``rise``-th in a row          UP
DOWN     failure                                      DOWN (success count reset)
any      ``force(state)`` (admin)                     that state, both counts reset
=======  ===========================================  =====================================

Every observation returns a `Transition` if, and only if, it changed the state, so the
caller logs each change exactly once.

A backend starts UP without evidence: fail-open, it is tried before any marked down. What
is shown of it (`shown_state`) says ``unknown`` until something was learnt: a check, a
passive observation, a forced state, or a connection made to it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Generic, TypeVar

__all__ = [
    "UNKNOWN",
    "BackendHealth",
    "HealthState",
    "HealthTable",
    "Source",
    "Transition",
    "shown_state",
]


class HealthState(StrEnum):
    UP = "up"
    DOWN = "down"


# Shown for a backend nothing has been learnt about yet; not a state of the machine,
# which treats such a backend as UP.
UNKNOWN: Final = "unknown"


class Source(StrEnum):
    """Where an observation comes from. Plain strings with these values are accepted too."""

    PASSIVE = "passive"  # the outcome of a real client's connection attempt
    CHECK = "check"  # the active health checker
    ADMIN = "admin"  # an operator (or a test) forcing the state


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of state, returned once so the caller can log it once."""

    previous: HealthState
    current: HealthState
    reason: str
    source: Source
    at: float


def _observation_source(source: str) -> Source:
    # Every proxied connection reports one passive observation, already a Source:
    # spared the enum lookup (a call through EnumType.__call__).
    if source is Source.PASSIVE or source is Source.CHECK:
        return source
    try:
        parsed = Source(source)
    except ValueError:
        raise ValueError(f"unknown health source {source!r}") from None
    if parsed is Source.ADMIN:
        # Admin changes are assertions of state, not evidence to be counted.
        raise ValueError("admin changes go through force(), not observe_*()")
    return parsed


def _check_thresholds(rise: int, fall: int) -> None:
    if rise < 1:
        raise ValueError(f"rise must be >= 1, got {rise}")
    if fall < 1:
        raise ValueError(f"fall must be >= 1, got {fall}")


class BackendHealth:
    """The health of one backend. See the module docstring for the state table."""

    __slots__ = (
        "_state",
        "consecutive_failures",
        "consecutive_successes",
        "fall",
        "last_change",
        "last_check_at",
        "last_check_detail",
        "last_check_ok",
        "last_reason",
        "observed",
        "rise",
        "up",
    )

    def __init__(
        self, *, rise: int = 2, fall: int = 1, initial: HealthState = HealthState.UP
    ) -> None:
        _check_thresholds(rise, fall)
        self.rise = rise
        self.fall = fall
        self._state = HealthState(initial)
        # The state as a plain attribute: read for every connection.
        self.up = self._state is HealthState.UP
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.last_change: float | None = None
        self.last_reason: str | None = None
        self.last_check_ok: bool | None = None
        self.last_check_at: float | None = None
        self.last_check_detail: str | None = None
        # Whether any observation or decree has reached it: until then it is up by default.
        self.observed = False

    @property
    def state(self) -> HealthState:
        return self._state

    @property
    def is_up(self) -> bool:
        return self.up

    def configure(self, *, rise: int, fall: int) -> None:
        """Change the thresholds (config reload), keeping state and counts.

        A lowered threshold takes effect at the next observation, not immediately: a state
        change should always be caused by, and reported with, an observation.
        """
        _check_thresholds(rise, fall)
        self.rise = rise
        self.fall = fall

    def observe_success(self, source: str, now: float, detail: str = "") -> Transition | None:
        """A successful connection (``"passive"``) or health check (``"check"``)."""
        src = _observation_source(source)
        self.observed = True
        self.consecutive_failures = 0
        self.consecutive_successes += 1
        if src is Source.CHECK:
            self.last_check_ok = True
            self.last_check_at = now
            self.last_check_detail = detail
        if self._state is HealthState.UP:
            return None
        if src is Source.PASSIVE:
            reason = "connection succeeded"
        elif self.consecutive_successes >= self.rise:
            reason = f"{self.consecutive_successes} consecutive checks passed"
        else:
            return None
        if detail:
            reason = f"{reason} ({detail})"
        return self._change(HealthState.UP, reason, src, now)

    def observe_failure(self, source: str, reason: str, now: float) -> Transition | None:
        """A failed connection (``"passive"``) or health check (``"check"``), and why."""
        src = _observation_source(source)
        self.observed = True
        self.consecutive_successes = 0
        self.consecutive_failures += 1
        if src is Source.CHECK:
            self.last_check_ok = False
            self.last_check_at = now
            self.last_check_detail = reason
        if self._state is HealthState.DOWN or self.consecutive_failures < self.fall:
            return None
        return self._change(HealthState.DOWN, reason, src, now)

    def force(self, state: HealthState, reason: str, now: float) -> Transition | None:
        """Set the state by decree (admin, tests). Resets both counts even if unchanged.

        This is health, not administrative disabling: the checker can still move the
        backend afterwards (a backend forced down comes back after ``rise`` good checks).
        """
        self.observed = True
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        state = HealthState(state)
        if state is self._state:
            return None
        return self._change(state, reason, Source.ADMIN, now)

    def _change(self, state: HealthState, reason: str, source: Source, now: float) -> Transition:
        transition = Transition(self._state, state, reason, source, now)
        self._state = state
        self.up = state is HealthState.UP
        self.last_change = now
        self.last_reason = reason
        return transition

    def snapshot(self) -> dict[str, object]:
        """A JSON-able view for a status page."""
        return {
            "state": self._state.value,
            "rise": self.rise,
            "fall": self.fall,
            "consecutive_failures": self.consecutive_failures,
            "consecutive_successes": self.consecutive_successes,
            "last_change": self.last_change,
            "last_reason": self.last_reason,
            "last_check_ok": self.last_check_ok,
            "last_check_at": self.last_check_at,
            "last_check_detail": self.last_check_detail,
        }

    def __repr__(self) -> str:
        return (
            f"BackendHealth(state={self._state.value}, rise={self.rise}, fall={self.fall}, "
            f"failures={self.consecutive_failures}, successes={self.consecutive_successes})"
        )


def shown_state(health: BackendHealth | None, tried: bool) -> str:
    """What a status shows of a backend's health: ``up``, ``down`` or `UNKNOWN`.

    ``health``: None where the backend's health is not tracked (no passive marks, no
    check); ``tried``: a connection to it was made, or an attempt on it ended. An untried
    backend without evidence is unknown, though the data plane takes it as up.
    """
    if health is not None:
        if not health.up:
            return HealthState.DOWN.value
        if health.observed:
            return HealthState.UP.value
    return HealthState.UP.value if tried else UNKNOWN


K = TypeVar("K", bound=Hashable)


class HealthTable(Generic[K]):
    """The one place health state lives: a `BackendHealth` per backend key.

    Keys are any hashable, typically ``(service, backend_name)``. Key backends by name,
    not by list position, so that a reload keeps the state of the backends it kept.
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[K, BackendHealth] = {}

    def get(self, key: K) -> BackendHealth | None:
        return self._entries.get(key)

    def ensure(
        self, key: K, rise: int = 2, fall: int = 1, *, initial: HealthState = HealthState.UP
    ) -> BackendHealth:
        """The health of `key`, created (in state `initial`) if new.

        For an existing key the state is kept and the thresholds updated, so reloading a
        config with new rise/fall does not forget which backends are down.
        """
        health = self._entries.get(key)
        if health is None:
            health = self._entries[key] = BackendHealth(rise=rise, fall=fall, initial=initial)
        elif health.rise != rise or health.fall != fall:
            health.configure(rise=rise, fall=fall)
        return health

    def retain(self, keys: Iterable[K]) -> list[K]:
        """Drop every key not in `keys`, keeping the others' state; the dropped keys."""
        keep = set(keys)
        dropped = [key for key in self._entries if key not in keep]
        for key in dropped:
            del self._entries[key]
        return dropped

    def items(self) -> list[tuple[K, BackendHealth]]:
        # A list, not a view: a reader may interleave with ensure()/retain().
        return list(self._entries.items())

    def snapshot(self) -> list[dict[str, object]]:
        """JSON-able (if the keys are, e.g. tuples of str) list of ``{"key": ..., ...}``."""
        return [{"key": key, **health.snapshot()} for key, health in self._entries.items()]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries
