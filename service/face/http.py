"""The HTTP surface on one port: /metrics, /healthz, /readyz, /jobs, and the operator
page under `/` (service/face/ui/).

Served by uvicorn inside the app's task group; the app, not uvicorn, owns the
process's signals.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import anyio
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp

from service.face.metrics import Metrics
from service.ledger import STATES, Ledger
from service.ledger.reach import one_line
from service.storage.fsutil import free_bytes

__all__ = ["Health", "build_http_app", "serve_http"]

_LOOP_STALL_S = 10.0
_PING_S = 2.0


@dataclass
class Health:
    """What the probes look at; the app keeps it up to date."""

    ledger: Ledger
    metrics: Metrics
    folders: dict[str, os.PathLike[str]]
    min_free_bytes: int
    recovery_done: bool = False
    stopping: bool = False
    loop_tick: float = field(default_factory=time.monotonic)
    discovery_alive: Callable[[], bool] = lambda: True
    heartbeat: Callable[[], str | None] = lambda: None  # why it is not current, or None

    def live(self) -> tuple[bool, dict[str, Any]]:
        stall = time.monotonic() - self.loop_tick
        reasons = {}
        if stall > _LOOP_STALL_S:
            reasons["event_loop"] = f"no tick for {stall:.1f}s"
        if not self.discovery_alive():
            reasons["discovery"] = "the watcher/scanner task is not running"
        return not reasons, reasons

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        reasons: dict[str, Any] = {}
        if not self.recovery_done:
            reasons["recovery"] = "start-up recovery has not finished"
        if self.stopping:
            reasons["shutdown"] = "the service is stopping"
        try:
            with anyio.fail_after(_PING_S):
                await self.ledger.ping()
        except Exception as e:
            self.metrics.ledger_errors.inc()  # a ping is a ledger operation too
            # What the ledger's own operations found says more than a ping's timeout.
            said = one_line(e) if not isinstance(e, TimeoutError) else f"no answer in {_PING_S:g} s"
            reasons["ledger"] = self.ledger.reach.problem() or said
        heartbeat = self.heartbeat()
        if heartbeat is not None:  # other replicas may take this one's jobs over
            reasons["heartbeat"] = heartbeat
        for name, path in self.folders.items():
            if not os.access(path, os.W_OK | os.X_OK):
                reasons[f"folder:{name}"] = f"{os.fspath(path)} is not writable"
                continue
            free = free_bytes(os.fspath(path))  # type: ignore[arg-type]
            if free < self.min_free_bytes:
                reasons[f"disk:{name}"] = f"{free} bytes free, below min_free_bytes"
        ok = not reasons
        self.metrics.ready.set(1 if ok else 0)
        return ok, reasons


def build_http_app(health: Health, ui: ASGIApp | None = None) -> Starlette:
    """The probes and /jobs, then (when given) the operator page for every other path."""

    async def metrics(_: Request) -> Response:
        data = await anyio.to_thread.run_sync(generate_latest, health.metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> Response:
        ok, reasons = health.live()
        return JSONResponse({"status": "ok" if ok else "unhealthy", **reasons}, 200 if ok else 503)

    async def readyz(_: Request) -> Response:
        ok, reasons = await health.ready()
        body = {"status": "ready" if ok else "not ready", "reasons": reasons}
        return JSONResponse(body, 200 if ok else 503)

    async def jobs(request: Request) -> Response:
        q = request.query_params
        state = q.get("state")
        if state is not None and state not in STATES:
            return JSONResponse({"error": f"unknown state {state!r}", "states": STATES}, 400)
        try:
            limit = min(int(q.get("limit", "100")), 1000)
        except ValueError:
            return JSONResponse({"error": "limit must be a whole number"}, 400)
        records = await health.ledger.query(
            states=[state] if state else None, route=q.get("route"), limit=limit
        )
        return JSONResponse([r.to_json() for r in records])

    routes: list[BaseRoute] = [
        Route("/metrics", metrics),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/jobs", jobs),
    ]
    if ui is not None:
        routes.append(Mount("", app=ui))
    return Starlette(routes=routes)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the app owns the signals (a second SIGTERM must force the exit)

    async def main_loop(self) -> None:
        # uvicorn wakes ten times a second; once is enough to refresh the Date header,
        # and an idle service should cost next to nothing.
        while not self.should_exit:
            await anyio.sleep(1.0)
            self.should_exit = await self.on_tick(0)


async def serve_http(
    app: Starlette,
    host: str,
    port: int,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; reports the bound port (port 0 picks a free one)."""
    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, lifespan="off"
    )
    server = _Server(config)
    config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup()
    if server.should_exit:
        raise OSError(f"cannot serve HTTP on {host}:{port}")
    bound = port
    for s in server.servers:
        for sock in s.sockets:
            bound = sock.getsockname()[1]
    task_status.started(bound)
    try:
        await server.main_loop()
    finally:
        with anyio.CancelScope(shield=True):
            server.should_exit = True
            await server.shutdown()
