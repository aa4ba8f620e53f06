"""The shipped alert rules: promtool validates them and runs their unit tests.

``deploy/prometheus/tcpfwd-alerts.test.yml`` holds, for every rule, input series in which
it fires and a moment at which it must not; ``tests/e2e/test_prometheus.py`` loads the
same rules into a real Prometheus scraping a real tcpfwd.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from observability import PROMTOOL
from support import ROOT

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")

FOLDER = ROOT / "deploy" / "prometheus"
RULES = FOLDER / "tcpfwd-alerts.yml"
TESTS = FOLDER / "tcpfwd-alerts.test.yml"
# What an operator of tcpfwd needs to hear about, as the rules name it.
REQUIRED = {
    "TcpfwdScrapeFailing",
    "TcpfwdBackendDown",
    "TcpfwdServiceAllBackendsDown",
    "TcpfwdHighFailoverRate",
    "TcpfwdSessionsNearCapacity",
    "TcpfwdConnectionsRejectedByLimits",
    "TcpfwdUntrustedProxySources",
    "TcpfwdWorkerRestarting",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=FOLDER, capture_output=True, text=True, timeout=60, check=False
    )


def rules() -> list[dict]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_rules():
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_rules_pass():
    result = promtool("test", "rules", TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rules_cover_what_operators_need():
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_rule_has_a_case_that_fires_it_and_one_that_does_not():
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert fired == names
    assert quiet == names


def test_a_broken_rule_fails_its_unit_test(tmp_path):
    # The unit tests are not vacuous: a threshold moved past the test's series fails them.
    broken = RULES.read_text().replace("> 0.05", "> 0.5")
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)
    (tmp_path / TESTS.name).write_text(TESTS.read_text())
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "test", "rules", TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "TcpfwdHighFailoverRate" in result.stdout + result.stderr


def test_the_example_scrape_config_is_valid_and_names_the_job_the_rules_expect():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((FOLDER / "prometheus.yml").read_text())
    assert config["rule_files"] == [RULES.name]
    (job,) = config["scrape_configs"]
    scrape_failing = next(r for r in rules() if r["alert"] == "TcpfwdScrapeFailing")
    assert f'job="{job["job_name"]}"' in scrape_failing["expr"]
