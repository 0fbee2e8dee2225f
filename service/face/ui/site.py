"""The operator page as an ASGI app: its routes, its security headers, and what every
page shares (the templates, who is signed in, the form posted).

`http.py` mounts it under `/` after the probes, which keep their own paths. Pages are
server-rendered and work without JavaScript; htmx (vendored in `static/`) refreshes
them in place. A request from htmx gets only the page's `<main>` (`HX-Request`).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.face.metrics import Metrics
from service.face.ui import actions, views
from service.face.ui.auth import SESSION_COOKIE, Gate, Session, TokenFile
from service.face.ui.render import environment
from service.face.ui.snapshot import Snapshot
from service.ledger import Ledger
from service.settings import Settings

__all__ = ["CSP", "OperatorPage"]

CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS: Final = (
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "same-origin"),
    ("cross-origin-opener-policy", "same-origin"),
)
Handler = Callable[["OperatorPage", Request], Awaitable[Response]]


class SecurityHeaders:
    """Every answer of the page gets its security headers; pages are never cached
    (they carry CSRF tokens), the static files are (their URLs carry the version)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/ui/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in _HEADERS:
                    headers[key] = value
                headers["cache-control"] = "public, max-age=86400" if static else "no-store"
                if not static:
                    headers.append("vary", "HX-Request")
            await send(message)

        await self.app(scope, receive, send_with_headers)


class OperatorPage:
    """The page's state: settings, ledger, metrics, the overview's snapshot and the
    gate that decides who may act. `app` is what `http.py` mounts.

    Raises:
        ConfigError: the token file cannot be read or is not valid.
    """

    def __init__(self, settings: Settings, ledger: Ledger, metrics: Metrics) -> None:
        self.settings = settings
        self.ledger = ledger
        self.metrics = metrics
        self.snapshot = Snapshot(settings, ledger)
        self.gate = Gate(
            TokenFile(settings.ui.token_file),
            session_s=settings.ui.session_hours * 3600,
            allowed_origins=settings.ui.allowed_origins,
        )
        self.templates = environment()
        self.actions_lock = anyio.Lock()
        self.app: ASGIApp = SecurityHeaders(Starlette(routes=self._routes()))

    def _routes(self) -> list[BaseRoute]:
        def bind(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
            return functools.partial(handler, self)

        static = StaticFiles(packages=[("service.face.ui", "static")])
        return [
            Route("/", bind(views.overview)),
            Mount(
                "/ui",
                routes=[
                    Route("/jobs", bind(views.jobs)),
                    Route("/jobs/{job_id}", bind(views.job)),
                    Route("/jobs/{job_id}/retry", bind(actions.retry), methods=["POST"]),
                    Route("/failures", bind(views.failures)),
                    Route("/login", bind(actions.login_form)),
                    Route("/login", bind(actions.login), methods=["POST"]),
                    Route("/logout", bind(actions.logout), methods=["POST"]),
                    Mount("/static", app=static, name="static"),
                ],
            ),
            Route("/{path:path}", bind(views.not_found), methods=["GET", "HEAD", "POST"]),
        ]

    # -- what every page shares --------------------------------------------------------

    def session(self, request: Request) -> Session | None:
        if not self.gate.tokens.configured:
            return None
        return self.gate.session(request.cookies.get(SESSION_COOKIE))

    def render(
        self, request: Request, template: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        partial = "hx-request" in request.headers and (
            "hx-history-restore-request" not in request.headers
        )
        session = self.session(request)
        html = self.templates.get_template(template).render(
            partial=partial,
            version=__version__,
            replica=self.settings.replica_id,
            refresh_s=self.settings.ui.refresh_s,
            session=session,
            can_sign_in=self.gate.tokens.configured,
            path=request.url.path,
            **context,
        )
        return HTMLResponse(html, status)

    def message(self, request: Request, status: int, title: str, text: str) -> HTMLResponse:
        tone = "bad" if status in (403, 409) else "warn"
        return self.render(
            request, "message.html", status, title=title, text=text, tone=tone, nav=""
        )
