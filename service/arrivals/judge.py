"""Arrival expectations judged: for each window of each route's `expect:` whose grace
has passed, did enough matching files come, and in time?

A window runs from the previous deadline (or from where the previous window's late
files ended) to its deadline. Its judgement:

- `on_time`: `min_files` matching jobs, not failed, were detected by the deadline;
- `late`: they were, but only within `grace_s` after it (those files are this
  window's; the next window counts from the last of them);
- `failed`: enough files came by the end of the grace, but too many of their jobs
  failed;
- `missing`: fewer than `min_files` came by the end of the grace.

Every judgement is written once in the ledger, with its event for the notify
channels, by whichever replica writes it first; the windows that ended while no
replica ran are judged at the next start from the arrivals the ledger holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import anyio

from service.arrivals.schedule import deadlines, previous_deadline
from service.discovery.routes import glob_to_regex
from service.face.metrics import Metrics
from service.ledger import Arrival, Ledger, WindowRecord
from service.ledger.base import Judgement
from service.notify.base import Event
from service.notify.events import Outbox
from service.pipeline.streams import shielded
from service.settings import Expectation, Route, Settings
from service.storage.names import rfc3339

__all__ = ["Judge", "arrival_event", "judge_window", "local_time"]

log = logging.getLogger("filedock.arrivals")

# A file detected just before the grace ends has its ledger row by this much later.
_SETTLE_S = 2.0
# At most this long between two passes: the "missing" gauge clears when a file comes.
_PASS_S = 30.0


def judge_window(
    expectation: Expectation, start: float, deadline: float, arrivals: Sequence[Arrival]
) -> tuple[Judgement, int, int, float]:
    """The judgement of the window (`start`, `deadline`] from the matching arrivals up
    to the end of its grace, oldest first: (judgement, files, failed, until)."""
    need = expectation.min_files
    judgement: Judgement
    good = [a for a in arrivals if a.state != "failed"]
    if sum(1 for a in good if a.detected_at <= deadline) >= need:
        judgement, until = "on_time", deadline
    elif len(good) >= need:
        judgement, until = "late", max(deadline, good[need - 1].detected_at)
    elif len(arrivals) >= need:
        judgement, until = "failed", deadline
    else:
        judgement, until = "missing", deadline
    counted = [a for a in arrivals if a.detected_at <= until] if judgement != "failed" else arrivals
    return judgement, len(counted), sum(1 for a in counted if a.state == "failed"), until


class Judge:
    """Judges the windows of every expectation as their grace ends (`run`); `due` is
    one pass at a given time, which the tests call with their own clock."""

    def __init__(
        self, settings: Settings, ledger: Ledger, metrics: Metrics, outbox: Outbox, owner: str
    ) -> None:
        self.settings, self.ledger, self.metrics = settings, ledger, metrics
        self.outbox, self.owner = outbox, owner
        self.expected = [(route, e) for route in settings.routes for e in route.expect]
        for route, e in self.expected:
            metrics.declare_expectation(route.name, e.name)

    def __bool__(self) -> bool:
        return bool(self.expected)

    async def run(self) -> None:
        """Judge what is due, then sleep until the next grace ends (at most `_PASS_S`)."""
        while True:
            now = time.time()
            try:
                await shielded(self.due(now))
            except Exception as e:
                self.metrics.ledger_errors.inc()
                log.error("could not judge the arrival windows", extra={"error": repr(e)[:300]})
            await anyio.sleep(max(0.05, min(_PASS_S, self.next_due(now) - time.time())))

    def next_due(self, now: float) -> float:
        """When the earliest window not judged yet can be (the end of its grace)."""
        ends = [
            next(deadlines(e, now - e.grace_s - self._settle(route)), now + _PASS_S)
            + e.grace_s
            + self._settle(route)
            for route, e in self.expected
        ]
        return min(ends, default=now + _PASS_S)

    async def due(self, now: float) -> list[WindowRecord]:
        """Judge every window whose grace has ended by `now`, oldest first; the windows
        this replica wrote (another replica may have written some of them)."""
        written: list[WindowRecord] = []
        for route, e in self.expected:
            written += await self._expectation(route, e, now)
        return written

    def _settle(self, route: Route) -> float:
        # A file that must settle is detected that much before its job is written.
        return _SETTLE_S + (route.settle_s if route.readiness != "rename" else 0.0)

    async def _expectation(self, route: Route, e: Expectation, now: float) -> list[WindowRecord]:
        written = []
        while True:
            last = await self._latest(route, e, now)
            deadline = next(deadlines(e, last.deadline), None)
            if deadline is None:
                break
            self.metrics.expectation_next_deadline.labels(route.name, e.name).set(deadline)
            if deadline + e.grace_s + self._settle(route) > now:
                break
            window = await self._judge(route, e, last.until, deadline, now)
            events = []
            if window.judgement != "on_time":
                events = self.outbox.records([arrival_event(route, e, window)])
            if await self.ledger.record_window(window, events):
                written.append(window)
                self._judged(e, window)
                if events:
                    self.outbox.written()
        await self._missing_gauge(route, e, now)
        return written

    async def _latest(self, route: Route, e: Expectation, now: float) -> WindowRecord:
        """The expectation's latest window; on first sight, a `watching` row from which
        the windows ending after now are judged."""
        latest = await self.ledger.windows(route.name, e.name, 1)
        if latest:
            return latest[0]
        start = previous_deadline(e, now)
        start = now if start is None else start
        await self.ledger.record_window(
            WindowRecord(
                route=route.name,
                expectation=e.name,
                deadline=now,
                start=start,
                judgement="watching",
                until=start,
                judged_at=now,
                judged_by=self.owner,
            )
        )
        return (await self.ledger.windows(route.name, e.name, 1))[0]

    async def _judge(
        self, route: Route, e: Expectation, start: float, deadline: float, now: float
    ) -> WindowRecord:
        pattern = glob_to_regex(e.match) if e.match else None
        arrivals = [
            a
            for a in await self.ledger.arrivals(route.name, start, deadline + e.grace_s)
            if pattern is None or pattern.match(a.relative_path)
        ]
        judgement, files, failed, until = judge_window(e, start, deadline, arrivals)
        return WindowRecord(
            route=route.name,
            expectation=e.name,
            deadline=deadline,
            start=start,
            judgement=judgement,
            files=files,
            failed=failed,
            until=until,
            judged_at=now,
            judged_by=self.owner,
        )

    def _judged(self, e: Expectation, w: WindowRecord) -> None:
        self.metrics.arrival_windows.labels(w.route, w.expectation, w.judgement).inc()
        level = logging.INFO if w.judgement == "on_time" else logging.WARNING
        log.log(
            level,
            f"arrival window {w.judgement}",
            extra={
                "route": w.route,
                "expectation": w.expectation,
                "deadline": local_time(e, w.deadline),
                "files": w.files,
                "failed": w.failed,
                "min_files": e.min_files,
            },
        )

    async def _missing_gauge(self, route: Route, e: Expectation, now: float) -> None:
        """1 while the last window judged is missing and no matching file came since."""
        gauge = self.metrics.expectation_missing.labels(route.name, e.name)
        last = (await self.ledger.windows(route.name, e.name, 1))[0]
        if last.judgement != "missing":
            gauge.set(0)
            return
        pattern = glob_to_regex(e.match) if e.match else None
        since = await self.ledger.arrivals(route.name, last.until, now)
        came = any(pattern is None or pattern.match(a.relative_path) for a in since)
        gauge.set(0 if came else 1)


def local_time(e: Expectation, ts: float) -> str:
    """A moment as the expectation's people read it: `2026-03-30 06:00 CEST`."""
    moment = datetime.fromtimestamp(ts, e.zone)
    seconds = ":%S" if moment.second else ""
    return moment.strftime(f"%Y-%m-%d %H:%M{seconds} %Z")


