"""Odd and hostile configuration files: every one is an error with its key path, from
``check``, at start and on reload (which keeps the running configuration), never a
traceback, never a value that breaks sessions later."""

from __future__ import annotations

import json
import math
import signal
import socket
import tempfile
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support import echo_server, exchange, run_command
from tcpfwd.config import (
    MAX_DURATION,
    ConfigError,
    _Invalid,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
)

SERVICE = '[services.s]\nlisten = "127.0.0.1:10025"\nbackends = ["127.0.0.1:25"]\n'

# (file content, the key path (or file-level words) the error must name)
HOSTILE_FILES = {
    "nested arrays": (
        b'[services.s]\nbackends = ["127.0.0.1:25"]\nlisten = ' + b"[" * 5000 + b"]" * 5000 + b"\n",
        "nested too deeply",
    ),
    "not UTF-8": (SERVICE.encode() + b'# caf\xe9\nidle_timeout = "1s"\n', "not UTF-8"),
    "superscript digit in a port": (
        '[services.s]\nlisten = "127.0.0.1:\u00b25"\nbackends = ["127.0.0.1:25"]\n'.encode(),
        "services.s.listen: ",
    ),
    "Arabic-Indic digits in a port": (
        '[services.s]\nlisten = "127.0.0.1:10025"\n'
        'backends = ["127.0.0.1:\u0662\u0663\u0660\u0667\u0660"]\n'.encode(),
        "services.s.backends[0]: ",
    ),
    "service name ending in a newline": (
        b'[services."a\\n"]\nlisten = "127.0.0.1:10025"\nbackends = ["127.0.0.1:25"]\n',
        'services."a\\n": ',
    ),
    "host ending in a newline": (
        b'[services.s]\nlisten = "127.0.0.1:10025"\nbackends = ["mail\\n:25"]\n',
        "services.s.backends[0]: ",
    ),
    "backend name ending in a newline": (
        b'[services.s]\nlisten = "127.0.0.1:10025"\n'
        b'backends = [{ address = "127.0.0.1:25", name = "b\\n" }]\n',
        "services.s.backends[0].name: ",
    ),
    "absurd keepalive": (
        SERVICE.encode() + b'keepalive_idle = "999999999h"\n',
        "services.s.keepalive_idle: ",
    ),
    "keepalive beyond the kernel's limit": (
        SERVICE.encode() + b'keepalive_interval = "40000s"\n',
        "services.s.keepalive_interval: ",
    ),
    "keepalive below a second": (
        SERVICE.encode() + b'keepalive_idle = "500ms"\n',
        "services.s.keepalive_idle: ",
    ),
    "absurd timeout": (
        SERVICE.encode() + b"connect_timeout = 99999999999999999999\n",
        "services.s.connect_timeout: ",
    ),
    "infinite idle timeout": (
        SERVICE.encode() + b"idle_timeout = inf\n",
        "services.s.idle_timeout: ",
    ),
    "check interval of a tenth of a microsecond": (
        SERVICE.encode() + b'health = { check = "tcp", interval = "0.0000001s" }\n',
        "services.s.health.interval: ",
    ),
    "localhost beside 127.0.0.1": (
        b'[services.a]\nlisten = "localhost:10025"\nbackends = ["127.0.0.1:25"]\n'
        b'[services.b]\nlisten = "127.0.0.1:10025"\nbackends = ["127.0.0.1:26"]\n',
        "services.b.listen[0]: ",
    ),
    "a wildcard beside 127.0.0.1": (
        b'[services.a]\nlisten = "*:10025"\nbackends = ["127.0.0.1:25"]\n'
        b'[services.b]\nlisten = "127.0.0.1:10025"\nbackends = ["127.0.0.1:26"]\n',
        "services.b.listen[0]: ",
    ),
    "a wildcard beside 127.0.0.1 in one service": (
        b'[services.a]\nlisten = ["127.0.0.1:10025", "*:10025"]\nbackends = ["127.0.0.1:25"]\n',
        "services.a.listen[1]: ",
    ),
    "the admin endpoint on a service's address": (
        SERVICE.encode() + b'[admin]\nlisten = "127.0.0.1:10025"\n',
        "admin.listen: ",
    ),
    "an infinite rate": (
        SERVICE.encode() + b"accept_rate = 1e999\n",
        "services.s.accept_rate: ",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_FILES))
def test_check_reports_a_hostile_file_with_its_key_path(tmp_path, case):
    content, expected = HOSTILE_FILES[case]
    config = tmp_path / "t.toml"
    config.write_bytes(content)
    checked = run_command("check", "--config", str(config))
    assert checked.returncode == 2, (checked.stdout, checked.stderr)
    assert "Traceback" not in checked.stderr
    lines = checked.stderr.splitlines()
    assert lines[0].startswith("tcpfwd: invalid configuration (")
    # One line per error, each naming the file: no value split a line.
    assert all(line.startswith(f"{config}: ") for line in lines[1:]), lines
    assert any(expected in line for line in lines[1:]), lines


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_overlapping_listen_addresses_stop_the_start_as_a_configuration_error(tmp_path):
    port = free_port()
    config = tmp_path / "t.toml"
    config.write_text(
        f'[services.a]\nlisten = "*:{port}"\nbackends = ["127.0.0.1:25"]\n'
        f'[services.b]\nlisten = "127.0.0.1:{port}"\nbackends = ["127.0.0.1:26"]\n'
    )
    started = run_command("run", "--config", str(config))
    assert started.returncode == 2, started.stderr
    assert "services.b.listen[0]: " in started.stderr
    assert "Address already in use" not in started.stderr


