"""Metrics of the daemon as a whole, read from /metrics: capacity, limits, workers."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from support import (
    WORKERS_READY,
    admin_url,
    echo_server,
    get_json,
    metric_samples,
    service_config,
    toml_table,
    wait_until,
    write_config,
)


def config(tmp_path: Path, backend: str, **global_keys: object) -> str:
    return str(
        write_config(
            tmp_path,
            toml_table("global", grace_period="2s", **global_keys)
            + toml_table("admin", listen="127.0.0.1:0")
            + service_config(backend, name="mail", max_connections=7)
            + service_config(backend, name="web"),
        )
    )


def test_capacity_is_the_descriptor_limit_unless_max_connections_is_lower(run_tcpfwd, tmp_path):
    with echo_server() as backend:
        proxy = run_tcpfwd("run", "--config", config(tmp_path, backend.address))
        url = admin_url(proxy)
        status = get_json(url + "/status")
        found = metric_samples(url)
        assert found[("tcpfwd_sessions_capacity", ())] == status["sessions"]["capacity"]
        assert status["sessions"]["capacity"] > 100
        # Only services with a limit have one.
        assert found[("tcpfwd_service_max_connections", (("service", "mail"),))] == 7
        assert not any(
            name == "tcpfwd_service_max_connections" and labels == (("service", "web"),)
            for name, labels in found
        )
        assert found[("tcpfwd_build_info", (("version", status["version"]),))] == 1
        assert found[("tcpfwd_start_time_seconds", ())] == status["started"]
        # A single process has no workers to count.
        assert not any(name.startswith("tcpfwd_worker") for name, _ in found)
        proxy.stop()

        limited = tmp_path / "limited"
        limited.mkdir()
        proxy = run_tcpfwd("run", "--config", config(limited, backend.address, max_connections=50))
        assert metric_samples(admin_url(proxy))[("tcpfwd_sessions_capacity", ())] == 50


def test_workers_are_counted_and_a_replaced_one_counts_a_restart(run_tcpfwd, tmp_path):
    with echo_server() as backend:
        path = config(tmp_path, backend.address, workers=2, max_connections=50)
        proxy = run_tcpfwd("run", "--config", path, ready=WORKERS_READY)
        url = admin_url(proxy)
        try:
            # Each worker applies the limits on its own: the supervisor sums its snapshots.
            capacity = ("tcpfwd_sessions_capacity", ())
            wait_until(lambda: metric_samples(url)[capacity] == 100, "both workers' snapshots")
            found = metric_samples(url)
            assert found[("tcpfwd_workers", ())] == 2
            for index in ("0", "1"):
                assert found[("tcpfwd_worker_up", (("worker", index),))] == 1
                assert found[("tcpfwd_worker_restarts_total", (("worker", index),))] == 0
            assert found[("tcpfwd_service_max_connections", (("service", "mail"),))] == 14
            workers = get_json(url + "/status")["workers"]
            victim = next(w["pid"] for w in workers if w["index"] == 0)
            os.kill(victim, signal.SIGKILL)

            def restarted() -> bool:
                now = metric_samples(url)
                return (
                    now[("tcpfwd_worker_restarts_total", (("worker", "0"),))] == 1
                    and now[("tcpfwd_worker_up", (("worker", "0"),))] == 1
                )

            wait_until(restarted, "worker 0 restarted and ready")
            found = metric_samples(url)
            assert found[("tcpfwd_worker_restarts_total", (("worker", "1"),))] == 0
        finally:
            proxy.kill()
            proxy.kill_workers()
