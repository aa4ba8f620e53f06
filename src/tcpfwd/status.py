"""The one status builder: what the daemon knows now, as /status, history and metrics read it.

A daemon (the single process, or a supervisor summing its workers) describes its services
as readings: `ServiceReading` and `BackendReading`. From them alone come the /status
document (and the status page and ``tcpfwd status``, which show it), the samples of the
status page's last hour, and the metric families (a reading is a `metrics.ServiceView`),
so that every view says the same of the same backend.

A backend's health is shown as ``up``, ``down`` or ``unknown``: unknown until it has been
checked or tried (see `health.shown_state`). Unknown is shown, not acted upon: such a
backend is tried as an up one is, and ``tcpfwd_backend_up`` counts it as up.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .config import Config
from .health import BackendHealth, HealthState
from .history import ServiceSample, service_sample
from .metrics import DaemonFigures, ServiceStats, WorkerFigures, service_summary
from .vocabulary import AdminState, Outcome

__all__ = [
    "BackendReading",
    "Overview",
    "ServiceReading",
    "daemon_figures",
    "health_detail",
    "history_samples",
    "status_document",
]

# What a backend's status entry says of its health besides up/down/unknown.
DETAIL_KEYS = ("reason", "last_change", "last_check", "last_check_at")


@dataclass(slots=True)
class BackendReading:
    """A backend as every view of the daemon sees it right now."""

    name: str
    address: str
    admin_state: AdminState
    # Attempts and sessions in progress on it (the service's counters say the rest).
    active: int
    # up, down or unknown
    health: str
    # An attempt to it is overdue: new sessions try it after the others.
    suspect: bool = False
    # Why and since when, its last check: the entries of DETAIL_KEYS that are known.
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def up(self) -> bool:
        """As the data plane and the metrics take it: anything but down is tried."""
        return self.health != HealthState.DOWN


@dataclass(slots=True)
class ServiceReading:
    """A service, its counters (one process's, or every worker's summed) and backends."""

    name: str
    policy: str
    listen: list[str]
    stats: ServiceStats
    backends: list[BackendReading]

    def backend_views(self) -> list[BackendReading]:
        return self.backends


def health_detail(health: BackendHealth | None) -> dict[str, Any]:
    """The detail of a backend's status entry from its health (None: not tracked)."""
    if health is None:
        return {}
    detail: dict[str, Any] = {"reason": health.last_reason, "last_change": health.last_change}
    if health.last_check_at is not None:
        result = "ok" if health.last_check_ok else "failed"
        found = health.last_check_detail
        detail["last_check"] = f"{result}: {found}" if found else result
        detail["last_check_at"] = health.last_check_at
    return detail


def _backend_entry(backend: BackendReading, stats: ServiceStats) -> dict[str, Any]:
    counted = stats.backend(backend.name)
    return {
        "name": backend.name,
        "address": backend.address,
        "health": backend.health,
        "suspect": backend.suspect,
        "admin_state": backend.admin_state,
        "active": backend.active,
        "sessions_total": counted.sessions,
        "failed_attempts": sum(n for o, n in counted.attempts.items() if o != Outcome.OK),
        "attempts": dict(counted.attempts),
        **backend.detail,
    }


def _service_entry(service: ServiceReading) -> dict[str, Any]:
    return {
        "name": service.name,
        "listen": service.listen,
        "policy": service.policy,
        **service_summary(service.stats),
        "backends": [_backend_entry(b, service.stats) for b in service.backends],
    }


@dataclass(slots=True)
class Overview:
    """One reading of the whole daemon, taken at once."""

    services: list[ServiceReading]
    # Live sessions and how many the descriptors allow ("active", "capacity").
    sessions: dict[str, int]
    recent_failovers: list[dict[str, Any]]
    # A supervisor's workers, each as /status shows it; None for a single process.
    workers: list[dict[str, Any]] | None = None


def status_document(
    overview: Overview, *, started: float, state: str, config: Config
) -> dict[str, Any]:
    """Everything the status page shows, as JSON-able data."""
    document: dict[str, Any] = {
        "version": __version__,
        "pid": os.getpid(),
        "started": started,
        "uptime_s": time.time() - started,
        "state": state,
        "config": config.source,
        "sessions": dict(overview.sessions),
    }
    if overview.workers is not None:
        document["workers"] = overview.workers
    document["services"] = [_service_entry(s) for s in overview.services]
    document["recent_failovers"] = overview.recent_failovers
    return document


def history_samples(services: Iterable[ServiceReading]) -> list[ServiceSample]:
    """One reading of each service for the status page's last hour."""
    return [
        service_sample(
            service.name,
            service.stats,
            [
                (b.name, b.up, b.detail.get("last_change"), b.detail.get("reason"))
                for b in service.backends
            ],
        )
        for service in services
    ]


def daemon_figures(
    config: Config,
    started: float,
    capacities: Iterable[int],
    *,
    processes: int = 1,
    workers: tuple[WorkerFigures, ...] = (),
) -> DaemonFigures:
    """The daemon as a whole: ``capacities`` of each serving process (each applies the
    global max_connections and every service's limit on its own)."""
    limit = config.max_connections
    return DaemonFigures(
        version=__version__,
        started=started,
        capacity=sum(c if limit is None else min(c, limit) for c in capacities),
        service_limits={
            s.name: s.settings.max_connections * processes
            for s in config.services
            if s.settings.max_connections is not None
        },
        workers=workers,
    )
