"""The admin HTTP endpoint: status page, JSON status, Prometheus metrics, backend actions.

Off unless ``[admin] listen`` is set; meant for loopback or a management network. With a
token, every path but the probes needs ``Authorization: Bearer <token>`` (the HTML page
also takes ``?token=`` once and sends it on from the browser).

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

import hmac
import json
import logging
import socket
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from .metrics import DaemonCollector, DaemonFigures, ServiceView, TcpfwdCollector

log = logging.getLogger("tcpfwd")

STATUS_PAGE = resources.files(__package__).joinpath("status.html").read_text(encoding="utf-8")
ACTIONS = {"drain": "draining", "disable": "disabled", "enable": "enabled"}
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class AdminTarget(Protocol):
    """What the admin endpoint reads and changes in the running daemon."""

    @property
    def ready(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    def service_views(self) -> Iterable[ServiceView]: ...

    def daemon_figures(self) -> DaemonFigures: ...

    def set_backend_state(self, service: str, backend: str, state: str) -> str | None:
        """Apply an administrative state; returns an error message, or None."""


class AdminServer:
    def __init__(self, target: AdminTarget, token: str | None) -> None:
        self._target = target
        self._token = token
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(TcpfwdCollector(target.service_views))
        self._registry.register(DaemonCollector(target.daemon_figures))
        self._runner: web.AppRunner | None = None
        self.address: str | None = None

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._authorize])
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
    async def _authorize(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if self._token is not None and request.path not in _OPEN_PATHS:
            given = request.headers.get("Authorization", "")
            if request.path == "/" and "token" in request.query:
                given = "Bearer " + request.query["token"]
            if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
                raise web.HTTPUnauthorized(
                    text="a bearer token is required\n",
                    headers={"WWW-Authenticate": 'Bearer realm="tcpfwd"'},
                )
        response: web.StreamResponse = await handler(request)
        return response

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
        return web.Response(text=STATUS_PAGE, content_type="text/html")

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
        service = request.match_info["service"]
        backend = request.match_info["backend"]
        action = request.match_info["action"]
        state = ACTIONS.get(action)
        if state is None:
            raise web.HTTPNotFound(text=f"unknown action {action!r}: use drain, disable, enable\n")
        error = self._target.set_backend_state(service, backend, state)
        if error is not None:
            raise web.HTTPNotFound(text=error + "\n")
        log.info("admin: backend %s/%s is now %s", service, backend, state)
        return web.json_response({"service": service, "backend": backend, "admin_state": state})


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))
