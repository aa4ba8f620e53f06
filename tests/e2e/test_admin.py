"""The admin endpoint against a running tcpfwd: probes, status, metrics, token, actions."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

from browser import CHROMIUM
from observability import chromium, rendered_dom
from support import (
    admin_url,
    connect,
    echo_server,
    exchange,
    metric_samples,
    named_backends,
    recv_all,
    recv_exactly,
    refused_port,
    run_command,
    service_config,
    toml_table,
    wait_until,
    write_config,
)
from tcpfwd.admin import STATUS_PAGE
from tcpfwd.vocabulary import AdminState, End, Outcome

TOKEN = "s3cret-token-of-enough-length"


def admin_config(tmp_path: Path, services: str, token: str | None = None) -> Path:
    admin = {"listen": "127.0.0.1:0"} | ({"token": token} if token else {})
    return write_config(
        tmp_path, toml_table("global", grace_period="10s") + toml_table("admin", **admin) + services
    )


def get(url: str, token: str | None = None, method: str = "GET") -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if method == "POST":
        # What the endpoint asks of an action (a form from another site cannot send it).
        headers["X-Tcpfwd-Action"] = url.rsplit("/", 1)[-1]
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def two_backends(first: str, second: str) -> str:
    return service_config(named_backends(a=first, b=second), name="mail")


def test_probes_answer_and_readiness_drops_while_draining(run_tcpfwd, tmp_path):
    with echo_server() as backend:
        config = admin_config(tmp_path, two_backends(backend.address, backend.address))
        proxy = run_tcpfwd("run", "--config", str(config))
        url = admin_url(proxy)
        assert get(url + "/healthz") == (200, b"ok\n")
        assert get(url + "/readyz") == (200, b"ready\n")
        live = connect(proxy.address("mail"))
        live.sendall(b"x")
        assert recv_exactly(live, 1) == b"x"
        proxy.signal(signal.SIGTERM)
        proxy.wait_for_event("stopping")
        # Still answering while it drains, but no longer ready for new traffic.
        assert get(url + "/readyz")[0] == 503
        assert get(url + "/healthz")[0] == 200
        live.close()
        assert proxy.wait(10) == 0


def test_metrics_count_what_the_sessions_did(run_tcpfwd, tmp_path):
    with refused_port() as dead, echo_server(b"hi\n") as live:
        config = admin_config(tmp_path, two_backends(dead, live.address))
        proxy = run_tcpfwd("run", "--config", str(config))
        url = admin_url(proxy)
        for _ in range(3):
            assert exchange(proxy.address("mail"), b"12345") == b"hi\n12345"
        proxy.wait_for_access(3)
        samples = metric_samples(url)
        mail = (("service", "mail"),)
        assert samples[("tcpfwd_sessions_total", (("end", End.CLIENT_CLOSED), *mail))] == 3
        assert samples[("tcpfwd_sessions_active", mail)] == 0
        # Passive health marks "a" down after its first refusal; later sessions skip it.
        assert (
            samples[
                (
                    "tcpfwd_backend_attempts_total",
                    (("backend", "a"), ("outcome", Outcome.REFUSED), *mail),
                )
            ]
            == 1
        )
        assert samples[("tcpfwd_backend_up", (("backend", "a"), *mail))] == 0
        assert samples[("tcpfwd_backend_up", (("backend", "b"), *mail))] == 1
        assert (
            samples[
                (
                    "tcpfwd_backend_attempts_total",
                    (("backend", "b"), ("outcome", Outcome.OK), *mail),
                )
            ]
            == 3
        )
        assert samples[("tcpfwd_failovers_total", (("reason", Outcome.REFUSED), *mail))] == 1
        assert samples[("tcpfwd_backend_sessions_total", (("backend", "b"), *mail))] == 3
        assert samples[("tcpfwd_bytes_total", (("direction", "from_client"), *mail))] == 15
        assert samples[("tcpfwd_bytes_total", (("direction", "from_backend"), *mail))] == 24
        assert samples[("tcpfwd_connect_duration_seconds_count", mail)] == 3
        assert (
            samples[
                (
                    "tcpfwd_backend_admin_state",
                    (("backend", "a"), *mail, ("state", AdminState.ENABLED)),
                )
            ]
            == 1
        )


def test_status_json_describes_services_backends_and_recent_failovers(run_tcpfwd, tmp_path):
    with refused_port() as dead, echo_server() as live:
        config = admin_config(tmp_path, two_backends(dead, live.address))
        proxy = run_tcpfwd("run", "--config", str(config))
        url = admin_url(proxy)
        exchange(proxy.address("mail"), b"x")
        proxy.wait_for_access(1)
        status, body = get(url + "/status")
        assert status == 200
        document = json.loads(body)
        assert document["state"] == "serving"
        assert document["pid"] == proxy.pid
        (service,) = document["services"]
        assert service["name"] == "mail"
        assert [b["name"] for b in service["backends"]] == ["a", "b"]
        assert service["backends"][0]["failed_attempts"] == 1
        assert service["backends"][1]["sessions_total"] == 1
        (failover,) = document["recent_failovers"]
        assert failover["failed"][0]["outcome"] == Outcome.REFUSED
        assert failover["backend"] == "b"


def test_token_guards_everything_but_the_probes(run_tcpfwd, tmp_path):
    with echo_server() as backend:
        config = admin_config(tmp_path, two_backends(backend.address, backend.address), TOKEN)
        proxy = run_tcpfwd("run", "--config", str(config))
        url = admin_url(proxy)
        for path in ("/status", "/metrics", "/"):
            assert get(url + path)[0] == 401
            assert get(url + path, "wrong-token-wrong-token")[0] == 401
            assert get(url + path, TOKEN)[0] == 200
        assert get(url + "/backends/mail/a/drain", method="POST")[0] == 401
        assert get(url + "/healthz")[0] == 200
        assert get(url + "/readyz")[0] == 200


def test_drain_sends_new_sessions_elsewhere_and_lets_live_ones_finish(run_tcpfwd, tmp_path):
    with echo_server(b"A\n") as first, echo_server(b"B\n") as second:
        config = admin_config(tmp_path, two_backends(first.address, second.address))
        proxy = run_tcpfwd("run", "--config", str(config))
        url = admin_url(proxy)
        address = proxy.address("mail")
        live = connect(address)
        assert recv_exactly(live, 2) == b"A\n"
        assert get(url + "/backends/mail/a/drain", method="POST")[0] == 200
        assert exchange(address, b"x") == b"B\nx"
        live.sendall(b"still")
        assert recv_exactly(live, 5) == b"still"
        assert get(url + "/backends/mail/a/enable", method="POST")[0] == 200
        assert exchange(address, b"y") == b"A\ny"
        live.close()


def test_disable_closes_live_sessions_of_that_backend(run_tcpfwd, tmp_path):
    with echo_server(b"A\n") as first, echo_server(b"B\n") as second:
        config = admin_config(tmp_path, two_backends(first.address, second.address))
        proxy = run_tcpfwd("run", "--config", str(config))
        url = admin_url(proxy)
        live = connect(proxy.address("mail"))
        assert recv_exactly(live, 2) == b"A\n"
        assert get(url + "/backends/mail/a/disable", method="POST")[0] == 200
        live.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert recv_all(live) == b""
        live.close()
        assert exchange(proxy.address("mail"), b"x") == b"B\nx"
        assert get(url + "/backends/mail/nope/drain", method="POST")[0] == 404
        assert get(url + "/backends/mail/a/explode", method="POST")[0] == 404


def test_status_and_backend_commands_use_the_admin_endpoint_of_the_config(run_tcpfwd, tmp_path):
    with echo_server(b"A\n") as first, echo_server(b"B\n") as second:
        config = admin_config(tmp_path, two_backends(first.address, second.address), TOKEN)
        proxy = run_tcpfwd("run", "--config", str(config))
        url = admin_url(proxy)
        # Port 0 in the file: point the commands at the bound port, with the file's token.
        drained = run_command("backend", "drain", "mail/a", "--admin", url, "--token", TOKEN)
        assert drained.returncode == 0, drained.stderr
        assert drained.stdout.strip() == f"mail/a: {AdminState.DRAINING}"
        shown = run_command("status", "--admin", url, "--token", TOKEN)
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert lines[0].startswith("tcpfwd ") and "serving" in lines[0]
        backend_a = next(line for line in lines if line.strip().startswith("a "))
        # Nothing has tried "a" yet: its health is not known.
        assert backend_a.split()[:4] == ["a", first.address, "unknown", AdminState.DRAINING]
        refused = run_command("status", "--admin", url)
        assert refused.returncode == 1
        assert "401" in refused.stderr


def png_size_and_colours(path: Path) -> tuple[int, int, int]:
    """Width, height and number of distinct pixel rows of an 8-bit RGB(A) PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks, header = 8, [], b""
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        position += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8
    channels = {2: 3, 6: 4}[colour]
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels + 1
    rows = {raw[i * stride + 1 : (i + 1) * stride] for i in range(height)}
    return width, height, len(rows)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_status_page_renders_in_headless_chromium(run_tcpfwd, tmp_path):
    with refused_port() as dead, echo_server() as live:
        config = admin_config(tmp_path, two_backends(dead, live.address))
        proxy = run_tcpfwd("run", "--config", str(config))
        url = admin_url(proxy)
        exchange(proxy.address("mail"), b"x")
        proxy.wait_for_access(1)
        dom = rendered_dom(tmp_path, url + "/")
        # The script ran and filled the tables from /status.
        assert 'data-service="mail"' in dom
        assert 'data-backend="a"' in dom
        assert 'data-backend="b"' in dom
        assert Outcome.REFUSED in dom
        screenshot = tmp_path / "status.png"
        chromium(tmp_path, f"--screenshot={screenshot}", url + "/")
        width, height, distinct_rows = png_size_and_colours(screenshot)
        assert (width, height) == (1200, 800)
        assert distinct_rows > 40, "the page looks blank"


