"""A real ASGI app served by uvicorn on a free loopback port, in a background thread,
for the receivers the tests send to (HTTP sinks, webhooks)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from conftest import free_port, wait_for


@contextmanager
def serving(app: Any, name: str, certfile: Path | None = None) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL (`https` with `certfile`,
    its key and certificate chain in one PEM file)."""
    port = free_port()
    config = uvicorn.Config(
        app,
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
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), timeout=15, what="uvicorn to start")
    assert server.started, "uvicorn exited before it started (see the log)"
    try:
        yield f"{'https' if certfile else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        assert not thread.is_alive(), "uvicorn did not stop"
