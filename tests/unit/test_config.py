"""Configuration parsing and validation: pure, no sockets."""

from __future__ import annotations

import ipaddress
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from support import config_issues, service
from tcpfwd.config import (
    Address,
    ServiceSettings,
    _Invalid,
    format_hostport,
    parse_address,
    parse_config,
    parse_duration,
    quick_config,
)
from tcpfwd.vocabulary import RelayMode


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1.5s", 1.5),
        ("300ms", 0.3),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("7", 7.0),
        (3, 3.0),
        (".5s", 0.5),
    ],
)
def test_durations_are_written_with_units(text, seconds):
    assert math.isclose(parse_duration(text), seconds)


@pytest.mark.parametrize("text", ["fast", "1.5 sec", "-1s", "1e3s", "", True, [1]])
def test_bad_durations_are_rejected(text):
    with pytest.raises(_Invalid):
        parse_duration(text)


@given(
    st.decimals(min_value=0, max_value=720, places=3, allow_nan=False, allow_infinity=False),
    st.sampled_from([("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)]),
)
def test_any_written_duration_parses_to_its_value(number, unit):
    suffix, factor = unit
    assert math.isclose(parse_duration(f"{number}{suffix}"), float(number) * factor, rel_tol=1e-9)


@given(st.ip_addresses(), st.integers(min_value=1, max_value=65535))
def test_addresses_round_trip_through_their_text_form(ip, port):
    host = str(ip)
    assert parse_address(format_hostport(host, port)) == Address(host, port)


@given(st.text(max_size=40))
def test_address_parser_only_ever_accepts_or_reports(text):
    try:
        address = parse_address(text, allow_any_host=True, allow_port_zero=True)
    except _Invalid as error:
        assert str(error)  # noqa: PT017 -- any input, so no single expected error
    else:
        assert 0 <= address.port <= 65535


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail1.internal:25", Address("mail1.internal", 25)),
        ("10.0.0.7:25", Address("10.0.0.7", 25)),
        ("[::1]:10025", Address("::1", 10025)),
        ("[fe80::1%eth0]:25", Address("fe80::1%eth0", 25)),
    ],
)
def test_backend_addresses(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("mail1.internal", "has no port"),
        ("::1:25", "brackets"),
        ("host:0", "out of range"),
        ("host:70000", "out of range"),
        ("host:smtp", "not a number"),
        ("bad host:25", "not a valid host"),
        ("[nope]:25", "not an IPv6 address"),
        (":25", "has no host"),
    ],
)
def test_bad_backend_addresses_say_why(text, reason):
    with pytest.raises(_Invalid, match=reason):
        parse_address(text)


def test_listen_addresses_may_mean_every_interface_and_any_port():
    assert parse_address("*:25", allow_any_host=True) == Address("", 25)
    assert parse_address(":0", allow_any_host=True, allow_port_zero=True) == Address("", 0)


def test_a_minimal_service_gets_the_documented_defaults():
    config = parse_config({"services": {"smtp": service()}}, "test.toml")
    (smtp,) = config.services
    assert smtp.name == "smtp"
    assert smtp.listen == (Address("127.0.0.1", 10025),)
    assert [b.name for b in smtp.backends] == ["127.0.0.1:25"]
    assert smtp.settings == ServiceSettings()
    assert smtp.settings.connect_timeout == 2.0
    assert smtp.settings.idle_timeout is None
    assert config.grace_period == 30.0
    assert config.log_format == "text"


def test_backends_keep_their_order_and_may_be_named():
    config = parse_config(
        {
            "services": {
                "smtp": service(
                    backends=[
                        "mail1.internal:25",
                        {"address": "mail2.internal:25", "name": "mail2"},
                        "[2001:db8::7]:25",
                    ]
                )
            }
        },
        "test.toml",
    )
    names = [b.name for b in config.services[0].backends]
    assert names == ["mail1.internal:25", "mail2", "[2001:db8::7]:25"]


