"""The PROXY protocol keys: send_proxy, accept_proxy, trusted_sources, the header timeout."""

from __future__ import annotations

import ipaddress

import pytest

from support import config_issues, service
from tcpfwd.config import (
    ConfigError,
    SendProxySettings,
    ServiceConfig,
    ServiceSettings,
    parse_config,
    quick_config,
)
from tcpfwd.vocabulary import AcceptProxy


def parse(**keys: object) -> ServiceConfig:
    return parse_config({"services": {"smtp": service(**keys)}}, "test.toml").services[0]


def issues(**keys: object) -> list[str]:
    return config_issues({"services": {"smtp": service(**keys)}})


def test_proxy_protocol_is_off_by_default():
    settings = ServiceSettings()
    assert settings.send_proxy is None
    assert settings.accept_proxy == AcceptProxy.OFF
    assert settings.trusted_sources == ()
    assert settings.proxy_header_timeout == 3.0
    assert parse().backends[0].send_proxy is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("v1", SendProxySettings(1)),
        ("v2", SendProxySettings(2)),
        ("off", None),
        (False, None),
        ({"version": "v2", "unique_id": True, "crc32c": True}, SendProxySettings(2, True, True)),
        ({"version": "v1"}, SendProxySettings(1)),
    ],
)
def test_send_proxy_shapes(value, expected):
    smtp = parse(send_proxy=value)
    assert smtp.settings.send_proxy == expected
    assert smtp.backends[0].send_proxy == expected


def test_backends_inherit_send_proxy_unless_they_set_their_own():
    smtp = parse(
        send_proxy="v2",
        backends=[
            "10.0.0.1:25",
            {"address": "10.0.0.2:25", "send_proxy": "off"},
            {"address": "10.0.0.3:25", "send_proxy": "v1"},
            {"address": "10.0.0.4:25"},
        ],
    )
    assert [b.send_proxy for b in smtp.backends] == [
        SendProxySettings(2),
        None,
        SendProxySettings(1),
        SendProxySettings(2),
    ]


def test_defaults_table_sets_send_proxy_for_every_service():
    config = parse_config(
        {
            "defaults": {"send_proxy": "v1"},
            "services": {"a": {"listen": ":1", "backends": ["127.0.0.1:25"]}},
        },
        "test.toml",
    )
    assert config.services[0].backends[0].send_proxy == SendProxySettings(1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("v3", "services.smtp.send_proxy: 'v3' is not one of: v1, v2, off"),
        (2, "services.smtp.send_proxy: expected a table, got a number"),
        ({"unique_id": True}, "services.smtp.send_proxy: missing key 'version'"),
        ({"version": "v1", "crc32c": True}, "services.smtp.send_proxy.crc32c: TLVs need"),
        ({"version": "v2", "tlvs": True}, "services.smtp.send_proxy.tlvs: unknown key"),
        ({"version": "v2", "crc32c": "yes"}, "services.smtp.send_proxy.crc32c: expected true"),
    ],
)
def test_bad_send_proxy_is_reported_at_its_key(value, expected):
    assert any(issue.startswith(expected) for issue in issues(send_proxy=value))


def test_bad_backend_send_proxy_names_the_backend():
    found = issues(backends=[{"address": "10.0.0.1:25", "send_proxy": "v9"}])
    assert found[0].startswith("services.smtp.backends[0].send_proxy: 'v9'")


@pytest.mark.parametrize(
    ("value", "mode"), [(True, AcceptProxy.REQUIRED), ("optional", AcceptProxy.OPTIONAL)]
)
def test_accept_proxy_with_trusted_sources(value, mode):
    smtp = parse(accept_proxy=value, trusted_sources=["127.0.0.0/8", "::1", "10.1.2.3"])
    assert smtp.settings.accept_proxy == mode
    assert smtp.settings.trusted_sources == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.1.2.3/32"),
    )


@pytest.mark.parametrize("trusted", [None, []])
def test_accept_proxy_trusts_no_one_implicitly(trusted):
    extra = {} if trusted is None else {"trusted_sources": trusted}
    (issue,) = issues(accept_proxy=True, **extra)
    assert issue.startswith("services.smtp.trusted_sources: required when accept_proxy is on")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["10.1.2.3/8"], "has host bits set: write '10.0.0.0/8'"),
        (["not-a-net"], "'not-a-net' is not an IP address or CIDR"),
        ([7], "expected an address or CIDR"),
        ({"a": 1}, "expected a list of CIDRs"),
    ],
)
def test_bad_trusted_sources_say_why_once(value, expected):
    (issue,) = issues(accept_proxy=True, trusted_sources=value)
    assert "services.smtp.trusted_sources: " in issue
    assert expected in issue


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("accept_proxy", "yes", "expected true, false or 'optional'"),
        ("proxy_header_timeout", "0s", "must be longer than zero"),
        ("proxy_header_timeout", "soon", "is not a duration"),
    ],
)
def test_bad_accept_settings(key, value, expected):
    found = issues(**{key: value, "trusted_sources": ["127.0.0.1"]})
    assert any(f"services.smtp.{key}: " in i and expected in i for i in found)


def test_quick_mode_takes_the_same_settings():
    config = quick_config(
        "127.0.0.1:0",
        ["127.0.0.1:25"],
        settings={
            "send_proxy": {"version": "v2", "unique_id": True},
            "accept_proxy": "optional",
            "trusted_sources": ["127.0.0.1"],
            "proxy_header_timeout": "1s",
        },
    )
    settings = config.services[0].settings
    assert settings.send_proxy == SendProxySettings(2, unique_id=True)
    assert settings.accept_proxy == AcceptProxy.OPTIONAL
    assert settings.proxy_header_timeout == 1.0


def test_quick_mode_names_the_flag_in_errors():
    with pytest.raises(ConfigError) as caught:
        quick_config("127.0.0.1:0", ["127.0.0.1:25"], settings={"accept_proxy": True})
    (issue,) = caught.value.issues
    assert issue.path == "--trusted-source"
