"""Configuration of health, greeting, hold mode, policies and backend tables (pure)."""

from __future__ import annotations

import re
import tomllib
from typing import Any

import pytest

from support import ROOT, config_issues, service
from tcpfwd.cli import main
from tcpfwd.config import (
    GreetingSettings,
    HealthSettings,
    ServiceConfig,
    parse_config,
    quick_config,
)
from tcpfwd.vocabulary import CheckKind, Policy


def document(extra: dict[str, Any], defaults: dict[str, Any] | None) -> dict[str, Any]:
    """One service "mail", and a defaults table when given."""
    found: dict[str, Any] = {"services": {"mail": service(**extra)}}
    if defaults is not None:
        found["defaults"] = defaults
    return found


def parsed(
    extra: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None
) -> ServiceConfig:
    return parse_config(document(extra or {}, defaults), "test.toml").services[0]


def issues(extra: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    return config_issues(document(extra, defaults))


def test_defaults_passive_health_on_no_active_check_no_greeting_no_hold():
    settings = parsed().settings
    assert settings.policy == Policy.FAILOVER
    assert settings.health == HealthSettings(passive=True, fall=1, rise=2, check=CheckKind.NONE)
    assert settings.health.interval == 2.0
    assert settings.greeting is None
    assert settings.hold_timeout is None
    assert settings.dns_ttl == 30.0


def test_backend_tables_carry_tier_weight_limit_and_health_overrides():
    config: ServiceConfig = parsed(
        {
            "health": {"check": "tcp", "interval": "1s"},
            "backends": [
                {
                    "address": "mx1:25",
                    "name": "mx1",
                    "tier": 1,
                    "weight": 3,
                    "max_connections": 50,
                    "health": {"check": "smtp", "rise": 3},
                },
                "mx2:25",
            ],
        }
    )
    mx1, mx2 = config.backends
    assert (mx1.name, mx1.tier, mx1.weight, mx1.max_connections) == ("mx1", 1, 3, 50)
    # Overrides key by key: the service's interval stays.
    assert (mx1.health.check, mx1.health.rise, mx1.health.interval) == (CheckKind.SMTP, 3, 1.0)
    assert (mx2.tier, mx2.weight, mx2.max_connections) == (0, 1, None)
    assert (mx2.health.check, mx2.health.interval) == (CheckKind.TCP, 1.0)


def test_health_inherits_from_defaults_key_by_key():
    config = parsed({"health": {"fall": 3}}, defaults={"health": {"check": "tcp", "rise": 5}})
    assert (config.settings.health.check, config.settings.health.rise) == (CheckKind.TCP, 5)
    assert config.backends[0].health.fall == 3


def test_greeting_preset_table_and_off():
    assert parsed({"greeting": "smtp"}).settings.greeting == GreetingSettings(
        "^220[ -]", preset="smtp"
    )
    assert parsed({"greeting": {"expect": "^\\+OK", "timeout": "2s"}}).settings.greeting == (
        GreetingSettings("^\\+OK", 2.0)
    )
    assert parsed({"greeting": {"preset": "smtp", "timeout": "9s"}}).settings.greeting == (
        GreetingSettings("^220[ -]", 9.0, "smtp")
    )
    assert parsed({"greeting": "off"}, defaults={"greeting": "pop3"}).settings.greeting is None


def test_hold_timeout_policy_and_dns_ttl():
    settings = parsed({"hold_timeout": "45s", "policy": "least-connections", "dns_ttl": 0}).settings
    assert (settings.hold_timeout, settings.policy, settings.dns_ttl) == (
        45.0,
        Policy.LEAST_CONNECTIONS,
        0.0,
    )
    assert parsed({"hold_timeout": "off"}).settings.hold_timeout is None


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"policy": "fastest"}, "services.mail.policy: 'fastest' is not one of"),
        ({"health": {"fall": 0}}, "services.mail.health.fall: 0 is out of range 1-100"),
        ({"health": {"check": "http"}}, "services.mail.health.check: 'http' is not one of"),
        ({"health": {"interval": "0s"}}, "services.mail.health.interval: '0s' must be longer"),
        ({"health": {"sned": "x"}}, "services.mail.health.sned: unknown key"),
        ({"health": {"check": "send"}}, "services.mail.health.check: check = 'send' needs"),
        ({"health": {"expect": "^x"}}, "services.mail.health.expect: only used with check"),
        (
            {"health": {"check": "send", "expect": "("}},
            "services.mail.health.expect: '(' is not a valid",
        ),
        ({"health": {"ehlo": "not a name"}}, "services.mail.health.ehlo: 'not a name' is not"),
        ({"greeting": "http"}, "services.mail.greeting: 'http' is not a preset"),
        ({"greeting": {"timeout": "1s"}}, "services.mail.greeting: needs either 'expect'"),
        ({"greeting": {"expect": "^2", "wait": 1}}, "services.mail.greeting.wait: unknown key"),
        ({"greeting": 5}, "services.mail.greeting: expected a table, got a number"),
        ({"hold_timeout": "soon"}, "services.mail.hold_timeout: 'soon' is not a duration"),
        ({"dns_ttl": -1}, "services.mail.dns_ttl: -1 is not a non-negative duration"),
        (
            {"backends": [{"address": "a:1", "weight": -1}]},
            "services.mail.backends[0].weight: -1 is out of range 0-1000",
        ),
        (
            {"backends": [{"address": "a:1", "max_connections": 0}]},
            "services.mail.backends[0].max_connections: 0 is out of range",
        ),
        (
            {"backends": [{"address": "a:1", "tier": "first"}]},
            "services.mail.backends[0].tier: expected a whole number",
        ),
        (
            {"backends": [{"address": "a:1", "health": {"rise": "2"}}]},
            "services.mail.backends[0].health.rise: expected a whole number",
        ),
    ],
)
def test_each_bad_value_is_reported_with_its_key_path(extra, expected):
    assert any(issue.startswith(expected) for issue in issues(extra)), issues(extra)


def test_an_inherited_send_check_without_expect_is_reported_once():
    found = issues({}, defaults={"health": {"check": "send"}})
    assert found == ["defaults.health.check: check = 'send' needs 'expect' (a regex)"]


def test_check_reports_every_error_at_once(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(
        """
        [services.mail]
        listen = "127.0.0.1:10025"
        policy = "fastest"
        hold_timeout = "soon"
        greeting = { expect = "(" }
        health = { fall = 0, check = "http" }
        backends = [{ address = "a:25", weight = -1, health = { bogus = 1 } }]
        """
    )
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "(7 errors)" in err
    for key in (
        "policy",
        "hold_timeout",
        "greeting.expect",
        "health.fall",
        "health.check",
        "backends[0].weight",
        "backends[0].health.bogus",
    ):
        assert f"services.mail.{key}:" in err


def test_quick_mode_flags_become_service_settings():
    config = quick_config(
        "127.0.0.1:0",
        ["a:25"],
        settings={
            "policy": "random",
            "hold_timeout": "5s",
            "greeting": {"preset": "smtp"},
            "health": {"check": "smtp", "passive": False},
        },
    )
    settings = config.services[0].settings
    assert settings.policy == Policy.RANDOM
    assert settings.hold_timeout == 5.0
    assert settings.greeting is not None and settings.greeting.preset == "smtp"
    assert (settings.health.check, settings.health.passive) == (CheckKind.SMTP, False)


def test_every_config_example_in_the_failover_docs_is_valid():
    text = (ROOT / "docs" / "failover.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert len(blocks) >= 5
    for block in blocks:
        parse_config(tomllib.loads(block), "docs/failover.md")
