"""The Prometheus exposition: metric families built from the counters at scrape time.

Only the admin endpoint serves them, so only a daemon with one imports this module (and
``prometheus_client`` with it). The counters themselves are plain integers and
histograms kept by `~.metrics`, which cost the data path a few additions per session.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .metrics import DaemonFigures, ServiceStats, outcome_label
from .vocabulary import AdminState, Outcome


class BackendView(Protocol):
    """What the exposition needs to know of a backend right now."""

    @property
    def name(self) -> str: ...

    @property
    def up(self) -> bool:
        """False only when health says down: a backend not yet checked nor tried is
        tried as an up one is, so it counts as up."""

    @property
    def admin_state(self) -> str: ...

    @property
    def active(self) -> int: ...

    @property
    def suspect(self) -> bool:
        """An attempt to it is overdue: new sessions try it after the others."""


class ServiceView(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def stats(self) -> ServiceStats: ...

    def backend_views(self) -> Iterable[BackendView]: ...


class TcpfwdCollector(Collector):
    """Builds every tcpfwd metric family from the live services at scrape time."""

    def __init__(self, services: Callable[[], Iterable[ServiceView]]) -> None:
        self._services = services

    def collect(self) -> Iterator[Metric]:
        services = list(self._services())
        sessions = CounterMetricFamily(
            "tcpfwd_sessions", "Sessions ended, by how they ended.", labels=["service", "end"]
        )
        active = GaugeMetricFamily("tcpfwd_sessions_active", "Live sessions.", labels=["service"])
        rejected = CounterMetricFamily(
            "tcpfwd_connections_rejected",
            "Connections closed at once, by cause.",
            labels=["service", "cause"],
        )
        transferred = CounterMetricFamily(
            "tcpfwd_bytes", "Bytes received from each side.", labels=["service", "direction"]
        )
        connect = HistogramMetricFamily(
            "tcpfwd_connect_duration_seconds",
            "From the first attempt to the backend connection a session used.",
            labels=["service"],
        )
        attempts = CounterMetricFamily(
            "tcpfwd_backend_attempts",
            "Connection attempts to backends, by outcome (ok, refused, timeout, ...).",
            labels=["service", "backend", "outcome"],
        )
        failovers = CounterMetricFamily(
            "tcpfwd_failovers",
            "Failed attempts after which the next backend was tried, by reason.",
            labels=["service", "reason"],
        )
        backend_sessions = CounterMetricFamily(
            "tcpfwd_backend_sessions",
            "Sessions joined to each backend.",
            labels=["service", "backend"],
        )
        backend_active = GaugeMetricFamily(
            "tcpfwd_backend_sessions_active",
            "Live sessions per backend.",
            labels=["service", "backend"],
        )
        up = GaugeMetricFamily(
            "tcpfwd_backend_up",
            "0 when health says down, else 1 (also before the backend was checked or tried).",
            labels=["service", "backend"],
        )
        admin = GaugeMetricFamily(
            "tcpfwd_backend_admin_state",
            "1 for the backend's administrative state (enabled, draining, disabled).",
            labels=["service", "backend", "state"],
        )
        hedges = CounterMetricFamily(
            "tcpfwd_backend_hedges",
            "Hedged attempts started because an attempt to this backend went unanswered "
            "past its hedge delay.",
            labels=["service", "backend"],
        )
        hedge_wins = CounterMetricFamily(
            "tcpfwd_backend_hedge_wins",
            "Hedged attempts to this backend that answered first and were used.",
            labels=["service", "backend"],
        )
        suspect = GaugeMetricFamily(
            "tcpfwd_backend_suspect",
            "1 while an attempt to the backend is overdue: new sessions try it last.",
            labels=["service", "backend"],
        )
        checks = HistogramMetricFamily(
            "tcpfwd_health_check_duration_seconds",
            "Duration of active health checks and recovery probes.",
            labels=["service", "backend"],
        )
        for service in services:
            stats = service.stats
            name = service.name
            for end, count in sorted(stats.ends.items()):
                sessions.add_metric([name, end], count)
            active.add_metric([name], stats.active)
            for cause, count in sorted(stats.rejected.items()):
                rejected.add_metric([name, cause], count)
            transferred.add_metric([name, "from_client"], stats.bytes_from_client)
            transferred.add_metric([name, "from_backend"], stats.bytes_from_backend)
            connect.add_metric(
                [name], stats.connect_seconds.cumulative(), stats.connect_seconds.total
            )
            reasons: Counter[str] = Counter()
            for backend_name, backend_stats in sorted(stats.backends.items()):
                outcomes: Counter[str] = Counter()
                for outcome, count in backend_stats.attempts.items():
                    outcomes[outcome_label(outcome)] += count
                for label, count in sorted(outcomes.items()):
                    attempts.add_metric([name, backend_name, label], count)
                    if label != Outcome.OK:
                        reasons[label] += count
            for reason, count in sorted(reasons.items()):
                failovers.add_metric([name, reason], count)
            for view in service.backend_views():
                backend_stats = stats.backend(view.name)
                backend_sessions.add_metric([name, view.name], backend_stats.sessions)
                backend_active.add_metric([name, view.name], view.active)
                up.add_metric([name, view.name], 1 if view.up else 0)
                hedges.add_metric([name, view.name], backend_stats.hedges)
                hedge_wins.add_metric([name, view.name], backend_stats.hedge_wins)
                suspect.add_metric([name, view.name], 1 if view.suspect else 0)
                for state in AdminState:
                    admin.add_metric(
                        [name, view.name, state], 1 if view.admin_state == state else 0
                    )
                if backend_stats.check_seconds.count:
                    checks.add_metric(
                        [name, view.name],
                        backend_stats.check_seconds.cumulative(),
                        backend_stats.check_seconds.total,
                    )
        yield from (
            sessions,
            active,
            rejected,
            transferred,
            connect,
            attempts,
            failovers,
            backend_sessions,
            backend_active,
            up,
            hedges,
            hedge_wins,
            suspect,
            admin,
            checks,
        )


# --- several processes: counters travel as JSON and are summed (workers.py) -------------


class DaemonCollector(Collector):
    """Metric families of the daemon as a whole (one process, or a supervisor)."""

    def __init__(self, figures: Callable[[], DaemonFigures]) -> None:
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        figures = self._figures()
        info = GaugeMetricFamily("tcpfwd_build_info", "Always 1; the version.", labels=["version"])
        info.add_metric([figures.version], 1)
        started = GaugeMetricFamily(
            "tcpfwd_start_time_seconds", "When the daemon started, in Unix time."
        )
        started.add_metric([], figures.started)
        capacity = GaugeMetricFamily(
            "tcpfwd_sessions_capacity",
            "Sessions the daemon can hold (descriptor limit or global max_connections).",
        )
        capacity.add_metric([], figures.capacity)
        limits = GaugeMetricFamily(
            "tcpfwd_service_max_connections",
            "A service's max_connections (times the workers, which apply it each).",
            labels=["service"],
        )
        for name, limit in sorted(figures.service_limits.items()):
            limits.add_metric([name], limit)
        yield from (info, started, capacity, limits)
        if not figures.workers:
            return
        configured = GaugeMetricFamily("tcpfwd_workers", "Worker processes configured.")
        configured.add_metric([], len(figures.workers))
        up = GaugeMetricFamily(
            "tcpfwd_worker_up",
            "1 while the worker runs and has said it is ready.",
            labels=["worker"],
        )
        restarts = CounterMetricFamily(
            "tcpfwd_worker_restarts",
            "Times the supervisor replaced a worker that exited unexpectedly.",
            labels=["worker"],
        )
        for worker in figures.workers:
            up.add_metric([str(worker.index)], 1 if worker.up else 0)
            restarts.add_metric([str(worker.index)], worker.restarts)
        yield from (configured, up, restarts)
