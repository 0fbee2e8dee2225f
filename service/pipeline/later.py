"""Calls this process makes again after a delay: a job set back after an unexpected
failure, an archive that could not be written yet, a `failed` the ledger did not take.

What is here lives in memory only: a restart's recovery finds those jobs in `proc/`
(or `failed/`) anyway. A call that raises is logged and dropped, never let out: the
task runs in the app's task group, which one escaped exception would end.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable

import anyio

__all__ = ["Later"]

log = logging.getLogger("filedock.pipeline")


class Later:
    """Calls to make after a delay, in this process; `run` makes them in time order."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], Awaitable[None]]]] = []
        self._seq = itertools.count()
        self._wake = anyio.Event()

    def call(self, delay: float, fn: Callable[[], Awaitable[None]]) -> None:
        at = time.monotonic() + delay
        if not self._heap or at < self._heap[0][0]:
            self._wake.set()
        heapq.heappush(self._heap, (at, next(self._seq), fn))

    async def run(self) -> None:
        while True:
            self._wake = anyio.Event()
            delay = self._heap[0][0] - time.monotonic() if self._heap else math.inf
            if delay > 0:
                with anyio.move_on_after(delay):
                    await self._wake.wait()
                continue
            _, _, fn = heapq.heappop(self._heap)
            try:
                await fn()
            except Exception:
                log.exception("a deferred call failed; the next start's recovery resumes its job")
