"""The shipped Grafana dashboard is well formed; tests/e2e/test_prometheus.py runs its
queries."""

from __future__ import annotations

import json

from support import ROOT

DASHBOARD = json.loads((ROOT / "deploy" / "grafana" / "tcpfwd.json").read_text())
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def test_every_panel_reads_the_chosen_prometheus():
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in PANELS:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_panels_have_ids_titles_and_do_not_overlap():
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in DASHBOARD["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_the_panels_cover_what_an_operator_watches():
    expressions = " ".join(t["expr"] for p in PANELS for t in p["targets"])
    for metric in (
        "tcpfwd_sessions_total",
        "tcpfwd_backend_sessions_total",
        "tcpfwd_failovers_total",
        "tcpfwd_backend_attempts_total",
        "tcpfwd_backend_up",
        "tcpfwd_connect_duration_seconds_bucket",
        "tcpfwd_bytes_total",
        "tcpfwd_connections_rejected_total",
        "tcpfwd_sessions_capacity",
        "tcpfwd_service_max_connections",
        "tcpfwd_worker_restarts_total",
    ):
        assert metric in expressions, metric
    assert "histogram_quantile(0.99" in expressions
