"""Odd and hostile configuration files: every one is an error with its key path, from
``check``, at start and on reload (which keeps the running configuration), never a
traceback, never a value that breaks sessions later. The parsers' properties behind this
are in tests/unit/test_config_hardening.py."""

from __future__ import annotations

import signal

import pytest

from support import (
    echo_server,
    exchange,
    free_port,
    run_command,
    service_config,
    wait_until,
    write_config,
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
        config = write_config(tmp_path, service_config(backend.address, name="s"))
        proxy = run_tcpfwd("run", "--config", str(config))
        address = proxy.address("s")
        for case, (content, expected) in HOSTILE_FILES.items():
            # The port of the running service stays what it is: only the case changes.
            write_config(tmp_path, content.replace(b"10025", str(address[1]).encode()))
            rejected = len([e for e in proxy.events if "reload rejected" in e])
            proxy.signal(signal.SIGHUP)

            def another_rejection(case: str = case, rejected: int = rejected) -> bool:
                assert proxy.process.poll() is None, f"{case}: tcpfwd exited"
                return len([e for e in proxy.events if "reload rejected" in e]) > rejected

            # ignoring=(): once tcpfwd has exited no rejection will come.
            wait_until(another_rejection, f"{case}: a rejection", 10, ignoring=())
            assert any(expected in e for e in proxy.events), (case, proxy.events[-5:])
            assert exchange(address, b"still here") == b"still here", case
        assert not any("Traceback" in e for e in proxy.events)
