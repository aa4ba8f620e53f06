"""Workers' status snapshots: how a supervisor knows what its workers know.

Every second each worker writes a JSON snapshot of its status and counters into the
supervisor's private runtime folder (``worker-N.json``, replaced atomically). The
supervisor reads the snapshots of its live workers and sums them into one `Overview`:
counters added up, with those of exited workers kept (``retire``) so that they do not
go back; backend health from the lowest worker that knows it (worker 0 runs the active
checks; passive marks are per worker).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from .config import Config
from .daemonstate import RECENT_FAILOVERS
from .health import UNKNOWN
from .metrics import ServiceStats, add_stats, stats_to_dict
from .status import DETAIL_KEYS, BackendReading, Overview, ServiceReading
from .vocabulary import AdminState

log = logging.getLogger("tcpfwd")

Snapshot = dict[str, Any]


def snapshot_path(runtime: str, index: int) -> str:
    return os.path.join(runtime, f"worker-{index}.json")


def write_snapshot(path: str, snapshot: Snapshot) -> None:
    """Replace the snapshot at ``path`` at once: a reader sees the old or the new one."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(snapshot, stream, separators=(",", ":"))
        os.replace(temporary, path)
    except OSError as error:
        log.warning("cannot write status snapshot %s: %s", path, error)


def read_snapshot(path: str) -> Snapshot | None:
    try:
        with open(path, encoding="utf-8") as stream:
            data: Snapshot = json.load(stream)
    except (OSError, ValueError):
        return None
    return data


def _health_entries(
    snapshots: list[Snapshot],
) -> tuple[dict[tuple[str, str], dict[str, Any]], set[tuple[str, str]]]:
    """Each backend's status entry from the lowest worker that has a verdict on it, and
    the backends any worker finds suspect (each dials on its own)."""
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    suspects: set[tuple[str, str]] = set()
    for snapshot in sorted(snapshots, key=lambda s: int(s["index"])):
        for service in snapshot["status"]["services"]:
            for backend in service["backends"]:
                key = (service["name"], backend["name"])
                have = entries.get(key)
                if have is None or (have["health"] == UNKNOWN and backend["health"] != UNKNOWN):
                    entries[key] = backend
                if backend.get("suspect"):
                    suspects.add(key)
    return entries, suspects


class Snapshots:
    """A supervisor's reading of its workers' snapshots, and what exited workers counted."""

    def __init__(self) -> None:
        # The runtime folder; made once privileges are dropped, so the workers may write.
        self.runtime = ""
        # Counters of workers that have exited, by service.
        self.retired: dict[str, ServiceStats] = {}

    def current(self, live: Iterable[tuple[int, int]]) -> list[Snapshot]:
        """The snapshots of the live workers given as (index, pid)."""
        found = []
        for index, pid in live:
            snapshot = read_snapshot(snapshot_path(self.runtime, index))
            if snapshot is not None and snapshot.get("pid") == pid:
                found.append(snapshot)
        return found

    def retire(self, index: int, config: Config) -> None:
        """Keep the counters of worker ``index``, which has exited; drop its file."""
        path = snapshot_path(self.runtime, index)
        snapshot = read_snapshot(path)
        if snapshot is not None:
            configured = {s.name for s in config.services}
            for name, data in snapshot["stats"].items():
                if name in configured:
                    add_stats(self.retired.setdefault(name, ServiceStats()), data, gauges=False)
        with contextlib.suppress(OSError):
            os.unlink(path)

    def forget_removed(self, config: Config) -> None:
        """Drop what exited workers counted for services ``config`` no longer has."""
        for name in [n for n in self.retired if all(s.name != n for s in config.services)]:
            del self.retired[name]

    def _merged(self, snapshots: list[Snapshot], config: Config) -> dict[str, ServiceStats]:
        merged: dict[str, ServiceStats] = {}
        for service in config.services:
            stats = merged[service.name] = ServiceStats()
            retired = self.retired.get(service.name)
            if retired is not None:
                add_stats(stats, stats_to_dict(retired), gauges=False)
            for snapshot in snapshots:
                data = snapshot["stats"].get(service.name)
                if data is not None:
                    add_stats(stats, data)
        return merged

    def overview(
        self,
        snapshots: list[Snapshot],
        config: Config,
        admin_states: Mapping[tuple[str, str], AdminState],
    ) -> Overview:
        """Every worker's services summed, as one daemon's."""
        merged = self._merged(snapshots, config)
        health, suspects = _health_entries(snapshots)
        listening: dict[str, list[str]] = {}
        for snapshot in snapshots[:1]:
            for service in snapshot["status"]["services"]:
                listening[service["name"]] = service["listen"]
        services = []
        for service in config.services:
            stats = merged[service.name]
            backends = []
            for backend in service.backends:
                key = (service.name, backend.name)
                entry = health.get(key, {})
                backends.append(
                    BackendReading(
                        name=backend.name,
                        address=str(backend.address),
                        admin_state=admin_states.get(key, AdminState.ENABLED),
                        active=stats.backend(backend.name).active,
                        health=entry.get("health", UNKNOWN),
                        suspect=key in suspects,
                        detail={k: entry[k] for k in DETAIL_KEYS if k in entry},
                    )
                )
            services.append(
                ServiceReading(
                    name=service.name,
                    policy=service.settings.policy,
                    listen=listening.get(service.name, []),
                    stats=stats,
                    backends=backends,
                )
            )
        failovers = [f for s in snapshots for f in s["status"]["recent_failovers"]]
        failovers.sort(key=lambda f: str(f.get("time", "")))
        return Overview(
            services=services,
            sessions={
                "active": sum(s["status"]["sessions"]["active"] for s in snapshots),
                "capacity": sum(s["status"]["sessions"]["capacity"] for s in snapshots),
            },
            recent_failovers=failovers[-RECENT_FAILOVERS:],
        )
