"""The admin endpoint refuses what a browser can be made to send by someone else's page:
requests for another host name (DNS rebinding), cross-site actions, actions a plain form
can send. Its own status page keeps working. Real tcpfwd, real sockets, real Chromium."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from browser import CHROMIUM, Browser
from support import (
    PageHandler,
    admin_url,
    echo_server,
    http_server,
    named_backends,
    run_command,
    service_config,
    toml_table,
    write_config,
)
from tcpfwd.vocabulary import AdminState

chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


def admin_config(tmp_path: Path, first: str, second: str, **admin: object) -> Path:
    return write_config(
        tmp_path,
        toml_table("admin", listen="127.0.0.1:0", **admin)
        + service_config(named_backends(a=first, b=second), name="mail"),
    )


def admin_port(proxy) -> int:
    port = urlsplit(admin_url(proxy)).port
    assert port is not None
    return port


def call(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, bytes]:
    """One request with exactly these headers (Host included, when given)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = dict(headers or {})
        connection.putrequest(method, path, skip_host="Host" in headers)
        for name, value in headers.items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def admin_state(port: int, backend: str) -> str:
    status, body = call(port, "/status")
    assert status == 200, body
    (service,) = json.loads(body)["services"]
    return next(b["admin_state"] for b in service["backends"] if b["name"] == backend)


def test_a_request_for_another_host_name_is_refused(run_tcpfwd, tmp_path):
    with echo_server() as first, echo_server() as second:
        proxy = run_tcpfwd(
            "run", "--config", str(admin_config(tmp_path, first.address, second.address))
        )
        port = admin_port(proxy)
        # A page of rebind.evil.example whose name now points at 127.0.0.1.
        for path in ("/", "/status", "/metrics", "/healthz"):
            status, body = call(port, path, headers={"Host": f"rebind.evil.example:{port}"})
            assert status == 421, (path, body)
        status, _ = call(
            port,
            "/backends/mail/a/disable",
            method="POST",
            headers={"Host": "rebind.evil.example", "X-Tcpfwd-Action": "disable"},
        )
        assert status == 421
        assert admin_state(port, "a") == AdminState.ENABLED
        # Its own address, and localhost on loopback, at its own port.
        assert call(port, "/status", headers={"Host": f"127.0.0.1:{port}"})[0] == 200
        assert call(port, "/status", headers={"Host": f"LOCALHOST:{port}"})[0] == 200
        assert call(port, "/status", headers={"Host": "localhost:1"})[0] == 421
        assert call(port, "/status", headers={"Host": f"127.0.0.2:{port}"})[0] == 421


def test_names_in_admin_hosts_are_answered(run_tcpfwd, tmp_path):
    with echo_server() as first, echo_server() as second:
        config = admin_config(tmp_path, first.address, second.address, hosts=["tcpfwd.example.net"])
        proxy = run_tcpfwd("run", "--config", str(config))
        port = admin_port(proxy)
        # A reverse proxy in front of the endpoint may pass its own name and port.
        assert call(port, "/status", headers={"Host": "tcpfwd.example.net"})[0] == 200
        assert call(port, "/status", headers={"Host": "tcpfwd.example.net:443"})[0] == 200
        assert call(port, "/status", headers={"Host": "other.example.net"})[0] == 421


def test_an_action_needs_a_json_body_or_the_action_header(run_tcpfwd, tmp_path):
    with echo_server() as first, echo_server() as second:
        proxy = run_tcpfwd(
            "run", "--config", str(admin_config(tmp_path, first.address, second.address))
        )
        port = admin_port(proxy)
        path = "/backends/mail/a/disable"
        # What an HTML form can send: nothing, urlencoded, multipart, text/plain "JSON".
        for headers, body in [
            ({}, None),
            ({"Content-Type": "application/x-www-form-urlencoded"}, b"x=1"),
            ({"Content-Type": "multipart/form-data; boundary=b"}, b"--b--\r\n"),
            ({"Content-Type": "text/plain"}, b'{"action": "disable"}'),
        ]:
            status, answer = call(port, path, method="POST", headers=headers, body=body)
            assert status == 403, (headers, answer)
            assert b"X-Tcpfwd-Action" in answer
        assert admin_state(port, "a") == AdminState.ENABLED
        assert call(port, path, method="GET")[0] == 405
        status, _ = call(
            port,
            path,
            method="POST",
            headers={"Content-Type": "application/json"},
            body=b'{"action": "disable"}',
        )
        assert status == 200
        assert admin_state(port, "a") == AdminState.DISABLED
        status, _ = call(
            port, "/backends/mail/a/enable", method="POST", headers={"X-Tcpfwd-Action": "enable"}
        )
        assert status == 200
        assert admin_state(port, "a") == AdminState.ENABLED


