"""Transparent mode without a network: its configuration, the capability read from
/proc, and the one bind failure found before any socket exists. Transparent sessions in
real namespaces are tested in tests/e2e/test_transparent.py."""

from __future__ import annotations

import socket

import pytest

from support import config_issues, service
from tcpfwd.cli import _quick_config, _quick_parser
from tcpfwd.config import parse_config, quick_config
from tcpfwd.transparent import (
    CAP_NET_ADMIN,
    TransparentBindError,
    effective_capabilities,
    transparent_socket,
)


def test_transparent_socket_refuses_a_client_of_the_other_family():
    with pytest.raises(TransparentBindError, match="IPv6 but the backend is IPv4"):
        transparent_socket(socket.AF_INET, "fd77:5::5")
    with pytest.raises(TransparentBindError, match="IPv4 but the backend is IPv6"):
        transparent_socket(socket.AF_INET6, "10.77.5.5")


def transparent_flags(document: dict[str, object]) -> list[bool]:
    config = parse_config(document, "test")
    return [b.transparent for s in config.services for b in s.backends]


def test_transparent_is_off_by_default():
    assert transparent_flags({"services": {"a": service()}}) == [False]


def test_transparent_for_a_service_applies_to_its_backends():
    document = {
        "services": {"a": service(backends=["10.0.0.1:25", "10.0.0.2:25"], transparent=True)}
    }
    assert transparent_flags(document) == [True, True]


def test_transparent_in_defaults_applies_to_every_service():
    document = {
        "defaults": {"transparent": True},
        "services": {"a": service(), "b": service(listen="127.0.0.1:10026")},
    }
    assert transparent_flags(document) == [True, True]


def test_a_backend_table_overrides_transparent_either_way():
    backends = [
        {"address": "10.0.0.1:25", "transparent": True},
        "10.0.0.2:25",
        {"address": "10.0.0.3:25"},
    ]
    assert transparent_flags({"services": {"a": service(backends=backends)}}) == [
        True,
        False,
        False,
    ]
    backends[1] = {"address": "10.0.0.2:25", "transparent": False}
    assert transparent_flags({"services": {"a": service(backends=backends, transparent=True)}}) == [
        True,
        False,
        True,
    ]


def test_transparent_must_be_a_boolean():
    backends = [{"address": "10.0.0.1:25", "transparent": "yes"}]
    assert config_issues({"services": {"a": service(backends=backends, transparent=1)}}, "t") == [
        "services.a.transparent: expected true or false, got a number",
        "services.a.backends[0].transparent: expected true or false, got a string",
    ]


def test_quick_mode_transparent_flag():
    args = _quick_parser().parse_args(["127.0.0.1:10025", "10.0.0.1:25", "--transparent"])
    config = _quick_config(args)
    assert [b.transparent for b in config.services[0].backends] == [True]
    assert (
        quick_config("127.0.0.1:10025", ["10.0.0.1:25"]).services[0].backends[0].transparent
        is False
    )


def test_capabilities_are_read_from_proc_status(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t0000000000001000\n")
    caps = effective_capabilities(str(status))
    assert caps == 1 << CAP_NET_ADMIN
    status.write_text("Name:\tx\n")
    assert effective_capabilities(str(status)) is None
    assert effective_capabilities(str(tmp_path / "missing")) is None
