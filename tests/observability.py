"""Test peers for observability: a real Prometheus, and pages rendered by headless Chromium.

A Prometheus runs in the foreground on a loopback port with its own configuration and
data directory under the test's ``tmp_path``, scraping every second, and is stopped by
its own PID at the end of its ``with`` block. Chromium runs headless, once per page
load. A binary that is not installed skips the test that asks for it
(``.ci/setup.sh`` and ``.ci/install-peers.sh`` install them).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from browser import CHROMIUM, HEADLESS
from support import LOOPBACK, free_port, wait_until

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
SCRAPE_INTERVAL = "500ms"


# --- Prometheus ---------------------------------------------------------------------------


class Prometheus:
    """A running Prometheus and its HTTP API."""

    def __init__(self, process: subprocess.Popen[str], url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as reply:
                document = json.load(reply)
        except urllib.error.HTTPError as error:
            document = json.load(error)
        return document

    def query(self, expression: str) -> list[dict[str, Any]]:
        """An instant query's result vector; fails on any error Prometheus reports."""
        document = self.api("query", query=expression)
        assert document["status"] == "success", f"{expression}: {document}"
        result: list[dict[str, Any]] = document["data"]["result"]
        return result

    def value(self, expression: str) -> float | None:
        """The single value of a query that yields one series, or None when it yields none."""
        result = self.query(expression)
        if not result:
            return None
        assert len(result) == 1, f"{expression}: {result}"
        return float(result[0]["value"][1])

    def values(self, expression: str, *labels: str) -> dict[tuple[str, ...], float]:
        """Each series' value, keyed by the given labels' values."""
        return {
            tuple(item["metric"].get(label, "") for label in labels): float(item["value"][1])
            for item in self.query(expression)
        }

    def target_health(self) -> list[str]:
        targets = self.api("targets")["data"]["activeTargets"]
        return [t["health"] for t in targets]


def prometheus_config(targets: list[str], rule_files: list[Path]) -> str:
    rules = "".join(f"  - {path}\n" for path in rule_files) or "  []\n"
    hosts = ", ".join(f'"{target}"' for target in targets)
    return (
        "global:\n"
        f"  scrape_interval: {SCRAPE_INTERVAL}\n"
        f"  scrape_timeout: {SCRAPE_INTERVAL}\n"
        f"  evaluation_interval: {SCRAPE_INTERVAL}\n"
        f"rule_files:\n{rules}"
        "scrape_configs:\n"
        "  - job_name: tcpfwd\n"
        f"    static_configs:\n      - targets: [{hosts}]\n"
    )


@contextlib.contextmanager
def running_prometheus(
    tmp_path: Path, targets: list[str], rule_files: Sequence[Path] = ()
) -> Iterator[Prometheus]:
    """A Prometheus on loopback scraping ``targets`` (host:port) every second."""
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed")
    folder = tmp_path / "prometheus"
    folder.mkdir()
    config = folder / "prometheus.yml"
    config.write_text(prometheus_config(targets, list(rule_files)))
    port = free_port()
    log = folder / "prometheus.log"
    with open(log, "w") as stream:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address={LOOPBACK}:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=stream,
            stderr=subprocess.STDOUT,
            text=True,
        )
    prometheus = Prometheus(process, f"http://{LOOPBACK}:{port}", log)
    try:

        def ready() -> bool:
            assert process.poll() is None, log.read_text()[-3000:]
            with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as reply:
                return bool(reply.status == 200)

        wait_until(ready, "a ready Prometheus", 30)
        yield prometheus
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


# --- headless Chromium ------------------------------------------------------------------


def chromium(tmp_path: Path, *args: str, budget_ms: int = 5000) -> subprocess.CompletedProcess[str]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    command = [
        CHROMIUM,
        *HEADLESS,
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--virtual-time-budget={budget_ms}",
        "--window-size=1200,800",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def rendered_dom(tmp_path: Path, url: str) -> str:
    """The page's DOM once its scripts have run."""
    return chromium(tmp_path, "--dump-dom", url).stdout


class Figures(HTMLParser):
    """SVG shapes of the status page's sparklines, with the service and backend around them."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.shapes: list[dict[str, str]] = []
        self._stack: list[tuple[str, dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        context = dict(self._stack[-1][1]) if self._stack else {}
        for key in ("data-service", "data-backend", "data-history"):
            if key in attributes:
                context[key] = attributes[key]
        if tag in ("polyline", "rect", "line", "svg"):
            self.shapes.append({"tag": tag, **context, **attributes})
        if tag not in ("br", "meta", "link", "img", "input"):
            self._stack.append((tag, context))

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            if self._stack.pop()[0] == tag:
                break

    def find(self, tag: str, **wanted: str) -> list[dict[str, str]]:
        keys = {key.replace("_", "-"): value for key, value in wanted.items()}
        return [
            shape
            for shape in self.shapes
            if shape["tag"] == tag and all(shape.get(k) == v for k, v in keys.items())
        ]


def points(polyline: dict[str, str]) -> list[tuple[float, float]]:
    pairs = [pair.split(",") for pair in polyline["points"].split()]
    return [(float(x), float(y)) for x, y in pairs]
