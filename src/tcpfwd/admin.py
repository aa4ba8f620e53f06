"""The admin HTTP endpoint: status page, JSON status, Prometheus metrics, backend actions.

Off unless ``[admin] listen`` is set; meant for loopback or a management network. With a
token, every path but the probes needs ``Authorization: Bearer <token>`` (the HTML page
also takes ``?token=`` once and sends it on from the browser).

A browser on the operator's desk can be made to send requests here by any page it
visits, token or not. So:

- a request whose ``Host`` is not the endpoint's own address (the address it was
  reached on, ``localhost`` on loopback, the ``listen`` name, or a name of
  ``[admin] hosts``) gets 421: a page whose name was re-pointed at this address
  (DNS rebinding) cannot read or act;
- an action must be a ``POST`` with a JSON body or an ``X-Tcpfwd-Action`` header, which
  a cross-site form cannot send and a cross-site script cannot send without a CORS
  preflight that is never granted; one whose ``Origin`` is another origin, or whose
  ``Sec-Fetch-Site`` is anything but ``same-origin`` or ``none``, gets 403;
- the status page may not be framed, and runs only its own script and style
  (Content-Security-Policy with their hashes).

| path | what |
| --- | --- |
| ``GET /`` | HTML status page that refreshes itself |
| ``GET /status`` | the same facts as JSON |
| ``GET /metrics`` | Prometheus text format |
| ``GET /healthz`` | liveness: 200 while the event loop answers |
| ``GET /readyz`` | readiness: 200 while accepting, 503 once stopping |
| ``POST /backends/{service}/{backend}/{drain,disable,enable}`` | change a backend's state |
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any, Protocol

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from .config import AdminConfig
from .exposition import DaemonCollector, ServiceView, TcpfwdCollector
from .metrics import DaemonFigures
from .vocabulary import ADMIN_ACTIONS, AdminState

log = logging.getLogger("tcpfwd")

STATUS_PAGE = resources.files(__package__).joinpath("status.html").read_text(encoding="utf-8")
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# The header that marks a request as meant for an action (a form cannot send it).
ACTION_HEADER = "X-Tcpfwd-Action"
# Sec-Fetch-Site values of a request the endpoint's own page (or a person typing the
# address) made; "same-site" is another port or name of the same host: refused too.
_OWN_FETCH_SITES = frozenset({"same-origin", "none"})


def _hashes(tag: str, page: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL)
    digests = (hashlib.sha256(block.encode("utf-8")).digest() for block in blocks)
    return " ".join(f"'sha256-{base64.b64encode(d).decode('ascii')}'" for d in digests)


# Only the page's own script and style run: whatever a backend's name or a greeting
# smuggled into the page would be inert even if escaping failed.
PAGE_POLICY = (
    f"default-src 'none'; script-src {_hashes('script', STATUS_PAGE)}; "
    f"style-src {_hashes('style', STATUS_PAGE)}; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_EVERY_RESPONSE = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def split_host_header(value: str) -> tuple[str, int | None] | None:
    """``Host`` as (lower-case host without brackets, port or None); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        close = value.find("]")
        if close < 0:
            return None
        host, rest = value[1:close], value[close + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = value.partition(":")
        if sep and not port_text:
            return None
    if not host:
        return None
    if not port_text:
        return host, None
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        return None
    port = int(port_text)
    return (host, port) if port <= 65535 else None


def _same_ip(name: str, ip: str) -> bool:
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(ip)
    except ValueError:
        return False


class AdminTarget(Protocol):
    """What the admin endpoint reads and changes in the running daemon."""

    @property
    def ready(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    def service_views(self) -> Iterable[ServiceView]: ...

    def daemon_figures(self) -> DaemonFigures: ...

    def set_backend_state(self, service: str, backend: str, state: AdminState) -> str | None:
        """Apply an administrative state; returns an error message, or None."""


class AdminServer:
    def __init__(self, target: AdminTarget, settings: AdminConfig) -> None:
        self._target = target
        self._token = settings.token
        # Names a Host header may carry at any port (a reverse proxy's); the listen
        # name only at the endpoint's own port.
        self._names = frozenset(settings.hosts)
        listen_host = settings.listen.host.lower() if settings.listen is not None else ""
        self._listen_name = listen_host
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(TcpfwdCollector(target.service_views))
        self._registry.register(DaemonCollector(target.daemon_figures))
        self._runner: web.AppRunner | None = None
        self.address: str | None = None

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.add_routes(
            [
                web.get("/", self._page),
                web.get("/status", self._status),
                web.get("/metrics", self._metrics),
                web.get("/healthz", self._healthz),
                web.get("/readyz", self._readyz),
                web.post("/backends/{service}/{backend}/{action}", self._action),
            ]
        )
        return app

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        try:
            self._check_host(request)
            self._authorize(request)
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as error:
            error.headers.update(_EVERY_RESPONSE)
            raise
        response.headers.update(_EVERY_RESPONSE)
        return response

    def _check_host(self, request: web.Request) -> None:
        """421 unless ``Host`` names this endpoint (see the module's docstring)."""
        value = request.headers.get(hdrs.HOST)
        # No browser sends a request without Host; a script of the operator's may.
        if value is None or self._host_allowed(request, value):
            return
        raise web.HTTPMisdirectedRequest(
            text="this admin endpoint answers to its own address only; "
            "add other names to [admin] hosts\n"
        )

    def _host_allowed(self, request: web.Request, value: str) -> bool:
        parsed = split_host_header(value)
        if parsed is None:
            return False
        name, port = parsed
        if name in self._names:
            return True
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if not sockname:
            return False
        local_ip, local_port = str(sockname[0]), int(sockname[1])
        if (port if port is not None else 80) != local_port:
            return False
        if _same_ip(name, local_ip):
            return True
        if name == "localhost" and ipaddress.ip_address(local_ip.partition("%")[0]).is_loopback:
            return True
        return bool(self._listen_name) and name == self._listen_name

    def _authorize(self, request: web.Request) -> None:
        if self._token is None or request.path in _OPEN_PATHS:
            return
        given = request.headers.get("Authorization", "")
        if request.path == "/" and "token" in request.query:
            given = "Bearer " + request.query["token"]
        if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
            raise web.HTTPUnauthorized(
                text="a bearer token is required\n",
                headers={"WWW-Authenticate": 'Bearer realm="tcpfwd"'},
            )

    async def _action_refusal(self, request: web.Request) -> str | None:
        """Why an action request may not be carried out (not the endpoint's own), or None."""
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site.strip().lower() not in _OWN_FETCH_SITES:
            return f"refused: a request from another site (Sec-Fetch-Site: {site[:40]})"
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None:
            host = request.headers.get(hdrs.HOST, "").strip().lower()
            if not host or origin.strip().lower() not in (f"http://{host}", f"https://{host}"):
                return f"refused: a request from another origin ({origin[:80]})"
        if request.headers.get(ACTION_HEADER, "").strip():
            return None
        if request.content_type == "application/json":
            try:
                body = json.loads(await request.read() or b"null")
            except ValueError:
                return "the body is not JSON"
            if isinstance(body, dict):
                return None
        return (
            f"an action needs a JSON object as its body (Content-Type: application/json) "
            f"or an {ACTION_HEADER} header"
        )

    async def start(self, sock: socket.socket) -> None:
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        self._runner = runner
        host, port = sock.getsockname()[:2]
        self.address = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        log.info("admin endpoint on %s", self.address)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(
            text=STATUS_PAGE,
            content_type="text/html",
            headers={"Content-Security-Policy": PAGE_POLICY},
        )

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self._target.status(), dumps=_dumps)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._target.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not accepting\n")

    async def _action(self, request: web.Request) -> web.Response:
        refusal = await self._action_refusal(request)
        if refusal is not None:
            raise web.HTTPForbidden(text=refusal + "\n")
        service = request.match_info["service"]
        backend = request.match_info["backend"]
        action = request.match_info["action"]
        state = ADMIN_ACTIONS.get(action)
        if state is None:
            raise web.HTTPNotFound(text=f"unknown action {action!r}: use drain, disable, enable\n")
        error = self._target.set_backend_state(service, backend, state)
        if error is not None:
            raise web.HTTPNotFound(text=error + "\n")
        log.info("admin: backend %s/%s is now %s", service, backend, state)
        return web.json_response({"service": service, "backend": backend, "admin_state": state})


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))
