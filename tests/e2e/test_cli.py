"""The command line as an operator meets it: check, usage errors, exit codes."""

from __future__ import annotations

from support import ROOT, echo_server, exchange, refused_port, run_command
from tcpfwd.vocabulary import Outcome

EXAMPLES = ROOT / "examples"


def test_check_accepts_the_bundled_example():
    result = run_command("check", "--config", str(EXAMPLES / "tcpfwd.toml"))
    assert result.returncode == 0, result.stderr
    assert "OK (2 services, 3 listen addresses, 5 backends)" in result.stdout


def test_check_accepts_the_demo_config():
    result = run_command("check", "--config", str(EXAMPLES / "demo.toml"))
    assert result.returncode == 0, result.stderr


def test_check_names_the_file_the_key_and_the_reason_for_every_error(tmp_path):
    config = tmp_path / "broken.toml"
    config.write_text(
        """
[services.smtp]
listen = ["127.0.0.1:10025"]
backends = ["mail1.internal:25", "mail2.internal"]
connect_timeout = "soon"
conect_timeout = "2s"
"""
    )
    result = run_command("check", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "tcpfwd: invalid configuration (3 errors):"
    no_port = f"{config}: services.smtp.backends[1]: 'mail2.internal' has no port"
    assert any(line.startswith(no_port) for line in lines)
    assert any(
        line.startswith(f"{config}: services.smtp.connect_timeout: 'soon'") for line in lines
    )
    assert f"{config}: services.smtp.conect_timeout: unknown key" in lines


def test_check_reports_toml_syntax_errors(tmp_path):
    config = tmp_path / "syntax.toml"
    config.write_text("[services.smtp\nlisten = 1\n")
    result = run_command("check", "--config", str(config))
    assert result.returncode == 2
    assert f"{config}: not valid TOML" in result.stderr


def test_check_reports_a_missing_file(tmp_path):
    result = run_command("check", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "cannot read: No such file or directory" in result.stderr


def test_quick_mode_with_a_bad_backend_exits_two_without_listening():
    result = run_command("127.0.0.1:0", "mail1.internal")
    assert result.returncode == 2
    assert "command line: backend 1: 'mail1.internal' has no port" in result.stderr


def test_quick_mode_names_the_option_at_fault():
    result = run_command("127.0.0.1:0", "127.0.0.1:25", "--connect-timeout", "soon")
    assert result.returncode == 2
    assert "command line: --connect-timeout: 'soon' is not a duration" in result.stderr


def test_quick_mode_needs_a_backend():
    result = run_command("127.0.0.1:10025")
    assert result.returncode == 2
    assert "BACKEND" in result.stderr


def test_run_uses_the_services_of_a_file(run_tcpfwd, tmp_path):
    with echo_server(b"from file\n") as backend, refused_port() as dead:
        config = tmp_path / "t.toml"
        config.write_text(
            f"""
[global]
log_format = "json"
[services.one]
listen = "127.0.0.1:0"
backends = ["{dead}", "{backend.address}"]
[services.two]
listen = ["127.0.0.1:0"]
backends = ["{backend.address}"]
"""
        )
        proxy = run_tcpfwd("run", "--config", str(config))
        assert exchange(proxy.address("one"), b"1") == b"from file\n1"
        assert exchange(proxy.address("two"), b"2") == b"from file\n2"
        first, second = proxy.access_records(2)
        assert (first["service"], second["service"]) == ("one", "two")
        assert [a["outcome"] for a in first["attempts"]] == [Outcome.REFUSED, Outcome.OK]


def test_relay_option_takes_only_known_relays():
    result = run_command("127.0.0.1:0", "127.0.0.1:9", "--relay", "zerocopy")
    assert result.returncode == 2
    assert "--relay" in result.stderr
    assert "zerocopy" in result.stderr
