"""The job that travels between the pipeline's stages, and the jobs this process holds.

A `Job` carries what each stage learned for the next one: the claim's vetting, its
place in an ordered lane, its import's result and its archive bookkeeping. No stage
keeps a table keyed by job id for another one to read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio

from service.discovery.intake import Intake
from service.errors import JobError
from service.importers import Result
from service.ledger import DeliveryRecord, JobRecord

__all__ = ["InFlight", "Job"]


@dataclass(eq=False)
class Job:
    """A job on its way through the stages.

    - `vetted`: the claim checked and hashed the file moments ago; `rejected`: the claim
      found it is not a file to import (it is set aside).
    - `after`, `ticket`: its place in an ordered lane. It starts when `after` is set,
      and sets `ticket` when it has left the lane.
    - `outcome`, `result`: what its import produced, for the archiver.
    - `deliveries`: its sinks' states (a route with `deliver:`), by sink name.
    - `recorded`: the ledger holds it `archiving`; `archive_tries`: archive attempts
      that failed; `done_at`: when the ledger recorded it `done`; `reported`: its
      metrics and `archived` line are out; `left`: set once it has left `proc/`.
    """

    record: JobRecord
    vetted: bool = False
    rejected: JobError | None = None
    after: anyio.Event | None = None
    ticket: anyio.Event | None = None
    outcome: str = ""
    result: Result | None = None
    deliveries: dict[str, DeliveryRecord] = field(default_factory=dict)
    recorded: bool = False
    archive_tries: int = 0
    done_at: float = 0.0
    reported: bool = False
    left: anyio.Event = field(default_factory=anyio.Event)

    @property
    def id(self) -> str:
        return self.record.id

    def receipts(self) -> tuple[dict[str, Any], ...]:
        """Each sink's state and receipts, for the manifest or `error.json`."""
        return tuple(d.to_json() for _, d in sorted(self.deliveries.items()))


class InFlight:
    """The jobs this process holds, from their claim (or resumption) until they are
    archived, set aside or set back; `wait_idle` returns when none is (and none queued)."""

    def __init__(self, intake: Intake) -> None:
        self.jobs: dict[str, Job] = {}
        self._intake = intake
        self._changed = anyio.Event()

    def __contains__(self, job_id: str) -> bool:
        return job_id in self.jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def hold(self, job: Job) -> None:
        self.jobs[job.id] = job

    def release(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        self.wake()

    def wake(self) -> None:
        """What `wait_idle` waits on changed: a job released, or files left the intake."""
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_idle(self, *, include_intake: bool = True) -> None:
        """Return when nothing is in flight (and, by default, nothing is queued either)."""
        while self.jobs or (include_intake and self._intake.pending()):
            await self._changed.wait()