def test_a_hostile_file_is_rejected_on_reload_and_the_running_config_kept(run_tcpfwd, tmp_path):
    with echo_server() as backend:
        config = tmp_path / "t.toml"
        good = f'[services.s]\nlisten = "127.0.0.1:0"\nbackends = ["{backend.address}"]\n'
        config.write_text(good)
        proxy = run_tcpfwd("run", "--config", str(config))
        address = proxy.address("s")
        for case, (content, expected) in HOSTILE_FILES.items():
            # The port of the running service stays what it is: only the case changes.
            config.write_bytes(content.replace(b"10025", str(address[1]).encode()))
            rejected = len([e for e in proxy.events if "reload rejected" in e])
            proxy.signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while len([e for e in proxy.events if "reload rejected" in e]) == rejected:
                assert proxy.process.poll() is None, case
                assert time.monotonic() < deadline, f"{case}: no rejection\n" + "\n".join(
                    proxy.events[-10:]
                )
                time.sleep(0.05)
            assert any(expected in e for e in proxy.events), (case, proxy.events[-5:])
            assert exchange(address, b"still here") == b"still here", case
        assert not any("Traceback" in e for e in proxy.events)


# --- properties of the parsers ------------------------------------------------------


# Text near an address: other scripts' digits, newlines, quotes in zones.
ADDRESS_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from("0123456789²٢٣.:[]%*abc \n\t"), max_size=20),
    st.from_regex(r"\A(\[::1(%[a-z'\" ]{0,3})?\]|[a-z0-9.\n*]{0,6}):[0-9²٢٣\n]{1,6}\Z"),
)


@given(ADDRESS_TEXT)
def test_accepted_addresses_are_plain_ascii(text):
    try:
        address = parse_address(text, allow_any_host=True, allow_port_zero=True)
    except _Invalid:
        return
    assert 0 <= address.port <= 65535
    assert address.host.isascii()
    assert address.host.isprintable()
    assert not any(c.isspace() for c in address.host)
    port_text = text.strip().rsplit(":", 1)[1]
    assert port_text.isascii() and port_text.isdigit()


@given(ADDRESS_TEXT)
def test_addresses_of_digits_and_separators_only_ever_parse_or_report(text):
    try:
        parse_address(text, allow_any_host=True, allow_port_zero=True)
    except _Invalid as error:
        assert str(error)  # noqa: PT017 -- any input, so no single expected error


@given(
    st.one_of(
        st.text(max_size=30),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.from_regex(r"\A[0-9]{1,30}(\.[0-9]{1,5})?(ms|s|m|h)?\Z"),
    )
)
def test_durations_are_in_range_or_reported(value):
    try:
        seconds = parse_duration(value)
    except _Invalid:
        return
    assert math.isfinite(seconds)
    assert 0 <= seconds <= MAX_DURATION


def test_durations_up_to_the_maximum_parse():
    assert parse_duration("720h") == MAX_DURATION
    assert parse_duration(int(MAX_DURATION)) == MAX_DURATION
    for too_long in ("721h", "999999999h", MAX_DURATION + 1, 10**400):
        with pytest.raises(_Invalid, match="longer than 720h"):
            parse_duration(too_long)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda key, value: f"[services.s]\n{key} = {value}\n".encode(),
            st.sampled_from(["listen", "backends", "keepalive_idle", "greeting", "health"]),
            st.one_of(
                st.from_regex(r'\A"[^"\\\n]{0,20}"\Z'),
                st.integers().map(str),
                st.just("[" * 600 + "]" * 600),
            ),
        ),
    )
)
def test_any_file_loads_or_is_reported(content):
    with tempfile.NamedTemporaryFile(suffix=".toml") as stream:
        stream.write(content)
        stream.flush()
        try:
            load_config(stream.name)
        except ConfigError as error:
            issues = error.issues
        else:
            return
    assert issues
    for issue in issues:
        assert "\n" not in str(issue)


@given(st.dictionaries(st.text(max_size=8), st.just({}), max_size=4))
def test_every_error_is_one_line_whatever_the_keys(services):
    try:
        parse_config(
            {"services": services, **{k: 1 for k in services if k != "services"}}, "t.toml"
        )
    except ConfigError as error:
        report, count = error.report(), len(error.issues)
    else:
        return
    assert len(report.splitlines()) == count


def test_config_paths_quote_odd_keys():
    with pytest.raises(ConfigError) as caught:
        parse_config({"services": {'a"\n': {}}}, "t.toml")
    paths = {issue.path for issue in caught.value.issues}
    assert json.dumps('a"\n').join(["services.", ""]) in paths
