"""Counters kept on the data path.

Sessions update plain integers and fixed-bucket histograms as they end, which costs a few
additions; the Prometheus metric families are built from them only when /metrics is
scraped (`~.exposition`), so nothing on the data path pays for a registry or labels.
"""

from __future__ import annotations

import bisect
import errno
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from .vocabulary import Outcome

# Seconds: from a loopback connect to a long blackhole wait.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


# Attempt outcomes as the dialer words them (see the access log's ``failed=``), each its
# own label value, except a greeting mismatch, which carries the greeting's first word.
# Anything else is reduced to a word from a fixed set by `outcome_label`, so that no
# backend can mint label values: the detail stays in the access line.
_GREETING_MISMATCH: Final = Outcome.GREETING_MISMATCH
ATTEMPT_OUTCOMES: Final = frozenset(Outcome) - {_GREETING_MISMATCH}
# Rarer failures are named by their errno, lower-cased: a fixed set too.
_ERRNO_OUTCOMES = frozenset(name.lower() for name in errno.errorcode.values())
# The label of an outcome of no known kind.
OUTCOME_OTHER: Final = "other"


def outcome_label(outcome: str) -> str:
    """The metric label value of an attempt outcome, from a fixed set.

    ``greeting_mismatch:421`` becomes ``greeting_mismatch_4xx`` (the reply code's class);
    a mismatch whose first word is not a reply code, ``greeting_mismatch_other``; an
    outcome of no known kind, ``other``.
    """
    if outcome in _LABELS:
        # Already a label (counted as one): the same again.
        return outcome
    kind, _, detail = outcome.partition(":")
    if kind == _GREETING_MISMATCH:
        if len(detail) == 3 and detail.isascii() and detail.isdigit() and detail[0] in "12345":
            return f"{_GREETING_MISMATCH}_{detail[0]}xx"
        return f"{_GREETING_MISMATCH}_{OUTCOME_OTHER}"
    return OUTCOME_OTHER


def outcome_labels() -> frozenset[str]:
    """Every value `outcome_label` can return."""
    return _LABELS


_LABELS: Final = (
    ATTEMPT_OUTCOMES
    | _ERRNO_OUTCOMES
    | {f"{_GREETING_MISMATCH}_{c}xx" for c in "12345"}
    | {f"{_GREETING_MISMATCH}_{OUTCOME_OTHER}", OUTCOME_OTHER}
)


class Histogram:
    """Cumulative-on-read histogram with fixed upper bounds."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        """(upper bound, count at or below it) pairs ending with +Inf, as Prometheus wants."""
        buckets = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            buckets.append((repr(bound), float(running)))
        buckets.append(("+Inf", float(self.count)))
        return buckets


class BackendStats:
    __slots__ = ("active", "attempts", "check_seconds", "hedge_wins", "hedges", "sessions")

    def __init__(self) -> None:
        self.attempts: Counter[str] = Counter()
        self.sessions = 0
        # Hedges started because an attempt to this backend was overdue; hedged
        # attempts to it that won.
        self.hedges = 0
        self.hedge_wins = 0
        self.active = 0
        self.check_seconds = Histogram()


class ServiceStats:
    """Counters of one service, kept across reloads for as long as the service exists."""

    __slots__ = (
        "active",
        "backends",
        "bytes_from_backend",
        "bytes_from_client",
        "connect_seconds",
        "ends",
        "per_client",
        "rejected",
    )

    def __init__(self) -> None:
        self.active = 0
        self.per_client: dict[str, int] = {}
        self.rejected: Counter[str] = Counter()
        self.ends: Counter[str] = Counter()
        self.bytes_from_client = 0
        self.bytes_from_backend = 0
        self.connect_seconds = Histogram()
        self.backends: dict[str, BackendStats] = {}

    def backend(self, name: str) -> BackendStats:
        stats = self.backends.get(name)
        if stats is None:
            stats = self.backends[name] = BackendStats()
        return stats


def service_summary(stats: ServiceStats) -> dict[str, Any]:
    """A service's counters as /status shows them (one worker's, or all summed)."""
    return {
        "active": stats.active,
        "sessions_total": sum(stats.ends.values()),
        "ends": dict(stats.ends),
        "rejected": dict(stats.rejected),
        "rejected_total": sum(stats.rejected.values()),
        "bytes_from_client": stats.bytes_from_client,
        "bytes_from_backend": stats.bytes_from_backend,
    }


def histogram_to_dict(histogram: Histogram) -> dict[str, Any]:
    return {"counts": histogram.counts, "count": histogram.count, "total": histogram.total}


def add_histogram(into: Histogram, data: dict[str, Any]) -> None:
    counts = data["counts"]
    if len(counts) != len(into.counts):
        return  # other bucket bounds (another version): cannot be summed
    into.counts = [a + b for a, b in zip(into.counts, counts, strict=True)]
    into.count += data["count"]
    into.total += data["total"]


def stats_to_dict(stats: ServiceStats) -> dict[str, Any]:
    """The counters of ``stats`` as JSON-able data (the per-client table stays local)."""
    return {
        "active": stats.active,
        "rejected": dict(stats.rejected),
        "ends": dict(stats.ends),
        "bytes_from_client": stats.bytes_from_client,
        "bytes_from_backend": stats.bytes_from_backend,
        "connect_seconds": histogram_to_dict(stats.connect_seconds),
        "backends": {
            name: {
                "attempts": dict(backend.attempts),
                "sessions": backend.sessions,
                "hedges": backend.hedges,
                "hedge_wins": backend.hedge_wins,
                "active": backend.active,
                "check_seconds": histogram_to_dict(backend.check_seconds),
            }
            for name, backend in stats.backends.items()
        },
    }


def add_stats(into: ServiceStats, data: dict[str, Any], *, gauges: bool = True) -> None:
    """Add counters from ``stats_to_dict`` to ``into``; ``gauges``: live counts too."""
    if gauges:
        into.active += data["active"]
    into.rejected.update(data["rejected"])
    into.ends.update(data["ends"])
    into.bytes_from_client += data["bytes_from_client"]
    into.bytes_from_backend += data["bytes_from_backend"]
    add_histogram(into.connect_seconds, data["connect_seconds"])
    for name, backend_data in data["backends"].items():
        backend = into.backend(name)
        backend.attempts.update(backend_data["attempts"])
        backend.sessions += backend_data["sessions"]
        backend.hedges += backend_data.get("hedges", 0)
        backend.hedge_wins += backend_data.get("hedge_wins", 0)
        if gauges:
            backend.active += backend_data["active"]
        add_histogram(backend.check_seconds, backend_data["check_seconds"])


# --- the daemon as a whole: capacity, limits, workers ----------------------------------


@dataclass(frozen=True, slots=True)
class WorkerFigures:
    index: int
    up: bool
    restarts: int


@dataclass(frozen=True, slots=True)
class DaemonFigures:
    """What alerts on capacity and supervision need, read at scrape time.

    With workers these are the supervisor's sums: each worker applies the descriptor
    limit, ``[global] max_connections`` and each service's ``max_connections`` on its own.
    """

    version: str
    started: float
    # Sessions the daemon can hold: the descriptor-derived limit, or the global
    # max_connections where that is lower.
    capacity: int
    # Services with a max_connections, by name.
    service_limits: dict[str, int] = field(default_factory=dict)
    # Empty for a single process.
    workers: tuple[WorkerFigures, ...] = ()