def test_health_is_unknown_until_a_backend_is_checked_or_tried(run_tcpfwd, tmp_path):
    with refused_port() as dead, echo_server(b"hi\n") as live, echo_server() as spare:
        services = service_config(
            named_backends(a=dead, b=live.address, c=spare.address), name="mail"
        )
        proxy = run_tcpfwd("run", "--config", str(admin_config(tmp_path, services)))
        url = admin_url(proxy)

        def health() -> dict[str, str]:
            status, body = get(url + "/status")
            assert status == 200
            (service,) = json.loads(body)["services"]
            return {b["name"]: b["health"] for b in service["backends"]}

        assert health() == {"a": "unknown", "b": "unknown", "c": "unknown"}
        # Shown, not acted upon: an unknown backend is tried as an up one, and counted up.
        samples = metric_samples(url)
        for name in "abc":
            assert samples[("tcpfwd_backend_up", (("backend", name), ("service", "mail")))] == 1
        with connect(proxy.address("mail")) as held:
            assert recv_exactly(held, 3) == b"hi\n"
            # Joined to "b" and still live: tried, though no session of it has ended.
            assert health() == {"a": "down", "b": "up", "c": "unknown"}
        proxy.wait_for_access(1)
        assert health() == {"a": "down", "b": "up", "c": "unknown"}
        assert proxy.stop() == 0


