"""A real webhook receiver for the channel tests: starlette under uvicorn on loopback.

Every request is checked with `standardwebhooks.Webhook(secret).verify` (the library
receivers use, not our code): a signature it refuses is answered 401 and counted in
`rejected`, one it takes is kept in `accepted`. The answer to an event can be set by
its id (`answer`), so a concurrent batch gets its answers in any order; `gate(n)`
holds requests until `n` are in flight at once (proving the sender's concurrency
without a clock); `hang` holds one until the receiver stops (for timeouts). Served
over HTTPS when given a certificate.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from conftest import free_port, wait_for
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@dataclass(frozen=True)
class Delivered:
    """One request whose signature verified."""

    headers: dict[str, str]
    body: bytes
    doc: dict[str, Any]


@dataclass
class WebhookReceiver:
    secret: str
    url: str = ""
    accepted: list[Delivered] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # why each refused request was
    max_in_flight: int = 0
    _answers: dict[str, tuple[int, str]] = field(default_factory=dict)
    _hang: set[str] = field(default_factory=set)
    _gate_at: int = 0
    _in_flight: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _opened: asyncio.Event | None = None
    _release: asyncio.Event | None = None

    def answer(self, event_id: str, status: int, body: str = "") -> None:
        self._answers[event_id] = (status, body)

    def hang(self, event_id: str) -> None:
        self._hang.add(event_id)

    def gate(self, n: int) -> None:
        """Hold requests until `n` are in flight together; then let all through."""
        self._gate_at = n

    def release(self) -> None:
        if self._loop is not None and self._release is not None:
            self._loop.call_soon_threadsafe(self._release.set)

    def reset(self, secret: str) -> None:
        self.release()
        self.secret = secret
        self.accepted.clear()
        self.rejected.clear()
        self.max_in_flight = self._in_flight = self._gate_at = 0
        self._answers.clear()
        self._hang.clear()
        self._opened = self._release = None

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self._handle, methods=["POST"])])

    async def _handle(self, request: Request) -> Response:
        self._loop = asyncio.get_running_loop()
        if self._release is None:
            self._opened, self._release = asyncio.Event(), asyncio.Event()
        assert self._opened is not None
        body = await request.body()
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self._gate_at:
                if self._in_flight >= self._gate_at:
                    self._opened.set()
                await self._opened.wait()
            return await self._judge(request, body)
        finally:
            self._in_flight -= 1

    async def _judge(self, request: Request, body: bytes) -> Response:
        try:
            doc = Webhook(self.secret).verify(body, dict(request.headers))
        except WebhookVerificationError as e:
            self.rejected.append(str(e))
            return Response(f"signature refused: {e}", status_code=401)
        event_id = request.headers["webhook-id"]
        if event_id in self._hang:
            assert self._release is not None
            await self._release.wait()
            return Response(status_code=503)
        if event_id in self._answers:
            status, text = self._answers[event_id]
            return Response(text, status_code=status)
        self.accepted.append(Delivered(dict(request.headers), body, doc))
        return Response(status_code=204)


@contextmanager
def webhook_receiver(secret: str, certfile: Path | None = None) -> Iterator[WebhookReceiver]:
    """A receiver served by uvicorn in a background thread until the block ends;
    `certfile` (its key and certificate chain in one PEM file): served over HTTPS."""
    receiver = WebhookReceiver(secret)
    port = free_port()
    config = uvicorn.Config(
        receiver.app(),
        host="127.0.0.1",
        port=port,
        http="h11",
        ws="none",
        lifespan="off",
        loop="asyncio",
        log_config=None,
        access_log=False,
        ssl_certfile=certfile,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="webhook-receiver", daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), timeout=15, what="uvicorn to start")
    assert server.started, "uvicorn exited before it started (see the log)"
    receiver.url = f"{'https' if certfile else 'http'}://127.0.0.1:{port}/hooks/filedock"
    try:
        yield receiver
    finally:
        receiver.release()
        server.should_exit = True
        thread.join(timeout=15)
        assert not thread.is_alive(), "uvicorn did not stop"
