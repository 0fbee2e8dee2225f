"""Small helpers for the bounded streams between the stages, and for bookkeeping that
must not be cancelled halfway."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["put", "shielded", "take_waiting"]

T = TypeVar("T")


async def shielded(coro: Awaitable[T]) -> T:
    """Await bookkeeping that must finish even when the caller is being cancelled."""
    with anyio.CancelScope(shield=True):
        return await coro
    raise AssertionError("unreachable")  # mypy: a shielded scope never swallows the return


def take_waiting(receive: MemoryObjectReceiveStream[T], first: T, limit: int) -> list[T]:
    """`first` and what is already waiting behind it, up to `limit` (none is waited for)."""
    items = [first]
    while len(items) < limit:
        try:
            items.append(receive.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            break
    return items


async def put(send: MemoryObjectSendStream[T], item: T) -> None:
    """Send `item` as `send()` does, but yield to the event loop only when the stream
    is full.

    `send()` yields at every call, and a turn of the loop runs every ready task and
    polls epoll: two such sends a job cost 10 % of a 10,000-file burst's throughput
    (docs/benchmarks.md, "Burst throughput"). A cancelled task still stops here, as
    at `send()`: at shutdown the receiving workers are gone.
    """
    await anyio.lowlevel.checkpoint_if_cancelled()
    try:
        send.send_nowait(item)
    except anyio.WouldBlock:
        await send.send(item)
