"""The status page shows whatever names and addresses /status holds as text: none of it
can run as script, not even by clicking the buttons, and the buttons still act on
exactly the backend of their row. Real Chromium, the real page, served with hostile
data; and the configuration refuses IPv6 zone ids that could carry such data."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib import resources
from urllib.parse import unquote

import pytest

from browser import CHROMIUM, Browser
from support import PageHandler, http_server, run_command, wait_until
from tcpfwd.vocabulary import AdminState, Policy

# Each would run script in some context of a page that escaped carelessly: a quote
# closing a JavaScript string in an inline handler, a tag, an attribute breakout, a
# template literal.
HOSTILE = [
    "x');window.pwned=1;('",
    "x\\');window.pwned=2;//",
    '"><img src=x onerror="window.pwned=3">',
    "<script>window.pwned=4</script>",
    "' onmouseover='window.pwned=5' x='",
    "${window.pwned=6}`",
    "&#39;);window.pwned=7;(&#39;",
]


def hostile_status() -> dict[str, object]:
    backends = [
        {
            "name": name,
            "address": f"[fe80::1%{name}]:25",
            "health": "up",
            "admin_state": AdminState.ENABLED,
            "active": 0,
            "sessions_total": 1,
            "failed_attempts": 0,
            "attempts": {},
            "last_check": f"failed: greeting: {name!r}",
            "last_change": None,
        }
        for name in HOSTILE
    ]
    return {
        "version": "0.1.0",
        "pid": 1,
        "started": time.time(),
        "uptime_s": 1.0,
        "state": "serving",
        "config": "x",
        "sessions": {"active": 0, "capacity": 10},
        "services": [
            {
                "name": HOSTILE[0],
                "listen": [HOSTILE[2]],
                "policy": Policy.FAILOVER,
                "active": 0,
                "sessions_total": 1,
                "ends": {},
                "rejected": {},
                "rejected_total": 0,
                "bytes_from_client": 0,
                "bytes_from_backend": 0,
                "backends": backends,
            }
        ],
        "recent_failovers": [
            {
                "time": HOSTILE[3],
                "service": HOSTILE[4],
                "failed": [{"backend": HOSTILE[5], "outcome": HOSTILE[6]}],
                "backend": HOSTILE[1],
            }
        ],
    }


@contextmanager
def status_server() -> Iterator[tuple[int, list[str]]]:
    """Serves tcpfwd's own status page with hostile /status data; records action paths."""
    page = resources.files("tcpfwd").joinpath("status.html").read_bytes()
    status = json.dumps(hostile_status()).encode()
    actions: list[str] = []

    class Handler(PageHandler):
        def do_GET(self) -> None:
            if self.path == "/":
                self.reply(page, "text/html")
            else:
                self.reply(status, "application/json")

        def do_POST(self) -> None:
            actions.append(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self.reply(b"{}", "application/json")

    with http_server(Handler) as port:
        yield port, actions


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_hostile_names_and_addresses_cannot_run_script_in_the_status_page(tmp_path):
    with status_server() as (port, actions), Browser(tmp_path / "profile") as browser:
        page = browser.open(f"http://127.0.0.1:{port}/")
        count = page.wait_for("document.querySelectorAll('button').length")
        assert count == 3 * len(HOSTILE)
        # Every name and address is shown as the text it is.
        text = page.evaluate("document.body.innerText")
        for name in HOSTILE:
            assert name in text
        assert page.evaluate("document.querySelectorAll('img, #services script').length") == 0
        # Click every button of every row, with the mouse, as an operator would.
        rows = page.evaluate("document.querySelectorAll('tr[data-backend]').length")
        assert rows == len(HOSTILE)
        for row in range(rows):
            for index, action in enumerate(("drain", "disable", "enable")):
                button = f"tr[data-backend]:nth-of-type({row + 1}) button:nth-of-type({index + 1})"
                assert page.evaluate(f"document.querySelector('{button}').textContent") == action
                asked_before = len(actions)
                # The page redraws after each action; a click that lands on a redraw
                # (pressed on one button, released on its replacement) is made again.
                for _ in range(3):
                    page.click(button)
                    assert page.evaluate("typeof window.pwned") == "undefined"
                    with suppress(AssertionError):
                        wait_until(
                            lambda before=asked_before: len(actions) > before,
                            f"the request of {button}",
                            1,
                            interval=0.02,
                        )
                    if len(actions) > asked_before:
                        break
        # Each click asked for its own row's backend, its name intact.
        wanted = [
            (HOSTILE[0], name, action)
            for name in HOSTILE
            for action in ("drain", "disable", "enable")
        ]
        asked = [tuple(unquote(part) for part in path.split("/")[2:5]) for path in actions]
        assert sorted(asked) == sorted(wanted)
        assert page.evaluate("typeof window.pwned") == "undefined"


@pytest.mark.parametrize(
    "zone",
    ["eth0'", 'eth0"', "eth 0", "eth0<b>", "a;b", "", "x" * 40, "eth0\\n"],
)
def test_ipv6_zone_ids_other_than_interface_names_are_refused(tmp_path, zone):
    config = tmp_path / "t.toml"
    address = json.dumps(f"[fe80::1%{zone}]:25")
    config.write_text(f'[services.s]\nlisten = "127.0.0.1:0"\nbackends = [{address}]\n')
    checked = run_command("check", "--config", str(config))
    assert checked.returncode == 2, checked.stdout
    assert "services.s.backends[0]:" in checked.stderr
    assert "Traceback" not in checked.stderr


@pytest.mark.parametrize("zone", ["eth0", "enp0s31f6", "1", "br-lan.10", "wg_0"])
def test_ipv6_zone_ids_naming_an_interface_are_accepted(tmp_path, zone):
    config = tmp_path / "t.toml"
    config.write_text(f'[services.s]\nlisten = "127.0.0.1:0"\nbackends = ["[fe80::1%{zone}]:25"]\n')
    checked = run_command("check", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
