"""Talk to a running daemon through its admin endpoint: status table, backend actions.

The endpoint is found from the configuration file (``[admin] listen`` and its token) or
given as ``--admin URL`` (and ``--token``).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from .config import Config, format_hostport

# As admin.ACTION_HEADER; not imported from there, which would load the HTTP server.
ACTION_HEADER = "X-Tcpfwd-Action"


class ControlError(Exception):
    """The daemon could not be reached or refused; the message is for the operator."""


def endpoint_of(config: Config) -> tuple[str, str | None]:
    listen = config.admin.listen
    if listen is None:
        raise ControlError(f"{config.source} has no [admin] listen address")
    host = listen.host or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"http://{format_hostport(host, listen.port)}", config.admin.token


def request(
    base: str, path: str, token: str | None, method: str = "GET", action: str | None = None
) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = None
    if action is not None:
        # The endpoint takes actions only with this header or a JSON body, which no
        # cross-site form can send; this sends both.
        headers[ACTION_HEADER] = action
        headers["Content-Type"] = "application/json"
        body = json.dumps({"action": action}).encode()
    call = urllib.request.Request(
        base.rstrip("/") + path, data=body, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(call, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace").strip()
        raise ControlError(f"{base}{path}: {error.code} {detail or error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ControlError(f"cannot reach the admin endpoint {base}: {reason}") from None


def _table(rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        indent
        + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def format_status(status: dict[str, Any]) -> str:
    """The status as a terminal table, one block per service."""
    uptime = int(status["uptime_s"])
    lines = [
        f"tcpfwd {status['version']}  pid {status['pid']}  up {uptime // 3600}h"
        f"{uptime // 60 % 60:02d}m{uptime % 60:02d}s  {status['state']}  "
        f"sessions {status['sessions']['active']}/{status['sessions']['capacity']}",
    ]
    for service in status["services"]:
        lines.append("")
        lines += _table(
            [
                ["SERVICE", "LISTEN", "POLICY", "LIVE", "SESSIONS", "REJECTED"],
                [
                    service["name"],
                    ",".join(service["listen"]) or "-",
                    service["policy"],
                    str(service["active"]),
                    str(service["sessions_total"]),
                    str(service["rejected_total"]),
                ],
            ]
        )
        rows = [["BACKEND", "ADDRESS", "HEALTH", "ADMIN", "LIVE", "SESSIONS", "FAILED", "LAST"]]
        for backend in service["backends"]:
            last = backend.get("last_check") or backend.get("reason") or ""
            changed = backend.get("last_change")
            if changed:
                last = f"{last} ({int(time.time() - changed)}s ago)".strip()
            rows.append(
                [
                    backend["name"],
                    backend["address"],
                    backend["health"],
                    backend["admin_state"],
                    str(backend["active"]),
                    str(backend["sessions_total"]),
                    str(backend["failed_attempts"]),
                    last or "-",
                ]
            )
        lines += _table(rows, indent="  ")
    return "\n".join(lines)


def resolve_endpoint(args: argparse.Namespace, config: Config | None) -> tuple[str, str | None]:
    if args.admin:
        return args.admin, args.token
    if config is None:
        raise ControlError("give --config FILE or --admin URL")
    base, token = endpoint_of(config)
    return base, args.token or token


def show_status(base: str, token: str | None, as_json: bool) -> str:
    status = request(base, "/status", token)
    return json.dumps(status, indent=2) if as_json else format_status(status)


def backend_action(base: str, token: str | None, action: str, target: str) -> str:
    service, sep, backend = target.partition("/")
    if not sep or not service or not backend:
        raise ControlError(f"{target!r}: write SERVICE/BACKEND, e.g. smtp/mail1")
    path = f"/backends/{quote(service, safe='')}/{quote(backend, safe='')}/{action}"
    answer = request(base, path, token, "POST", action=action)
    return f"{answer['service']}/{answer['backend']}: {answer['admin_state']}"
