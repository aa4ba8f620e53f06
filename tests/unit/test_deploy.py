"""The shipped deployment files parse and agree with what tcpfwd does.

The Kubernetes manifests' configuration is checked by the real command in
tests/e2e/test_deploy.py.
"""

from __future__ import annotations

import configparser
from pathlib import Path

from support import ROOT

DEPLOY = ROOT / "deploy"


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def test_systemd_service_is_a_hardened_notify_service():
    service = unit(DEPLOY / "systemd" / "tcpfwd.service")["Service"]
    assert service["Type"] == "notify"
    assert "tcpfwd run --config /etc/tcpfwd/tcpfwd.toml" in service["ExecStart"]
    assert "-HUP" in service["ExecReload"]
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    for key, value in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert service[key] == value, key
    assert "WatchdogSec" in service


def test_systemd_socket_listens_where_the_example_config_does():
    sockets = [
        line.split("=", 1)[1].strip()
        for line in (DEPLOY / "systemd" / "tcpfwd.socket").read_text().splitlines()
        if line.startswith("ListenStream=")
    ]
    example = (ROOT / "examples" / "tcpfwd.toml").read_text()
    assert sockets
    for address in sockets:
        assert f'"{address}"' in example


def test_keepalived_config_is_balanced_and_checks_readiness():
    text = (DEPLOY / "keepalived" / "keepalived.conf").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert code.count("{") == code.count("}")
    assert "vrrp_instance" in code
    assert "http://127.0.0.1:8404/readyz" in code


def test_systemd_service_shows_the_transparent_mode_capabilities_as_an_option():
    """Commented out, ready to swap in: both lines, since the bounding set would
    otherwise take CAP_NET_ADMIN away again."""
    text = (DEPLOY / "systemd" / "tcpfwd.service").read_text()
    options = [line[1:] for line in text.splitlines() if line.startswith("#") and "=" in line]
    wanted = "CAP_NET_ADMIN CAP_NET_BIND_SERVICE"
    assert f"AmbientCapabilities={wanted}" in options
    assert f"CapabilityBoundingSet={wanted}" in options
    service = unit(DEPLOY / "systemd" / "tcpfwd.service")["Service"]
    # Hardening that would defeat it must stay out of the unit.
    assert "PrivateNetwork" not in service
    assert "AF_INET" in service["RestrictAddressFamilies"].split()
