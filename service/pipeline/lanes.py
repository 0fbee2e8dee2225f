"""A route at run time (its lane: importer, limiter, queue of claimed jobs) and the
order of an ordered lane.

A lane's queue has room for a claim batch, so that while imports are quick the
claimer claims the next batch as the workers import this one (when claims waited
for the workers, the two took turns: docs/benchmarks.md). A lane of slow imports
holds no more than a batch and its workers' next jobs; what it cannot start soon
stays in `transfer/`, where another replica can claim it and the backlog's metrics
count it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import anyio

from service.importers import GroupImporter, Importer, Outcome
from service.pipeline.job import Job
from service.pipeline.streams import put, take_waiting
from service.settings import Route

__all__ = ["GROUP_MAX", "QUICK_S", "Lane", "Lanes", "Ordering", "order_key"]

GROUP_MAX = 16  # jobs a worker takes at once from a grouped lane
QUICK_S = 0.005  # imports this quick are grouped: a thread hand-off costs ~0.1 ms


class Lane:
    """A route's importer, limiter and queue of claimed jobs.

    `grouped` is the importer when it can take several jobs in one go (a sync python
    callable) and the route keeps no order. While its imports are quick (the last
    ones each took under `QUICK_S`), a worker takes what is waiting, up to `GROUP_MAX`
    jobs, and records, imports and hands them on together: one ledger write and one
    thread hand-off for all. Slow imports go one to a worker, side by side.
    """

    def __init__(
        self, route: Route, importer: Importer | None, grouped: GroupImporter | None, room: int
    ) -> None:
        self.route = route
        self.importer = importer
        self.grouped = grouped
        self.limiter = anyio.CapacityLimiter(route.concurrency)
        self._send, self.receive = anyio.create_memory_object_stream[Job](room)
        self._quick = False
        self._taken = anyio.Event()

    async def put(self, job: Job) -> None:
        await put(self._send, job)

    def take(self, first: Job) -> list[Job]:
        """What a worker takes: `first`, and while imports are quick in a grouped lane,
        what waits behind it."""
        limit = GROUP_MAX if self.grouped is not None and self._quick else 1
        jobs = take_waiting(self.receive, first, limit)
        self._taken.set()
        return jobs

    async def wait_for_workers(self) -> None:
        """The claimer's backpressure: run a batch ahead of the workers only while their
        imports are quick."""
        while not self._quick and self._send.statistics().current_buffer_used > (
            self.route.concurrency
        ):
            self._taken = anyio.Event()
            await self._taken.wait()

    def timed(self, outcomes: list[Outcome]) -> None:
        """A grouped import ended: whether this lane's imports are quick."""
        self._quick = all(o.elapsed_s < QUICK_S for o in outcomes)

    def close(self) -> None:
        self._send.close()
        self.receive.close()


class Ordering:
    """Ordered lanes: each job waits for the ticket of the job before it with its key."""

    def __init__(self) -> None:
        self._tail: dict[tuple[str, str], anyio.Event] = {}

    def ticket(self, route: Route, job: Job) -> None:
        if route.order == "none":
            return
        key = (route.name, order_key(route, job.record.relative_path))
        job.after, job.ticket = self._tail.get(key), anyio.Event()
        self._tail[key] = job.ticket

    def done(self, job: Job) -> None:
        """The job has left its lane: the next one with its key may start."""
        if job.ticket is None:
            return
        job.ticket.set()
        for key, tail in list(self._tail.items()):
            if tail is job.ticket:
                del self._tail[key]


def order_key(route: Route, rel: bytes) -> str:
    """The lane key: one for `fifo`, the `key` group of `partition_key` for `partition`."""
    if route.order != "partition" or route.partition_key is None:
        return ""
    m = re.search(route.partition_key, rel.decode("utf-8", "surrogateescape"))
    return m.group("key") or "" if m else ""


class Lanes:
    """The lanes by route name, and the order of the ordered ones."""

    def __init__(self, lanes: list[Lane]) -> None:
        self.by_route = {lane.route.name: lane for lane in lanes}
        self._ordering = Ordering()

    def __iter__(self) -> Iterator[Lane]:
        return iter(self.by_route.values())

    def get(self, route: str) -> Lane | None:
        return self.by_route.get(route)

    async def enqueue(self, lane: Lane, job: Job) -> None:
        """Queue a job for the lane's workers, chained behind its predecessor in order."""
        self._ordering.ticket(lane.route, job)
        await lane.put(job)

    def left(self, job: Job) -> None:
        """The job has left its lane (done with, or waiting outside it)."""
        self._ordering.done(job)