def test_a_checked_backend_is_known_after_its_first_check(run_tcpfwd, tmp_path):
    with echo_server() as live:
        services = service_config(
            named_backends(a=live.address), name="mail", health={"check": "tcp", "interval": "0.2s"}
        )
        proxy = run_tcpfwd("run", "--config", str(admin_config(tmp_path, services)))
        url = admin_url(proxy)

        def checked() -> dict[str, str] | None:
            (backend,) = json.loads(get(url + "/status")[1])["services"][0]["backends"]
            return backend if backend["health"] != "unknown" else None

        backend = wait_until(checked, "a first check", 10)
        assert backend["health"] == "up"
        assert backend["last_check"].startswith("ok")
        assert proxy.stop() == 0


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_the_status_page_shows_unknown_health_as_a_grey_badge(run_tcpfwd, tmp_path):
    with echo_server() as live:
        proxy = run_tcpfwd(
            "run", "--config", str(admin_config(tmp_path, two_backends(live.address, live.address)))
        )
        dom = rendered_dom(tmp_path, admin_url(proxy) + "/")
        assert dom.count('<span class="pill unknown">unknown</span>') == 2
        style = re.search(r"\.unknown\s*\{\s*background:\s*#([0-9a-f]{6})", STATUS_PAGE)
        assert style is not None
        red, green, blue = (int(style.group(1)[i : i + 2], 16) for i in (0, 2, 4))
        assert max(red, green, blue) - min(red, green, blue) < 24, "a grey"
        assert proxy.stop() == 0
