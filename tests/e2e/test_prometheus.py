"""A real Prometheus scrapes a running tcpfwd: the stored series, the alert rules, the dashboard.

For each mode (one process; ``workers = 2``) one tcpfwd and one Prometheus run for the
module: Prometheus scrapes the admin endpoint every second and evaluates
``deploy/prometheus/tcpfwd-alerts.yml`` every second. The scenario then does known things
— sessions through a first backend that refuses, sessions to a service whose only backend
refuses, connections over a service's limit, connections from a source its PROXY setting
does not trust, and with workers a worker killed — and the tests compare what Prometheus
stored, which alerts it raised, and what every query of ``deploy/grafana/tcpfwd.json``
returns, with what was done.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from observability import PROMETHEUS, Prometheus, running_prometheus
from support import (
    READY,
    ROOT,
    WORKERS_READY,
    Tcpfwd,
    admin_url,
    echo_server,
    exchange,
    get_json,
    named_backends,
    refused_port,
    service_config,
    toml_table,
    wait_until,
    write_config,
)
from tcpfwd.vocabulary import End, Outcome, Reject

pytestmark = [
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed"),
    # One pytest worker runs the module, so each mode's tcpfwd and Prometheus start once.
    pytest.mark.xdist_group("prometheus"),
]

RULES = ROOT / "deploy" / "prometheus" / "tcpfwd-alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "tcpfwd.json"
MAIL_SESSIONS = 40
PAYLOAD = b"m" * 100
DEAD_SESSIONS = 3
UNTRUSTED = 2
# The dashboard's rate window when its queries are run here: wide enough to hold all of
# the scenario's traffic, which the module runs within a minute.
RATE_WINDOW = "1m"


def config_text(dead: str, live: str, workers: int) -> str:
    checked = {"check": "tcp", "interval": "0.5s"}
    return (
        toml_table("global", workers=workers, grace_period="2s")
        + toml_table("admin", listen="127.0.0.1:0")
        + service_config(
            [{"address": dead, "name": "a"}, {"address": live, "name": "b", "health": checked}],
            name="mail",
        )
        # Checked: with workers, the one that checks (worker 0) finds it down whoever served.
        + service_config([{"address": dead, "name": "gone", "health": checked}], name="dead")
        + service_config(named_backends(only=live), name="limited", max_connections=1)
        + service_config(
            named_backends(behind=live),
            name="proxied",
            accept_proxy=True,
            trusted_sources=["192.0.2.0/24"],
        )
    )


@dataclass
class Scenario:
    workers: int
    proxy: Tcpfwd
    prometheus: Prometheus
    url: str
    rejected_by_limit: int = 0
    held: list[socket.socket] = field(default_factory=list)
    killed_worker: int | None = None


def closed_by_tcpfwd(sock: socket.socket) -> bool:
    """True if tcpfwd closed the connection rather than joining it to the echo backend."""
    try:
        sock.sendall(b"x")
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def fill_the_limited_service(scenario: Scenario) -> None:
    """Hold one session per worker (its max_connections each), and be refused beyond."""
    address = scenario.proxy.address("limited")
    for _ in range(40):
        if len(scenario.held) == scenario.workers and scenario.rejected_by_limit >= 3:
            return
        sock = socket.create_connection(address, timeout=5)
        sock.settimeout(5)
        if closed_by_tcpfwd(sock):
            scenario.rejected_by_limit += 1
            sock.close()
            if scenario.rejected_by_limit == 1:
                wait_until(
                    lambda: rejections_stored(scenario.prometheus, "limited") == 1,
                    "the first rejection in Prometheus",
                )
        else:
            scenario.held.append(sock)
    raise AssertionError(f"held {len(scenario.held)}, refused {scenario.rejected_by_limit}")


def kill_a_worker(scenario: Scenario) -> None:
    """SIGKILL worker 1 (its pid from /status) and wait for its replacement to serve."""
    status = get_json(scenario.url + "/status")
    victim = next(w for w in status["workers"] if w["index"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    scenario.killed_worker = victim["pid"]

    def replaced() -> bool:
        workers = get_json(scenario.url + "/status")["workers"]
        again = next((w for w in workers if w["index"] == 1), None)
        return bool(
            again and again["pid"] != victim["pid"] and again["restarts"] == 1 and len(workers) == 2
        )

    wait_until(replaced, "worker 1 replaced")
    scenario.proxy.wait_for_event("worker 1 (pid", 20)


def sessions_stored(prometheus: Prometheus, service: str) -> float | None:
    return prometheus.value(f'sum(tcpfwd_sessions_total{{service="{service}"}})')


def rejections_stored(prometheus: Prometheus, service: str) -> float | None:
    return prometheus.value(f'sum(tcpfwd_connections_rejected_total{{service="{service}"}})')


def last_scrape(prometheus: Prometheus) -> float:
    return prometheus.value('timestamp(up{job="tcpfwd"})') or 0.0


def run_scenario(scenario: Scenario, dead_address: str) -> None:
    prometheus = scenario.prometheus
    # A first sample of every counter before the traffic, so that rates see all of it.
    first = 'tcpfwd_bytes_total{service="mail", direction="from_client"}'
    wait_until(lambda: prometheus.value(first) == 0, "a first scrape")
    if scenario.workers > 1:
        kill_a_worker(scenario)
    # In two halves, a scrape apart: counters that appear at their first increment then
    # have a sample before the second half, so their rates are rates.
    mail = scenario.proxy.address("mail")
    for _ in range(MAIL_SESSIONS // 2):
        assert exchange(mail, PAYLOAD) == PAYLOAD
    wait_until(lambda: sessions_stored(prometheus, "mail") == MAIL_SESSIONS // 2, "a scrape")
    for _ in range(MAIL_SESSIONS - MAIL_SESSIONS // 2):
        assert exchange(mail, PAYLOAD) == PAYLOAD
    # The dead service's sessions arrive over more than one scrape, so that its failover
    # rate is a rate (a counter seen only once has none).
    dead = scenario.proxy.address("dead")
    assert exchange(dead, b"") == b""
    wait_until(lambda: sessions_stored(prometheus, "dead") == 1, "the first dead session")
    for _ in range(DEAD_SESSIONS - 1):
        assert exchange(dead, b"") == b""
    for count in range(1, UNTRUSTED + 1):
        with socket.create_connection(scenario.proxy.address("proxied"), timeout=5) as sock:
            sock.settimeout(5)
            assert closed_by_tcpfwd(sock)
        wait_until(
            lambda n=count: rejections_stored(prometheus, "proxied") == n,  # type: ignore[misc]
            "a rejection",
        )
    fill_the_limited_service(scenario)
    wait_until(
        lambda: (
            sessions_stored(prometheus, "mail") == MAIL_SESSIONS
            and sessions_stored(prometheus, "dead") == DEAD_SESSIONS
            and rejections_stored(prometheus, "proxied") == UNTRUSTED
            and rejections_stored(prometheus, "limited") == scenario.rejected_by_limit
        ),
        "every session in Prometheus",
        30,
    )
    # And one more scrape of everything, so that every series has a rate.
    seen = time.time()
    wait_until(lambda: last_scrape(prometheus) > seen, "one more scrape")


@pytest.fixture(scope="module", params=[1, 2], ids=["single", "workers"])
def scenario(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    workers: int = request.param
    tmp_path = tmp_path_factory.mktemp(f"prometheus-{workers}")
    with refused_port() as dead, echo_server() as live, contextlib.ExitStack() as stack:
        config = write_config(tmp_path, config_text(dead, live.address, workers))
        # Started here, not by run_tcpfwd: it serves every test of the module.
        proxy = Tcpfwd(["run", "--config", str(config)], ready=None)
        # Run last first: the supervisor is killed before its workers, so that it cannot
        # replace them.
        stack.callback(proxy.kill_workers)
        stack.callback(proxy.kill)
        proxy.wait_for_event(WORKERS_READY if workers > 1 else READY, 20)
        url = admin_url(proxy)
        target = url.removeprefix("http://")
        prometheus = stack.enter_context(running_prometheus(tmp_path, [target], [RULES]))
        result = Scenario(workers, proxy, prometheus, url)
        stack.callback(lambda: [sock.close() for sock in result.held])
        run_scenario(result, dead)
        yield result


# --- the series Prometheus stored -------------------------------------------------------


def test_prometheus_scrapes_the_admin_endpoint(scenario: Scenario):
    assert scenario.prometheus.target_health() == ["up"]
    assert scenario.prometheus.value('up{job="tcpfwd"}') == 1


def test_stored_sessions_are_the_sessions_made(scenario: Scenario):
    by_end = scenario.prometheus.values("tcpfwd_sessions_total", "service", "end")
    assert by_end[("mail", End.CLIENT_CLOSED)] == MAIL_SESSIONS
    assert by_end[("dead", End.NO_BACKEND)] == DEAD_SESSIONS
    # Only the kinds of ends the scenario caused: an untrusted peer is turned away before
    # it becomes a session (it is a rejection, below).
    assert {key for key, value in by_end.items() if value} == {
        ("mail", End.CLIENT_CLOSED),
        ("dead", End.NO_BACKEND),
    }
    backend_sessions = scenario.prometheus.values(
        'tcpfwd_backend_sessions_total{service="mail"}', "backend"
    )
    assert backend_sessions == {("a",): 0, ("b",): MAIL_SESSIONS}
    held = scenario.prometheus.value('tcpfwd_sessions_active{service="limited"}')
    assert held == len(scenario.held)
    count = scenario.prometheus.value('tcpfwd_connect_duration_seconds_count{service="mail"}')
    assert count == MAIL_SESSIONS


def test_stored_failovers_are_counted_by_reason(scenario: Scenario):
    failovers = scenario.prometheus.values("tcpfwd_failovers_total", "service", "reason")
    # Each worker pays for the refusal once before marking the backend down.
    assert 1 <= failovers[("mail", Outcome.REFUSED)] <= scenario.workers
    assert failovers[("dead", Outcome.REFUSED)] == DEAD_SESSIONS
    assert set(failovers) == {("mail", Outcome.REFUSED), ("dead", Outcome.REFUSED)}
    attempts = scenario.prometheus.values(
        'tcpfwd_backend_attempts_total{service="mail"}', "backend", "outcome"
    )
    assert attempts[("b", Outcome.OK)] == MAIL_SESSIONS
    assert attempts[("a", Outcome.REFUSED)] == failovers[("mail", Outcome.REFUSED)]


def test_stored_backend_health_is_what_tcpfwd_found(scenario: Scenario):
    up = scenario.prometheus.values("tcpfwd_backend_up", "service", "backend")
    assert up == {
        ("mail", "a"): 0,
        ("mail", "b"): 1,
        ("dead", "gone"): 0,
        ("limited", "only"): 1,
        ("proxied", "behind"): 1,
    }
    # The active check of mail/b (and probes of the refusing ones) are timed.
    checks = scenario.prometheus.values(
        "tcpfwd_health_check_duration_seconds_count", "service", "backend"
    )
    assert checks[("mail", "b")] >= 1


def test_stored_bytes_are_the_bytes_sent(scenario: Scenario):
    transferred = scenario.prometheus.values('tcpfwd_bytes_total{service="mail"}', "direction")
    assert transferred == {
        ("from_client",): MAIL_SESSIONS * len(PAYLOAD),
        ("from_backend",): MAIL_SESSIONS * len(PAYLOAD),
    }


def test_stored_rejections_are_counted_by_cause(scenario: Scenario):
    rejected = scenario.prometheus.values("tcpfwd_connections_rejected_total", "service", "cause")
    assert rejected == {
        ("limited", Reject.SERVICE_LIMIT): scenario.rejected_by_limit,
        ("proxied", Reject.UNTRUSTED_SOURCE): UNTRUSTED,
    }


def test_stored_capacity_and_limits_are_the_daemons(scenario: Scenario):
    status = get_json(scenario.url + "/status")
    prometheus = scenario.prometheus
    assert prometheus.value("tcpfwd_sessions_capacity") == status["sessions"]["capacity"]
    limits = prometheus.values("tcpfwd_service_max_connections", "service")
    assert limits == {("limited",): scenario.workers}
    assert prometheus.value("tcpfwd_start_time_seconds") == pytest.approx(status["started"])
    assert prometheus.values("tcpfwd_build_info", "version") == {(status["version"],): 1}


def test_stored_workers_and_their_restarts(scenario: Scenario):
    prometheus = scenario.prometheus
    if scenario.workers == 1:
        assert prometheus.query('{__name__=~"tcpfwd_worker.*"}') == []
        return
    assert prometheus.value("tcpfwd_workers") == 2
    wait_until(
        lambda: prometheus.values("tcpfwd_worker_up", "worker") == {("0",): 1, ("1",): 1},
        "both workers up",
    )
    restarts = prometheus.values("tcpfwd_worker_restarts_total", "worker")
    assert restarts == {("0",): 0, ("1",): 1}


# --- the alert rules, evaluated by the same Prometheus ----------------------------------


def active_alerts(prometheus: Prometheus) -> set[tuple[str, ...]]:
    """Pending and firing alerts as (name, and the values of the labels that place it)."""
    found = set()
    for alert in prometheus.api("alerts")["data"]["alerts"]:
        labels = alert["labels"]
        where = [labels[k] for k in ("service", "backend", "cause", "worker") if k in labels]
        found.add((labels["alertname"], *where))
    return found


def expected_alerts(scenario: Scenario) -> set[tuple[str, ...]]:
    expected = {
        ("TcpfwdBackendDown", "mail", "a"),
        ("TcpfwdBackendDown", "dead", "gone"),
        ("TcpfwdServiceAllBackendsDown", "dead"),
        ("TcpfwdClientsTurnedAway", "dead"),
        ("TcpfwdHighFailoverRate", "dead"),
        ("TcpfwdServiceNearConnectionLimit", "limited"),
        ("TcpfwdConnectionsRejectedByLimits", "limited", Reject.SERVICE_LIMIT),
        ("TcpfwdUntrustedProxySources", "proxied", Reject.UNTRUSTED_SOURCE),
    }
    if scenario.workers > 1:
        expected.add(("TcpfwdWorkerRestarting", "1"))
    return expected


def test_every_rule_evaluates_against_the_real_series(scenario: Scenario):
    def evaluated() -> list[dict[str, Any]]:
        groups = scenario.prometheus.api("rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        done = all(rule["lastEvaluation"] > "2000" for rule in rules)
        return rules if done else []

    rules = wait_until(evaluated, "every rule evaluated")
    assert len(rules) == 11
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))


def test_alerts_fire_for_what_the_scenario_broke_and_for_nothing_else(scenario: Scenario):
    expected = expected_alerts(scenario)
    wait_until(
        lambda: expected <= active_alerts(scenario.prometheus),
        f"alerts {sorted(expected - active_alerts(scenario.prometheus))}",
    )
    unexpected = active_alerts(scenario.prometheus) - expected
    # A worker killed is briefly not up; TcpfwdWorkerDown waits a minute before firing.
    assert unexpected <= {("TcpfwdWorkerDown", "1")}, unexpected
    states = {
        alert["labels"]["alertname"]: alert["state"]
        for alert in scenario.prometheus.api("alerts")["data"]["alerts"]
    }
    # Rules without a waiting time fire at once.
    assert states["TcpfwdClientsTurnedAway"] == "firing"
    assert states["TcpfwdUntrustedProxySources"] == "firing"
    if scenario.workers > 1:
        assert states["TcpfwdWorkerRestarting"] == "firing"


# --- the dashboard's queries --------------------------------------------------------------


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every query target in the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    return queries


def variable_queries() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        variable["name"]: variable["query"]
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    }


# What Grafana puts in place of the dashboard's variables: every instance, service and
# backend ("All"), and a rate window covering the scenario.
SUBSTITUTIONS = {
    "$__rate_interval": RATE_WINDOW,
    "$job": "tcpfwd",
    "$instance": ".+",
    "$service": ".+",
    "$backend": ".+",
}


def substituted(expression: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expression = expression.replace(variable, value)
    assert "$" not in expression, f"a variable this test does not know: {expression}"
    return expression


def test_dashboard_variables_list_what_runs(scenario: Scenario):
    queries = variable_queries()
    assert set(queries) == {"job", "instance", "service", "backend"}
    found = {}
    for name, query in queries.items():
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
        assert match, query
        selector, label = substituted(match.group(1)), match.group(2)
        series = scenario.prometheus.api("series", **{"match[]": selector})
        assert series["status"] == "success", series
        found[name] = {each[label] for each in series["data"]}
    assert found["job"] == {"tcpfwd"}
    assert found["instance"] == {scenario.url.removeprefix("http://")}
    assert found["service"] == {"mail", "dead", "limited", "proxied"}
    assert found["backend"] == {"a", "b", "gone", "only", "behind"}


def test_every_dashboard_query_runs_and_the_panels_have_data(scenario: Scenario):
    queries = dashboard_queries()
    assert len(queries) >= 20
    empty = []
    for title, expression in queries:
        result = scenario.prometheus.query(substituted(expression))
        values = [float(item["value"][1]) for item in result]
        if not any(math.isfinite(value) for value in values):
            empty.append(title)
    # Only the panels of workers stay empty for a single process.
    workers_panels = {"Workers", "Worker restarts"}
    assert set(empty) == (set() if scenario.workers > 1 else workers_panels)
    titles = {title for title, _ in queries}
    assert workers_panels <= titles


def test_every_metric_the_rules_and_dashboard_read_is_stored(scenario: Scenario):
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    expressions = [rule["expr"] for rule in rules]
    expressions += [expression for _, expression in dashboard_queries()]
    expressions += list(variable_queries().values())
    names = {name for e in expressions for name in re.findall(r"\btcpfwd_[a-z_]+", e)}
    assert len(names) >= 15
    stored = set(scenario.prometheus.api("label/__name__/values")["data"])
    missing = names - stored
    if scenario.workers == 1:
        missing -= {"tcpfwd_worker_up", "tcpfwd_worker_restarts_total"}
    assert missing == set()


def test_prometheus_loaded_the_shipped_rules_file(scenario: Scenario):
    files = {g["file"] for g in scenario.prometheus.api("rules")["data"]["groups"]}
    assert files == {str(RULES)}
