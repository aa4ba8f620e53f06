"""The project's own standards, checked with the suite: lint, format, strict types, class
size and what a daemon imports at start."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys

import pytest

from support import ROOT


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_finds_nothing_to_fix():
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_code_is_formatted():
    result = run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_passes_strict_mypy():
    pytest.importorskip("mypy")
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_class_is_longer_than_300_lines():
    too_long = []
    for path in sorted((ROOT / "src" / "tcpfwd").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 300:
                    too_long.append(f"{path.name}: {node.name} ({length} lines)")
    assert not too_long, too_long


def test_a_daemon_loads_only_what_its_configuration_uses():
    """What serves connections imports neither the admin endpoint's HTTP and Prometheus
    stack, nor the pattern engine, nor the control commands' HTTP client: those come
    with the configuration (or command) that uses them, and cost RSS otherwise."""
    probe = (
        "import sys, tcpfwd.cli, tcpfwd.lifecycle, tcpfwd.server, tcpfwd.supervisor\n"
        "print(' '.join(sorted(sys.modules)))"
    )
    result = run(sys.executable, "-c", probe)
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    for heavy in ("aiohttp", "prometheus_client", "re2", "urllib.request", "tcpfwd.admin"):
        assert heavy not in loaded, f"{heavy} is imported at start"
