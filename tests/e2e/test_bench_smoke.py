"""Smoke test of the benchmark script: it runs end to end and its table holds sane figures.

Only the script is under test, never the performance: no figure is compared with a
target. The sizes are the smallest that exercise every code path of the two scenarios
(about 25 s with HAProxy and nginx installed).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT

BENCH = ROOT / "bench" / "run.py"

pytestmark = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (bench/install.sh)"
)


def _table_rows(stdout: str) -> list[list[str]]:
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in stdout.splitlines()
        if line.startswith("|")
    ]
    assert rows, f"no markdown table in:\n{stdout}"
    return rows


def test_quick_bench_prints_a_table_of_positive_figures_for_short_connections_and_failover(
    tmp_path: Path,
) -> None:
    report = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--quick",
            "--scenarios",
            "short,failover",
            "--repeat",
            "1",
            "--duration",
            "1",
            "--failover-connections",
            "20",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("Machine: nproc ")

    rows = _table_rows(done.stdout)
    header, separator, body = rows[0], rows[1], rows[2:]
    assert header[:2] == ["scenario", "figure"]
    assert {"direct", "tcpfwd"} <= set(header[2:])
    assert all(set(cell) <= {"-"} for cell in separator)
    assert all(len(row) == len(header) for row in body)
    assert {row[0] for row in body} == {"short", "failover"}

    figures = json.loads(report.read_text())["figures"]
    by_key = {(f["scenario"], f["figure"], f["contender"]): f for f in figures}
    assert by_key[("short", "connections/s", "direct")]["median"] > 0
    assert by_key[("short", "connections/s", "tcpfwd")]["median"] > 0
    assert by_key[("short", "proxy CPU us per connection", "tcpfwd")]["median"] > 0
    for figure in figures:
        assert math.isfinite(figure["median"])
        assert figure["min"] <= figure["median"] <= figure["max"]
        if "timeout" in figure["figure"] or "failed" in figure["figure"]:
            assert figure["median"] >= 0
        elif "added latency" not in figure["figure"]:  # may dip below the baseline
            assert figure["median"] > 0, figure
    # A refusing first backend costs a reset, never the connect timeout, whoever proxies.
    refused = [f for f in figures if f["figure"].startswith("refusing: connections paying")]
    assert refused and all(f["median"] == 0 for f in refused)
    assert by_key[("failover", "blackholed: connections paying a timeout (of 20)", "tcpfwd")]