def arrival_event(route: Route, e: Expectation, w: WindowRecord) -> Event:
    """The CloudEvent of a judged window; its id is the window's, so it is sent once."""
    what = e.match or route.match
    grace = f" (+{e.grace_s:g} s grace)" if e.grace_s else ""
    messages = {
        "missing": f"{w.files} of {e.min_files} files matching {what!r} arrived"
        f" by {local_time(e, w.deadline)}{grace}",
        "late": f"the files matching {what!r} due by {local_time(e, w.deadline)} arrived"
        f" late, the last at {local_time(e, w.until)}",
        "failed": f"{w.files} files matching {what!r} arrived by {local_time(e, w.deadline)}"
        f"{grace}, but {w.failed} of them failed: fewer than {e.min_files} went through",
        "on_time": f"{w.files} files matching {what!r} arrived by {local_time(e, w.deadline)}",
    }
    data: dict[str, Any] = {
        "route": w.route,
        "expectation": w.expectation,
        "judgement": w.judgement,
        "message": messages[w.judgement],
        "schedule": e.schedule,
        "timezone": e.timezone,
        "match": what,
        "min_files": e.min_files,
        "grace_s": e.grace_s,
        "window_start": rfc3339(w.start),
        "deadline": rfc3339(w.deadline),
        "deadline_local": local_time(e, w.deadline),
        "files": w.files,
        "failed": w.failed,
    }
    return Event(
        id=f"arrival.{w.route}.{w.expectation}.{rfc3339(w.deadline)}",
        type=f"filedock.arrival.{w.judgement}",
        source=f"/filedock/routes/{w.route}",
        subject=f"{w.route}/{w.expectation}",
        time=rfc3339(w.judged_at) or "",
        data=data,
    )
