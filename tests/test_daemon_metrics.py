"""Metrics of the daemon as a whole, read from /metrics: capacity, limits, workers."""

from __future__ import annotations

import contextlib
import os
import signal
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from observability import admin_url, get_json, wait_until
from support import echo_server

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(url: str) -> Samples:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        body = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def config(tmp_path: Path, backend: str, global_extra: str = "") -> str:
    path = tmp_path / "tcpfwd.toml"
    path.write_text(
        f'[global]\ngrace_period = "2s"\n{global_extra}\n'
        '[admin]\nlisten = "127.0.0.1:0"\n\n'
        f'[services.mail]\nlisten = "127.0.0.1:0"\nmax_connections = 7\nbackends = ["{backend}"]\n'
        f'[services.web]\nlisten = "127.0.0.1:0"\nbackends = ["{backend}"]\n'
    )
    return str(path)


def test_capacity_is_the_descriptor_limit_unless_max_connections_is_lower(run_tcpfwd, tmp_path):
    with echo_server() as backend:
        proxy = run_tcpfwd("run", "--config", config(tmp_path, backend.address))
        url = admin_url(proxy)
        status = get_json(url + "/status")
        found = samples(url)
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
        proxy = run_tcpfwd(
            "run", "--config", config(limited, backend.address, "max_connections = 50")
        )
        assert samples(admin_url(proxy))[("tcpfwd_sessions_capacity", ())] == 50


def test_workers_are_counted_and_a_replaced_one_counts_a_restart(run_tcpfwd, tmp_path):
    with echo_server() as backend:
        path = config(tmp_path, backend.address, "workers = 2\nmax_connections = 50")
        proxy = run_tcpfwd("run", "--config", path, wait_ready=False)
        proxy.wait_for_event("workers serving", 20)
        url = admin_url(proxy)
        pids: set[int] = set()
        try:
            # Each worker applies the limits on its own: the supervisor sums its snapshots.
            capacity = ("tcpfwd_sessions_capacity", ())
            wait_until(lambda: samples(url)[capacity] == 100, "both workers' snapshots")
            found = samples(url)
            assert found[("tcpfwd_workers", ())] == 2
            for index in ("0", "1"):
                assert found[("tcpfwd_worker_up", (("worker", index),))] == 1
                assert found[("tcpfwd_worker_restarts_total", (("worker", index),))] == 0
            assert found[("tcpfwd_service_max_connections", (("service", "mail"),))] == 14
            workers = get_json(url + "/status")["workers"]
            pids = {w["pid"] for w in workers}
            victim = next(w["pid"] for w in workers if w["index"] == 0)
            os.kill(victim, signal.SIGKILL)

            def restarted() -> bool:
                now = samples(url)
                return (
                    now[("tcpfwd_worker_restarts_total", (("worker", "0"),))] == 1
                    and now[("tcpfwd_worker_up", (("worker", "0"),))] == 1
                )

            wait_until(restarted, "worker 0 restarted and ready")
            found = samples(url)
            assert found[("tcpfwd_worker_restarts_total", (("worker", "1"),))] == 0
            pids |= {w["pid"] for w in get_json(url + "/status")["workers"]}
        finally:
            proxy.kill()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
