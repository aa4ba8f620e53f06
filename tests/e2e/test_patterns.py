"""Operators' regular expressions run in linear time: a pattern that backtracks
catastrophically in Python's ``re`` cannot freeze the event loop that every service
shares. Patterns the linear-time engine cannot run are configuration errors."""

from __future__ import annotations

import threading
import time

import pytest

from support import (
    closed_without_reply,
    connect,
    echo_server,
    exchange,
    greeter_server,
    run_command,
    wait_until,
)
from tcpfwd.vocabulary import End, Outcome

# 29 bytes that ``^(a+)+$`` almost matches: Python's re tries every way to split the
# a's (2**27 of them) before giving up, seconds of CPU on the event loop.
EVIL_PATTERN = "^(a+)+$"
EVIL_LINE = b"a" * 28 + b"!\r\n"


def worst_latency(address: tuple[str, int], seconds: float) -> float:
    """The slowest of repeated echo round trips through tcpfwd during ``seconds``."""
    worst = 0.0
    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline and rounds < 200:
        started = time.monotonic()
        assert exchange(address, b"ping", timeout=30) == b"ping"
        worst = max(worst, time.monotonic() - started)
        rounds += 1
    return worst


def test_a_backtracking_greeting_pattern_does_not_stall_other_services(run_tcpfwd, tmp_path):
    with greeter_server(EVIL_LINE) as evil, echo_server() as good:
        config = tmp_path / "tcpfwd.toml"
        config.write_text(
            f"""
[services.slow]
listen = "127.0.0.1:0"
greeting = {{ expect = "{EVIL_PATTERN}", timeout = "20s" }}
backends = ["{evil.address}"]
[services.good]
listen = "127.0.0.1:0"
backends = ["{good.address}"]
"""
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        assert worst_latency(proxy.address("good"), 0.3) < 0.5
        client = connect(proxy.address("slow"), timeout=30)
        finished = threading.Event()

        def wait_for_slow() -> None:
            closed_without_reply(client)
            finished.set()

        waiter = threading.Thread(target=wait_for_slow, daemon=True)
        waiter.start()
        # The greeting arrives at once and is matched; meanwhile the other service
        # must answer as fast as ever.
        time.sleep(0.2)
        assert worst_latency(proxy.address("good"), 1.5) < 0.5
        assert finished.wait(5), "the greeting was not judged in time"
        client.close()
        wait_until(
            lambda: any("service=slow" in line for line in proxy.access),
            "an access line for the slow session",
            5,
        )
        (record,) = [r for r in proxy.access_records(1) if r["service"] == "slow"]
        assert record["end"] == End.NO_BACKEND
        assert Outcome.GREETING_MISMATCH in record["failed"]


def test_a_backtracking_check_pattern_does_not_stall_other_services(run_tcpfwd, tmp_path):
    with greeter_server(EVIL_LINE) as evil, echo_server() as good:
        config = tmp_path / "tcpfwd.toml"
        config.write_text(
            f"""
[services.checked]
listen = "127.0.0.1:0"
backends = ["{evil.address}"]
health = {{ check = "send", send = "hi", expect = "{EVIL_PATTERN}", interval = "200ms" }}
[services.good]
listen = "127.0.0.1:0"
backends = ["{good.address}"]
"""
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        # Checks run from the start, every 200 ms; each reads the line and matches it.
        worst = 0.0
        deadline = time.monotonic() + 15
        while evil.accepted < 4 and time.monotonic() < deadline:
            worst = max(worst, worst_latency(proxy.address("good"), 0.2))
        assert evil.accepted >= 4
        assert worst < 0.5


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ('greeting = { expect = "(a)\\\\1" }', "services.s.greeting.expect"),
        ('health = { check = "send", expect = "(?=x)x" }', "services.s.health.expect"),
        ('greeting = { expect = "a{2000}" }', "services.s.greeting.expect"),
    ],
)
def test_a_pattern_without_a_linear_time_match_is_a_config_error(tmp_path, setting, key):
    config = tmp_path / "t.toml"
    config.write_text(
        f'[services.s]\nlisten = "127.0.0.1:0"\nbackends = ["127.0.0.1:9"]\n{setting}\n'
    )
    checked = run_command("check", "--config", str(config))
    assert checked.returncode == 2, checked.stdout
    assert f"{key}: " in checked.stderr
    assert "RE2" in checked.stderr
    assert "Traceback" not in checked.stderr
