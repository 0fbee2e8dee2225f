"""When jobs go back to work: due retries (of an import or of a sink's delivery) from
the ledger, jobs resumed or recovered, and what the service itself must try again
later.

A retry's time lives in the ledger (`next_attempt_at`), so it survives a restart;
the scheduler takes due jobs every second (`FOR UPDATE SKIP LOCKED` on PostgreSQL)
and puts them back in their lane. `Later` (`later.py`) holds what is tried again
within this process only.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio

from service.errors import JobError
from service.face.logs import job_fields
from service.face.metrics import Metrics
from service.ledger import JobRecord, Ledger
from service.ledger.reach import one_line
from service.pipeline.job import InFlight, Job
from service.pipeline.lanes import Lanes
from service.pipeline.later import Later
from service.pipeline.set_aside import SetAsideStage
from service.pipeline.streams import shielded
from service.pipeline.transitions import Transitions
from service.settings import Route, Settings

__all__ = ["Later", "Retries", "backoff"]

log = logging.getLogger("filedock.pipeline")
_DEFER_S = 5.0  # a job the service could not handle (the ledger failed) is resumed after


class Retries:
    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        metrics: Metrics,
        transitions: Transitions,
        in_flight: InFlight,
        lanes: Lanes,
        archive: Callable[[Job], Awaitable[None]],
        deliver: Callable[[Job], Awaitable[None]],
        set_aside: SetAsideStage,
        later: Later,
        *,
        owner: str,
    ) -> None:
        self.settings = settings
        self.owner = owner  # this instance: the due jobs it takes are leased to it
        self.ledger = ledger
        self.metrics = metrics
        self.transitions = transitions
        self.in_flight = in_flight
        self.lanes = lanes
        self._archive = archive
        self._deliver = deliver
        self.set_aside = set_aside
        self.later = later

    async def run(self, *, interval_s: float = 1.0) -> None:
        while True:
            try:
                await self.dispatch_due()
            except Exception as e:  # the ledger is away: the due jobs wait there for it
                self.metrics.ledger_errors.inc()
                log.error("cannot take the due retries", extra={"error": one_line(e)})
            await anyio.sleep(interval_s)

    async def dispatch_due(self) -> int:
        """Hand every due retry to its route's workers; returns how many."""
        s = self.settings
        due = await shielded(self.ledger.take_due(time.time(), 256, self.owner, s.lease_s))
        for record in due:
            await self.resume(record)
        return len(due)

    async def resume(self, record: JobRecord) -> None:
        """Put a job taken from the ledger (a due retry, or recovered) back to work."""
        if record.id in self.in_flight:
            return
        job = Job(record)
        lane = self.lanes.get(record.route)
        if lane is None:
            await self.set_aside.fail(
                job, JobError("unrouted", f"route {record.route!r} is no longer configured")
            )
            return
        self.in_flight.hold(job)
        if record.state == "archiving":
            job.outcome = record.outcome or "imported"
            if lane.route.deliver:  # their receipts go in the manifest
                try:
                    rows = await self.ledger.deliveries(record.id)
                except Exception as e:
                    self.set_back(job, e)
                    return
                job.deliveries = {d.sink: d for d in rows}
            await self._archive(job)
        elif record.state == "delivering":
            await self._deliver(job)
        else:
            await self.lanes.enqueue(lane, job)

    async def wait(
        self,
        route: Route,
        job: Job,
        error_class: str,
        message: str,
        *,
        defer_s: float | None = None,
    ) -> None:
        """The job waits for a retry (`backoff`, or the importer's `defer_s`). An
        unordered lane lets it go: the scheduler takes it back when it is due; an
        ordered lane keeps it in its place."""
        delay = defer_s if defer_s is not None else backoff(route, job.record.attempts)
        await shielded(self.transitions.retry(job, error_class, message, delay))
        if route.order == "none":
            self.in_flight.release(job)

    def set_back(self, job: Job, error: BaseException) -> None:
        """An unexpected failure (the ledger, or a bug): the job stays in proc/ and is
        resumed in a few seconds."""
        r = job.record
        self.metrics.ledger_errors.inc()
        log.error(
            f"could not handle the job; it stays in proc/ and is resumed in {_DEFER_S:g}s",
            extra=job_fields(r.id, route=r.route, name=r.name, error=one_line(error, 500)),
            exc_info=not (isinstance(error, OSError) or self.ledger.reach.down),  # a bug's
        )
        self.in_flight.release(job)
        self.later.call(_DEFER_S, lambda: self.resume(r))


class Policy(Protocol):
    """What sets a backoff: a route's (imports) or a sink's (deliveries)."""

    @property
    def backoff_s(self) -> float: ...

    @property
    def max_backoff_s(self) -> float: ...


def backoff(policy: Policy, attempt: int) -> float:
    """`backoff_s` doubling per attempt, capped at `max_backoff_s`, with ±20 % jitter."""
    base = min(policy.max_backoff_s, policy.backoff_s * math.pow(2, max(0, attempt - 1)))
    return min(policy.max_backoff_s, base * random.uniform(0.8, 1.2))
