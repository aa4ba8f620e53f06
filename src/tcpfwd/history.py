"""The last hour of each service and backend, for the status page: small ring buffers.

Every second a sampler reads counters the daemon keeps anyway (sessions ended, failed
attempts, backend health) and adds what changed since the previous reading to the current
bucket. A bucket is ``STEP`` seconds of wall-clock time, aligned on multiples of ``STEP``,
and ``POINTS`` buckets make the hour; older buckets fall off the ring. Memory is bounded
whatever the traffic: a few floats per bucket per series, ``MAX_CHANGES`` health changes
per backend, and series of services and backends no longer configured are dropped.

What the status document carries (``annotate``), for each service and backend:

- ``sessions_per_s``: sessions ended per second (as ``rate(tcpfwd_sessions_total)``);
- ``failovers_per_min``: failed attempts per minute (as ``tcpfwd_failovers_total``);
- for backends, ``up``: the share of readings in each bucket that found it up, and
  ``changes``: its health changes of the hour, each with its time and reason.

Values are oldest first; ``start`` is the first bucket's start and the last value is the
bucket in progress, estimated over the trailing ``STEP`` seconds so that it moves as soon
as traffic does. ``null`` marks buckets before a series existed.

`History` is pure (time comes in as ``now``); `HistorySampler` drives it from the event
loop of the process that serves the admin endpoint.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .metrics import ServiceStats
from .vocabulary import Outcome

STEP = 10.0
POINTS = 360  # an hour of STEP-second buckets
SPAN = STEP * POINTS
SAMPLE_INTERVAL = 1.0
MAX_CHANGES = 32


@dataclass(frozen=True, slots=True)
class BackendSample:
    """One reading of a backend: its counters so far and its health now."""

    name: str
    sessions: int
    failed: int
    up: bool
    # When its health last changed and why, where the source knows it exactly.
    changed_at: float | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ServiceSample:
    name: str
    sessions: int
    failed: int
    backends: tuple[BackendSample, ...] = ()


def failed_attempts(stats: ServiceStats, backend: str | None = None) -> int:
    """Failed attempts (failovers) of one backend, or of the whole service."""
    names = [backend] if backend is not None else list(stats.backends)
    return sum(
        count
        for name in names
        for outcome, count in stats.backend(name).attempts.items()
        if outcome != Outcome.OK
    )


def service_sample(
    name: str,
    stats: ServiceStats,
    backends: Iterable[tuple[str, bool, float | None, str | None]],
) -> ServiceSample:
    """A reading of a service from its counters and ``(name, up, changed_at, reason)``."""
    return ServiceSample(
        name=name,
        sessions=sum(stats.ends.values()),
        failed=failed_attempts(stats),
        backends=tuple(
            BackendSample(
                name=backend,
                sessions=stats.backend(backend).sessions,
                failed=failed_attempts(stats, backend),
                up=up,
                changed_at=changed_at,
                reason=reason,
            )
            for backend, up, changed_at, reason in backends
        ),
    )


class _Ring:
    """The completed buckets of one series, oldest first: at most POINTS - 1 doubles.

    An array rather than a list of floats: 8 bytes a bucket. NaN marks a bucket before
    the series existed.
    """

    __slots__ = ("values",)

    def __init__(self, padding: int) -> None:
        self.values = array("d", [math.nan]) * min(padding, POINTS - 1)

    def extend(self, value: float, count: int = 1) -> None:
        self.values.extend(itertools.repeat(value, count))
        excess = len(self.values) - (POINTS - 1)
        if excess > 0:
            del self.values[:excess]

    def last(self) -> float:
        return self.values[-1] if self.values else math.nan

    def scaled(self, factor: float) -> list[float | None]:
        return [None if math.isnan(v) else _round(v * factor) for v in self.values]


class _Counter:
    """Increments of a counter per bucket."""

    __slots__ = ("buckets", "high", "live")

    def __init__(self, total: int, padding: int) -> None:
        self.buckets = _Ring(padding)
        self.live = 0.0
        # The highest total seen: a sum that dips for a moment (a worker's snapshot not
        # yet readable) and comes back must not count its sessions twice.
        self.high = total

    def add(self, total: int) -> None:
        if total > self.high:
            self.live += total - self.high
            self.high = total

    def close(self, gap: int) -> None:
        """End the bucket in progress; ``gap`` empty buckets passed since (a stall)."""
        self.buckets.extend(self.live)
        self.buckets.extend(0.0, gap)
        self.live = 0.0

    def rates(self, per: float, elapsed: float) -> list[float | None]:
        """Per-``per``-seconds rates; the bucket in progress over the trailing STEP."""
        previous = self.buckets.last()
        carried = (0.0 if math.isnan(previous) else previous) * max(0.0, 1.0 - elapsed / STEP)
        return [*self.buckets.scaled(per / STEP), _round((self.live + carried) * per / STEP)]


class _Health:
    """The share of readings that found a backend up, per bucket, and its changes."""

    __slots__ = ("buckets", "changed_at", "changes", "readings", "up", "ups")

    def __init__(self, sample: BackendSample, padding: int) -> None:
        self.buckets = _Ring(padding)
        self.readings = 0
        self.ups = 0
        self.up = sample.up
        self.changed_at = sample.changed_at
        self.changes: deque[dict[str, Any]] = deque(maxlen=MAX_CHANGES)
        if sample.changed_at is not None:
            # A change the daemon saw before the first reading (it starts with "up").
            self._change(sample, sample.changed_at)

    def read(self, sample: BackendSample, now: float) -> None:
        self.readings += 1
        self.ups += sample.up
        if sample.changed_at is not None and sample.changed_at != self.changed_at:
            self._change(sample, sample.changed_at)
        elif sample.up != self.up and sample.changed_at is None:
            self._change(sample, now)
        self.up = sample.up
        self.changed_at = sample.changed_at

    def _change(self, sample: BackendSample, at: float) -> None:
        self.changes.append(
            {"at": at, "health": "up" if sample.up else "down", "reason": sample.reason}
        )

    def close(self, gap: int) -> None:
        self.buckets.extend(self.ups / self.readings if self.readings else math.nan)
        # Nobody read it during a stall: it was most likely as it is now.
        self.buckets.extend(1.0 if self.up else 0.0, gap)
        self.readings = self.ups = 0

    def shares(self) -> list[float | None]:
        live = self.ups / self.readings if self.readings else (1.0 if self.up else 0.0)
        return [*self.buckets.scaled(1.0), _round(live)]

    def recent(self, now: float) -> list[dict[str, Any]]:
        return [c for c in self.changes if c["at"] >= now - SPAN]


class _Backend:
    __slots__ = ("failed", "health", "sessions")

    def __init__(self, sample: BackendSample, padding: int) -> None:
        self.sessions = _Counter(sample.sessions, padding)
        self.failed = _Counter(sample.failed, padding)
        self.health = _Health(sample, padding)


class _Service:
    __slots__ = ("backends", "failed", "sessions")

    def __init__(self, sample: ServiceSample, padding: int) -> None:
        self.sessions = _Counter(sample.sessions, padding)
        self.failed = _Counter(sample.failed, padding)
        self.backends: dict[str, _Backend] = {}


class History:
    """Ring buffers of every configured service and backend, fed by `record`."""

    def __init__(self) -> None:
        self._services: dict[str, _Service] = {}
        # Index (start / STEP) of the bucket in progress, and of the first one kept.
        self._bucket: int | None = None
        self._first = 0
        self._now = 0.0

    @property
    def started(self) -> bool:
        return self._bucket is not None

    def _completed(self) -> int:
        """How many completed buckets every series holds (new ones are padded to it)."""
        if self._bucket is None:
            return 0
        return self._bucket - self._first

    def record(self, now: float, samples: Iterable[ServiceSample]) -> None:
        """One reading of every service; those not in ``samples`` are forgotten."""
        bucket = math.floor(now / STEP)
        if self._bucket is None:
            self._bucket = self._first = bucket
        elif bucket > self._bucket:
            # A clock that goes back stays in the current bucket; one that leaps ahead
            # (a suspended machine) fills at most an hour of empty buckets.
            gap = min(bucket - self._bucket - 1, POINTS)
            for service in self._services.values():
                service.sessions.close(gap)
                service.failed.close(gap)
                for backend in service.backends.values():
                    backend.sessions.close(gap)
                    backend.failed.close(gap)
                    backend.health.close(gap)
            self._bucket = bucket
            self._first = max(self._first, bucket - (POINTS - 1))
        self._now = max(self._now, now)
        padding = self._completed()
        seen: set[str] = set()
        for sample in samples:
            seen.add(sample.name)
            entry = self._services.get(sample.name)
            if entry is None:
                entry = self._services[sample.name] = _Service(sample, padding)
            entry.sessions.add(sample.sessions)
            entry.failed.add(sample.failed)
            names = set()
            for backend_sample in sample.backends:
                names.add(backend_sample.name)
                kept = entry.backends.get(backend_sample.name)
                if kept is None:
                    kept = entry.backends[backend_sample.name] = _Backend(backend_sample, padding)
                kept.sessions.add(backend_sample.sessions)
                kept.failed.add(backend_sample.failed)
                kept.health.read(backend_sample, now)
            for name in [n for n in entry.backends if n not in names]:
                del entry.backends[name]
        for name in [n for n in self._services if n not in seen]:
            del self._services[name]

    def _elapsed(self) -> float:
        assert self._bucket is not None
        return min(STEP, max(0.0, self._now - self._bucket * STEP))

    def header(self) -> dict[str, Any]:
        """What every series shares: bucket width, first bucket's start, last reading."""
        return {"step": STEP, "start": self._first * STEP, "now": self._now, "span": SPAN}

    def service(self, name: str) -> dict[str, Any] | None:
        service = self._services.get(name)
        if service is None:
            return None
        elapsed = self._elapsed()
        return {
            "sessions_per_s": service.sessions.rates(1.0, elapsed),
            "failovers_per_min": service.failed.rates(60.0, elapsed),
        }

    def backend(self, service_name: str, name: str) -> dict[str, Any] | None:
        service = self._services.get(service_name)
        backend = service.backends.get(name) if service is not None else None
        if backend is None:
            return None
        elapsed = self._elapsed()
        return {
            "sessions_per_s": backend.sessions.rates(1.0, elapsed),
            "failovers_per_min": backend.failed.rates(60.0, elapsed),
            "up": backend.health.shares(),
            "changes": backend.health.recent(self._now),
        }

    def annotate(self, document: dict[str, Any]) -> dict[str, Any]:
        """Add ``history`` to a status document's services and backends; returns it."""
        if not self.started:
            return document
        document["history"] = self.header()
        for service in document.get("services", ()):
            series = self.service(service["name"])
            if series is not None:
                service["history"] = series
            for backend in service.get("backends", ()):
                backend_series = self.backend(service["name"], backend["name"])
                if backend_series is not None:
                    backend["history"] = backend_series
        return document


def _round(value: float) -> float:
    # Three significant digits are all a sparkline can show, and keep /status small.
    return float(f"{value:.3g}")


class HistorySampler:
    """Reads ``source`` every SAMPLE_INTERVAL seconds into a `History`, from the loop."""

    def __init__(
        self, source: Callable[[], Iterable[ServiceSample]], clock: Callable[[], float]
    ) -> None:
        self.history = History()
        self._source = source
        self._clock = clock
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._tick()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self.history.record(self._clock(), self._source())
        self._handle = asyncio.get_running_loop().call_later(SAMPLE_INTERVAL, self._tick)

    def annotate(self, document: dict[str, Any]) -> dict[str, Any]:
        return self.history.annotate(document)