def test_defaults_table_applies_to_every_service_and_services_override_it():
    config = parse_config(
        {
            "defaults": {"connect_timeout": "500ms", "idle_timeout": "10m"},
            "services": {
                "a": service(),
                "b": service(listen="127.0.0.1:10026", connect_timeout="3s"),
            },
        },
        "test.toml",
    )
    a, b = config.services
    assert (a.settings.connect_timeout, a.settings.idle_timeout) == (0.5, 600.0)
    assert (b.settings.connect_timeout, b.settings.idle_timeout) == (3.0, 600.0)


@pytest.mark.parametrize("off", ["off", False, 0, "0s"])
def test_optional_timeouts_can_be_switched_off(off):
    config = parse_config({"services": {"s": service(failover_timeout=off)}}, "t")
    assert config.services[0].settings.failover_timeout is None


def test_every_error_in_a_file_is_reported_with_its_key_path():
    problems = config_issues(
        {
            "global": {"grace_period": "soon", "log_format": "xml"},
            "services": {
                "smtp": {
                    "listen": ["127.0.0.1:10025"],
                    "backends": ["mail1:25", "mail2", {"adress": "mail3:25"}],
                    "connect_timout": "2s",
                    "idle_timeout": "forever",
                },
                "pop": {"listen": "127.0.0.1:10025", "backends": []},
            },
            "servics": {},
        }
    )
    expected_paths = [
        "global.grace_period:",
        "global.log_format:",
        "services.smtp.backends[1]:",
        "services.smtp.backends[2]: missing key 'address'",
        "services.smtp.backends[2].adress: unknown key",
        "services.smtp.idle_timeout:",
        "services.smtp.connect_timout: unknown key",
        "services.pop.backends: expected a non-empty list",
        "servics: unknown key",
    ]
    for path in expected_paths:
        assert any(p.startswith(path) for p in problems), (path, problems)
    assert len(problems) == len(expected_paths)


def test_two_services_on_one_address_is_an_error():
    problems = config_issues(
        {"services": {"a": service(), "b": service(backends=["127.0.0.1:26"])}}
    )
    assert problems == ["services.b.listen[0]: 127.0.0.1:10025 is already used by service 'a'"]


def test_duplicate_backend_names_are_an_error():
    problems = config_issues(
        {
            "services": {
                "a": service(
                    backends=[{"address": "m:25", "name": "mx"}, {"address": "n:25", "name": "mx"}]
                )
            }
        }
    )
    assert problems == ["services.a.backends[1]: backend name 'mx' is used twice"]


def test_wrong_types_are_named():
    problems = config_issues({"services": {"a": service(keepalive="yes", buffer_size=12)}})
    assert "services.a.keepalive: expected true or false, got a string" in problems
    assert any(p.startswith("services.a.buffer_size: 12 must be between") for p in problems)


def test_a_file_without_services_is_an_error():
    assert config_issues({}) == ["services: no service is defined"]


def test_source_address_must_be_an_ip():
    assert config_issues({"services": {"a": service(source_address="eth0")}}) == [
        "services.a.source_address: 'eth0' is not an IP address"
    ]
    config = parse_config({"services": {"a": service(source_address="::1")}}, "t")
    assert ipaddress.ip_address(config.services[0].settings.source_address) == ipaddress.ip_address(
        "::1"
    )


def test_quick_mode_builds_one_default_service():
    config = quick_config(
        "127.0.0.1:10025",
        ["mail1.internal:25", "mail2.internal:25", "10.0.0.7:25"],
        settings={"connect_timeout": "1s"},
    )
    (default,) = config.services
    assert default.name == "default"
    assert [str(b.address) for b in default.backends] == [
        "mail1.internal:25",
        "mail2.internal:25",
        "10.0.0.7:25",
    ]
    assert default.settings.connect_timeout == 1.0
    assert config.source == "command line"


def test_relay_is_auto_by_default_and_each_service_may_force_one():
    assert ServiceSettings().relay == RelayMode.AUTO
    config = parse_config(
        {
            "defaults": {"relay": "copy"},
            "services": {"a": service(), "b": service(listen="127.0.0.1:10026", relay="splice")},
        },
        "t",
    )
    a, b = config.services
    assert (a.settings.relay, b.settings.relay) == (RelayMode.COPY, RelayMode.SPLICE)
    assert config_issues({"services": {"a": service(relay="zerocopy")}}) == [
        "services.a.relay: 'zerocopy' is not one of: auto, splice, copy"
    ]
