"""A backend that is one of tcpfwd's own listen addresses is a configuration error: every
connection to it would come back into tcpfwd and be dialled again until every session
place is taken. Written as a literal, served by a wildcard listener, or reached through
a name; refused by ``check``, at start and on reload."""

from __future__ import annotations

import signal
import time

import pytest

from support import echo_server, exchange, free_port, run_command

P = 17_925
Q = 17_926

LOOPS = {
    "its own address": (
        f'[services.loop]\nlisten = "127.0.0.1:{P}"\nbackends = ["127.0.0.1:{P}"]\n',
        "services.loop.backends[0]: 127.0.0.1:{P} is tcpfwd's own listen address",
    ),
    "an address a wildcard listener serves": (
        f'[services.loop]\nlisten = "*:{P}"\nbackends = ["mail:25", "127.0.0.5:{P}"]\n',
        "services.loop.backends[1]: 127.0.0.5:{P} is a local address, and *:{P}",
    ),
    "IPv6 loopback under a wildcard": (
        f'[services.loop]\nlisten = "*:{P}"\nbackends = ["[::1]:{P}"]\n',
        "services.loop.backends[0]: [::1]:{P} is a local address",
    ),
    "a name that resolves to its own address": (
        f'[services.loop]\nlisten = "127.0.0.1:{P}"\nbackends = ["localhost:{P}"]\n',
        "services.loop.backends[0]: localhost:{P} resolves to 127.0.0.1",
    ),
    "another service's address": (
        f'[services.good]\nlisten = "127.0.0.1:{P}"\nbackends = ["127.0.0.1:25"]\n'
        f'[services.loop]\nlisten = "127.0.0.1:{Q}"\n'
        f'backends = ["127.0.0.1:26", "127.0.0.1:{P}"]\n',
        "services.loop.backends[1]: 127.0.0.1:{P} is tcpfwd's own listen address "
        "127.0.0.1:{P} (services.good.listen[0])",
    ),
    "two services pointing at each other by name": (
        f'[services.a]\nlisten = "127.0.0.1:{P}"\nbackends = ["localhost:{Q}"]\n'
        f'[services.b]\nlisten = "127.0.0.1:{Q}"\nbackends = ["localhost:{P}"]\n',
        "services.b.backends[0]: localhost:{P} resolves to 127.0.0.1",
    ),
}


@pytest.mark.parametrize("case", list(LOOPS))
def test_check_refuses_a_backend_that_is_tcpfwd_itself(tmp_path, case):
    text, expected = LOOPS[case]
    config = tmp_path / "t.toml"
    config.write_text(text)
    checked = run_command("check", "--config", str(config))
    assert checked.returncode == 2, checked.stdout
    assert expected.format(P=P) in checked.stderr, checked.stderr
    assert "would come back into tcpfwd and loop" in checked.stderr


def test_the_daemon_does_not_start_with_a_loop(tmp_path):
    port = free_port()
    config = tmp_path / "t.toml"
    config.write_text(
        f'[services.loop]\nlisten = "127.0.0.1:{port}"\nbackends = ["localhost:{port}"]\n'
    )
    started = run_command("run", "--config", str(config))
    assert started.returncode == 2, started.stderr
    assert "services.loop.backends[0]: " in started.stderr
    quick = run_command(f"127.0.0.1:{port}", f"127.0.0.1:{port}")
    assert quick.returncode == 2, quick.stderr
    assert "backend 1: " in quick.stderr


def test_a_reload_that_adds_a_loop_is_rejected(run_tcpfwd, tmp_path):
    with echo_server() as backend:
        config = tmp_path / "t.toml"
        config.write_text(
            f'[services.s]\nlisten = "127.0.0.1:0"\nbackends = ["{backend.address}"]\n'
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        host, port = proxy.address("s")
        config.write_text(
            f'[services.s]\nlisten = "127.0.0.1:{port}"\nbackends = ["{backend.address}"]\n'
            f'[services.loop]\nlisten = "127.0.0.1:0"\nbackends = ["localhost:{port}"]\n'
        )
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_event("reload rejected")
        assert any("services.loop.backends[0]: " in e for e in proxy.events)
        assert "loop" not in proxy.listening
        assert exchange((host, port), b"x") == b"x"


def test_a_backend_name_that_does_not_resolve_is_not_an_error(tmp_path):
    config = tmp_path / "t.toml"
    config.write_text(
        f'[services.s]\nlisten = "127.0.0.1:{P}"\nbackends = ["no-such-host.invalid:{P}"]\n'
    )
    started = time.monotonic()
    checked = run_command("check", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert time.monotonic() - started < 10
