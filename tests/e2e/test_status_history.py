"""The status page's last hour, in /status and drawn as SVG sparklines in headless Chromium."""

from __future__ import annotations

from pathlib import Path

import pytest

from observability import Figures, points, rendered_dom
from support import (
    READY,
    WORKERS_READY,
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
from tcpfwd.vocabulary import Outcome

TRAFFIC = 30


def start(run_tcpfwd, tmp_path: Path, dead: str, live: str, workers: int):
    config = write_config(
        tmp_path,
        toml_table("global", workers=workers, grace_period="5s")
        + toml_table("admin", listen="127.0.0.1:0")
        + service_config(named_backends(a=dead, b=live), name="mail"),
    )
    return run_tcpfwd("run", "--config", str(config), ready=WORKERS_READY if workers > 1 else READY)


def last(series: list[float | None]) -> float:
    value = series[-1]
    assert value is not None
    return value


def traffic_in_history(url: str) -> dict:
    """The service's status once its history shows b's sessions and a's fall."""

    def shown() -> dict | None:
        # Workers' snapshots arrive each on its own second: wait for both facts.
        (service,) = get_json(url + "/status")["services"]
        sessions = service["backends"][1]["history"]["sessions_per_s"]
        changes = service["backends"][0]["history"]["changes"]
        return service if last(sessions) > 0 and changes else None

    found: dict = wait_until(shown, "the traffic in the history")
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_status_json_carries_the_last_hour_of_each_service_and_backend(
    run_tcpfwd, tmp_path, workers
):
    with refused_port() as dead, echo_server() as live:
        proxy = start(run_tcpfwd, tmp_path, dead, live.address, workers)
        url = admin_url(proxy)
        first = wait_until(lambda: get_json(url + "/status").get("history"), "history")
        assert first["step"] == 10 and first["span"] == 3600
        for _ in range(TRAFFIC):
            assert exchange(proxy.address("mail"), b"ping") == b"ping"

        service = traffic_in_history(url)
        history = service["history"]
        assert len(history["sessions_per_s"]) == len(history["failovers_per_min"]) >= 1
        # The refused first attempt: one failover, all of it on backend a.
        assert last(history["failovers_per_min"]) > 0
        a, b = service["backends"]
        assert last(a["history"]["failovers_per_min"]) > 0
        assert last(a["history"]["sessions_per_s"]) == 0
        assert last(b["history"]["sessions_per_s"]) > 0
        assert last(b["history"]["failovers_per_min"]) == 0
        # Health: a went down on the refusal (when and why), b stayed up.
        (change,) = a["history"]["changes"]
        assert change["health"] == "down" and Outcome.REFUSED in change["reason"]
        assert abs(change["at"] - a["last_change"]) < 0.01
        assert last(a["history"]["up"]) < 1, "down for part of the bucket in progress"
        assert b["history"]["up"][-1] == 1 and b["history"]["changes"] == []


def sessions_line(figures: Figures, backend: str | None = None) -> list[tuple[float, float]]:
    where = {"data_backend": backend} if backend else {"data_history": "service"}
    lines = figures.find("polyline", data_series="sessions_per_s", **where)
    assert lines, "no sessions sparkline"
    return [point for line in lines for point in points(line)]


@pytest.mark.parametrize("workers", [1, 2])
def test_sparklines_are_drawn_and_move_after_traffic(run_tcpfwd, tmp_path, workers):
    with refused_port() as dead, echo_server() as live:
        proxy = start(run_tcpfwd, tmp_path, dead, live.address, workers)
        url = admin_url(proxy)
        wait_until(lambda: get_json(url + "/status").get("history"), "history")
        before = Figures(rendered_dom(tmp_path, url + "/"))
        # One SVG per service and per backend, each with a line of points.
        assert before.find("svg", data_history="service")
        assert len([s for s in before.find("svg") if s.get("data-backend")]) == 2
        quiet = sessions_line(before)
        assert len(quiet) >= 2
        assert len({y for _, y in quiet}) == 1, "no traffic yet: a flat line"
        for _ in range(TRAFFIC):
            assert exchange(proxy.address("mail"), b"ping") == b"ping"
        traffic_in_history(url)
        after = Figures(rendered_dom(tmp_path, url + "/"))
        busy = sessions_line(after)
        assert busy != quiet
        assert min(y for _, y in busy) < min(y for _, y in quiet), "the line rose"
        (baseline,) = {y for _, y in sessions_line(before, "b")}
        assert {y for _, y in sessions_line(before, "a")} == {baseline}
        assert min(y for _, y in sessions_line(after, "b")) < baseline
        assert {y for _, y in sessions_line(after, "a")} == {baseline}, "a served nobody"
        # Backend a's health strip turned red, with a mark where it changed.
        strip = {r["class"] for r in after.find("rect", data_backend="a", data_series="up")}
        assert strip & {"down", "partly"}
        assert after.find("line", data_backend="a", **{"class": "change"})
        assert {r["class"] for r in after.find("rect", data_backend="b")} == {"up"}
