"""The overview's figures, gathered off the request path while someone looks.

Some figures cost in proportion to what is kept, not to what is shown: walking
`archive/` to count its files, counting a million ledger rows per state. A request
must not wait for them, and ten people on the page must not pay ten times. So
`Snapshot.run` (a task `app.py` starts) gathers them all while the page has been asked
for within the last `_WATCHED_S`, then waits the refresh interval, and the page shows
the latest set with its time. Walking the folders slows down when it is slow: the next
walk waits at least ten times as long as the last one took, so it never holds more
than a tenth of a core. Without `run` (tests, benchmarks) a page gathers them itself
when they are older than the interval.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import anyio.to_thread

from service.arrivals.report import expectations_report
from service.face.logs import get_logger
from service.face.status import folder_report, waiting_report
from service.ledger import Ledger
from service.ledger.pages import LedgerOverview
from service.settings import Settings

__all__ = ["WINDOW_S", "Overview", "Snapshot"]

log = get_logger("filedock.ui")

WINDOW_S: Final = 3600.0  # the routes' recent window
_WATCHED_S: Final = 120.0
_WAITING_SHOWN: Final = 50


@dataclass
class Overview:
    """What the overview shows, as of `at`."""

    at: float
    folders: dict[str, dict[str, Any]]
    free: dict[str, int | None]
    waiting: list[dict[str, Any]]
    waiting_total: int
    waiting_reasons: list[tuple[str, int]]
    ledger: LedgerOverview
    expectations: list[dict[str, Any]] = field(default_factory=list)
    took_s: float = 0.0


class Snapshot:
    """The latest `Overview` and the loop that keeps it fresh while it is watched."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self.current: Overview | None = None
        self.running = False
        self._asked = 0.0
        self._next_walk = 0.0
        self._walk: dict[str, Any] | None = None
        self._wake: anyio.Event | None = None
        self._ready: anyio.Event | None = None
        self._limiter: anyio.CapacityLimiter | None = None

    async def get(self, wait_s: float = 5.0) -> Overview | None:
        """The latest overview; the first one is waited for (up to `wait_s`)."""
        self._asked = time.monotonic()
        if self._wake is not None:
            self._wake.set()
        if not self.running:
            if self.current is None or time.time() - self.current.at >= self.settings.ui.refresh_s:
                await self.refresh()
            return self.current
        if self.current is None:
            if self._ready is None:
                self._ready = anyio.Event()
            with anyio.move_on_after(wait_s):
                await self._ready.wait()
        return self.current

    async def run(self) -> None:
        """Refresh every `ui.refresh_s` while the page is watched; sleep otherwise."""
        self.running = True
        self._wake = anyio.Event()
        try:
            while True:
                if time.monotonic() - self._asked > _WATCHED_S:
                    await self._wake.wait()
                self._wake = anyio.Event()
                try:
                    await self.refresh()
                except Exception as e:
                    log.error("the overview could not be gathered", extra={"error": repr(e)[:300]})
                await anyio.sleep(self.settings.ui.refresh_s)
        finally:
            self.running = False

    async def refresh(self) -> Overview:
        started = time.monotonic()
        now = time.time()
        if self._walk is None or started >= self._next_walk:
            if self._limiter is None:
                self._limiter = anyio.CapacityLimiter(1)
            self._walk = await anyio.to_thread.run_sync(self._walk_folders, limiter=self._limiter)
            took = time.monotonic() - started
            self._next_walk = started + 10 * took
        ledger = await self.ledger.page_overview(now - WINDOW_S)
        expectations = await expectations_report(self.settings, self.ledger, now, last=1)
        self.current = Overview(
            at=now,
            ledger=ledger,
            expectations=expectations,
            took_s=time.monotonic() - started,
            **self._walk,
        )
        if self._ready is not None:
            self._ready.set()
        return self.current

    def _walk_folders(self) -> dict[str, Any]:
        s = self.settings
        folders = folder_report(s)
        free: dict[str, int | None] = {}
        for name in folders:
            try:
                st = os.statvfs(s.folder(name))
                free[name] = st.f_bavail * st.f_frsize
            except OSError:
                free[name] = None
        waiting = waiting_report(s)
        reasons = Counter(_reason_kind(w["reason"]) for w in waiting)
        return {
            "folders": folders,
            "free": free,
            "waiting": waiting[:_WAITING_SHOWN],
            "waiting_total": len(waiting),
            "waiting_reasons": reasons.most_common(),
        }


def _reason_kind(reason: str) -> str:
    """A reason without its particulars (`settling: modified 3s ago …` is `settling`)."""
    return reason.split(":", 1)[0].split(",", 1)[0]
