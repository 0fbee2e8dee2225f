"""JetStream streams of their own for the tests, on the machine's NATS server (or
$FILEDOCK_TEST_NATS_URL), each deleted after its test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from conftest import skip_or_fail
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType

NATS_URL = os.environ.get("FILEDOCK_TEST_NATS_URL", "nats://127.0.0.1:4222")


async def _quiet(e: Exception) -> None:
    """The error callback of the tests' own clients (nats-py's logs each with a traceback)."""


async def connect(url: str, **options: Any) -> Client:
    nc = Client()
    await nc.connect(
        url, error_cb=_quiet, max_reconnect_attempts=1, reconnect_time_wait=1, **options
    )
    return nc


@dataclass
class Stream:
    name: str
    prefix: str  # the stream takes `prefix.>`
    js: JetStreamContext

    async def messages(self) -> int:
        return (await self.js.stream_info(self.name)).state.messages


@asynccontextmanager
async def stream_on(url: str, storage: StorageType = StorageType.MEMORY) -> AsyncIterator[Stream]:
    try:
        nc = await connect(url, connect_timeout=2)
    except Exception as e:
        skip_or_fail(f"NATS at {url} is not reachable: {e!r}")
    tag = uuid.uuid4().hex[:12]
    s = Stream(name=f"FDTEST_{tag}", prefix=f"fdtest.{tag}", js=nc.jetstream(timeout=5))
    try:
        await s.js.add_stream(name=s.name, subjects=[f"{s.prefix}.>"], storage=storage)
        yield s
    finally:
        try:
            if not nc.is_closed:  # else its server is gone, and the stream with it
                await s.js.delete_stream(s.name)
        finally:
            await nc.close()
