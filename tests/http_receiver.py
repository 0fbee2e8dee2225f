"""A real HTTP receiver for the sink tests: a starlette app under uvicorn on loopback.

It keeps each body under its path, checks `Content-Digest` against the body, answers
a repeated `Idempotency-Key` with the answer it gave the first time (storing nothing
twice), refuses other bytes under a path it already holds (409), and fails on demand:
`fail(status)` answers a status without storing, `drop()` stores and then cuts the
connection before its answer is whole (a lost acknowledgement), `hang()` never
answers until the receiver stops (for timeouts).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import uvicorn
from conftest import free_port, wait_for
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send


@dataclass(frozen=True)
class Seen:
    """One request whose body arrived whole."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class _Act:
    what: str  # "status", "drop" or "hang"
    status: int = 0
    body: str = ""


class _Cut(Exception):
    """Raised after the answer's headers: uvicorn closes the connection mid-answer."""


class _CutAnswer(Response):
    """Headers that promise a body which never comes."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-length", b"64")]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        raise _Cut("dropped on purpose")


@dataclass
class Receiver:
    stored: dict[str, bytes] = field(default_factory=dict)
    writes: list[str] = field(default_factory=list)  # a path each time a body is stored
    seen: list[Seen] = field(default_factory=list)
    aborted: int = 0  # requests whose body never arrived whole
    url: str = ""
    _script: deque[_Act] = field(default_factory=deque)
    _answers: dict[str, tuple[int, dict[str, str]]] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    def fail(self, status: int, times: int = 1, body: str = "") -> None:
        self._script.extend([_Act("status", status, body)] * times)

    def drop(self, times: int = 1) -> None:
        self._script.extend([_Act("drop")] * times)

    def hang(self, times: int = 1) -> None:
        self._script.extend([_Act("hang")] * times)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self._handle, methods=["PUT", "POST"])])

    def release(self) -> None:
        """Let every hanging request answer."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._release.set)

    def reset(self) -> None:
        """Forget everything: one server serves a module's tests, each from scratch."""
        self.release()
        self._release = asyncio.Event()
        self.stored.clear()
        self.writes.clear()
        self.seen.clear()
        self.aborted = 0
        self._script.clear()
        self._answers.clear()

    async def _handle(self, request: Request) -> Response:
        self._loop = asyncio.get_running_loop()
        try:
            body = await request.body()
        except ClientDisconnect:
            self.aborted += 1
            return Response(status_code=400)
        path = request.scope["path"]  # percent-decoded (request.url.path re-quotes some)
        self.seen.append(Seen(request.method, path, dict(request.headers), body))
        act = self._script.popleft() if self._script else None
        if act is not None and act.what == "status":
            return Response(act.body, status_code=act.status)
        if act is not None and act.what == "hang":
            await self._release.wait()
            return Response(status_code=503)
        key = request.headers.get("idempotency-key", "")
        if key in self._answers:
            status, headers = self._answers[key]
            return Response(status_code=status, headers=headers | {"Idempotent-Replayed": "true"})
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
        if request.headers.get("content-digest") != f"sha-256=:{digest}:":
            return Response("Content-Digest does not match the body", status_code=400)
        if path in self.stored and self.stored[path] != body:
            return Response("other bytes are stored here", status_code=409)
        self.stored[path] = body
        self.writes.append(path)
        headers = {"ETag": f'"{hashlib.sha256(body).hexdigest()[:16]}"', "Location": path}
        self._answers[key] = (201, headers)
        if act is not None and act.what == "drop":
            return _CutAnswer()
        return Response(status_code=201, headers=headers)


@contextmanager
def http_receiver() -> Iterator[Receiver]:
    """A receiver served by uvicorn in a background thread until the block ends."""
    receiver = Receiver()
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
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="http-receiver", daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), timeout=15, what="uvicorn to start")
    assert server.started, "uvicorn exited before it started (see the log)"
    receiver.url = f"http://127.0.0.1:{port}"
    try:
        yield receiver
    finally:
        receiver.release()
        server.should_exit = True
        thread.join(timeout=15)
        assert not thread.is_alive(), "uvicorn did not stop"