def test_an_action_from_another_origin_or_site_is_refused(run_tcpfwd, tmp_path):
    with echo_server() as first, echo_server() as second:
        proxy = run_tcpfwd(
            "run", "--config", str(admin_config(tmp_path, first.address, second.address))
        )
        port = admin_port(proxy)
        action = {"X-Tcpfwd-Action": "drain"}
        for extra in [
            {"Origin": "http://127.0.0.1:1"},
            {"Origin": "https://evil.example"},
            {"Origin": "null"},
            {"Sec-Fetch-Site": "cross-site"},
            # Another port of the same host is the "same site", not the same origin.
            {"Sec-Fetch-Site": "same-site"},
        ]:
            status, answer = call(
                port, "/backends/mail/a/drain", method="POST", headers={**action, **extra}
            )
            assert status == 403, (extra, answer)
        assert admin_state(port, "a") == AdminState.ENABLED
        own = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
        status, _ = call(port, "/backends/mail/a/drain", method="POST", headers={**action, **own})
        assert status == 200
        assert admin_state(port, "a") == AdminState.DRAINING


def test_the_backend_command_still_acts(run_tcpfwd, tmp_path):
    with echo_server() as first, echo_server() as second:
        proxy = run_tcpfwd(
            "run", "--config", str(admin_config(tmp_path, first.address, second.address))
        )
        port = admin_port(proxy)
        done = run_command("backend", "disable", "mail/b", "--admin", f"http://localhost:{port}")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"mail/b: {AdminState.DISABLED}"
        assert admin_state(port, "b") == AdminState.DISABLED


@chromium
def test_the_status_page_buttons_drain_and_enable_a_backend(run_tcpfwd, tmp_path):
    with echo_server() as first, echo_server() as second:
        proxy = run_tcpfwd(
            "run", "--config", str(admin_config(tmp_path, first.address, second.address))
        )
        port = admin_port(proxy)
        with Browser(tmp_path / "profile") as browser:
            page = browser.open(f"http://127.0.0.1:{port}/")
            row = '[data-service="mail"] tr[data-backend="a"]'
            page.wait_for(f"!!document.querySelector('{row} button[data-action=drain]')")
            page.click(f'{row} button[data-action="drain"]')
            shows_draining = (
                f"document.querySelector('{row}').textContent.includes('{AdminState.DRAINING}')"
            )
            page.wait_for(shows_draining)
            assert admin_state(port, "a") == AdminState.DRAINING
            page.click(f'{row} button[data-action="enable"]')
            page.wait_for(f"!{shows_draining}")
            assert admin_state(port, "a") == AdminState.ENABLED
            assert "error" not in page.evaluate("document.getElementById('meta').innerHTML")


@contextmanager
def hostile_site(admin: int) -> Iterator[tuple[int, list[str]]]:
    """A page on another loopback origin that auto-submits a form to the admin endpoint,
    and also tries a script request; its port, and the paths its visitors fetched."""
    target = f"http://127.0.0.1:{admin}/backends/mail/a/disable"
    page = f"""<!doctype html><html><body>
<iframe name="sink" style="display:none"></iframe>
<form id="f" method="POST" action="{target}" target="sink"
      enctype="text/plain"><input name='{{"action":"disable","x":"' value='"}}'></form>
<script>
fetch("{target.replace("disable", "drain")}", {{method: "POST", mode: "no-cors",
  headers: {{"X-Tcpfwd-Action": "drain", "Content-Type": "application/json"}},
  body: '{{"action": "drain"}}'}}).catch(() => {{}}).finally(() => {{ window.noCorsDone = true; }});
fetch("{target.replace("/a/disable", "/b/disable")}", {{method: "POST",
  headers: {{"X-Tcpfwd-Action": "disable"}}}})
  .then(() => {{ document.title = "cors-allowed"; }}, () => {{ document.title = "cors-blocked"; }});
document.getElementById("f").submit();
</script></body></html>""".encode()
    fetched: list[str] = []

    class Handler(PageHandler):
        def do_GET(self) -> None:
            fetched.append(self.path)
            self.reply(page, "text/html")

    with http_server(Handler) as port:
        yield port, fetched


@chromium
def test_a_form_auto_submitted_from_another_loopback_origin_is_refused(run_tcpfwd, tmp_path):
    with echo_server() as first, echo_server() as second:
        proxy = run_tcpfwd(
            "run", "--config", str(admin_config(tmp_path, first.address, second.address))
        )
        port = admin_port(proxy)
        with hostile_site(port) as (evil_port, fetched), Browser(tmp_path / "profile") as browser:
            page = browser.open(f"http://127.0.0.1:{evil_port}/")
            assert fetched[0] == "/"
            # The script request was blocked by the browser (no CORS grant) ...
            assert page.wait_for("document.title.startsWith('cors-') && document.title") == (
                "cors-blocked"
            )
            page.wait_for("window.noCorsDone === true")
            # ... and the form's POST reached the endpoint and was refused.
            page.wait_for(
                "(() => { try { return window.frames.sink.location.href !== 'about:blank'; }"
                " catch (e) { return true; } })()"
            )
        assert admin_state(port, "a") == AdminState.ENABLED
        assert admin_state(port, "b") == AdminState.ENABLED
