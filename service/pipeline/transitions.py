"""The one place a job's state changes: each transition writes its ledger columns,
then emits its event to the subscribers (metrics, logs, the tally).

The filesystem is the truth and the ledger its index: each stage calls the
transition after the durable fact it records (the rename, the archive's barrier,
the move to `failed/`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.errors import JobError
from service.importers import Result
from service.ledger import DeliveryRecord, JobRecord, Ledger
from service.ledger.base import OutboxRecord
from service.notify.events import Outbox, job_event
from service.pipeline.events import Kind, Subscriber, Transition
from service.pipeline.job import Job
from service.storage import archive as arch
from service.storage.names import rfc3339

__all__ = ["Transitions"]

_IMPORTING = ("attempts", "size", "mtime_ns", "sha256", "history")
_WAITING = ("next_attempt_at", "error_class", "error", "history")
_ARCHIVING = ("outcome", "archive_path", "duplicate_of", "history", "sha256", "size", "mtime_ns")
_DELIVERING = (
    "outcome",
    "history",
    "sha256",
    "size",
    "mtime_ns",
    "next_attempt_at",
    "error_class",
    "error",
)
_DONE = ("outcome", "archive_path", "failed_path")
_ARCHIVED = (*_ARCHIVING, "failed_path")  # `done` for a job never recorded `archiving`
_FAILED = (
    "outcome",
    "error_class",
    "error",
    "failed_path",
    "next_attempt_at",
    "history",
    "sha256",
    "size",
    "mtime_ns",
    "attempts",
)


class Transitions:
    """Writes each state change, with the events it causes for the outbox (`outbox`:
    the configured channels; none, no events), and tells the subscribers."""

    def __init__(
        self, ledger: Ledger, subscribers: Sequence[Subscriber], outbox: Outbox | None = None
    ) -> None:
        self.ledger = ledger
        self._subscribers = list(subscribers)
        self.outbox = outbox or Outbox([])

    def _events(
        self, job: Job, kind: str, at: float, sink: DeliveryRecord | None = None
    ) -> list[OutboxRecord]:
        if not self.outbox:
            return []
        extra = {"deliveries": list(job.receipts())} if job.deliveries and sink is None else {}
        return self.outbox.records([job_event(job.record, kind, at=at, sink=sink, **extra)])

    def subscribe(self, subscriber: Subscriber) -> None:
        """One more behaviour on every state change (a notifier, a test's recorder)."""
        self._subscribers.append(subscriber)

    def emit(self, kind: Kind, job: JobRecord, at: float | None = None, **facts: Any) -> None:
        event = Transition(kind, job, time.time() if at is None else at, **facts)
        for subscriber in self._subscribers:
            subscriber(event)

    # -- claim ---------------------------------------------------------------------

    async def insert(self, records: Sequence[JobRecord]) -> None:
        """The rows of a claim batch, `claimed`, before the renames: a crash after a
        rename always finds its job's row."""
        await self.ledger.insert(records)

    def claimed(self, job: Job) -> None:
        """Its rename is done (the row says `claimed` already)."""
        self.emit("claimed", job.record)

    async def unclaimed(self, job_ids: Sequence[str]) -> None:
        """Rows whose file was not claimed after all (gone, or open for writing)."""
        if job_ids:
            await self.ledger.delete(job_ids)

    # -- import --------------------------------------------------------------------

    async def importing(self, jobs: Sequence[Job]) -> None:
        """Attempts counted (each job's history has the new attempt) before they run."""
        await self.ledger.update_many([_fields(j.record, "importing", _IMPORTING) for j in jobs])
        for job in jobs:
            self.emit("importing", job.record)

    async def retry(self, job: Job, error_class: str, message: str, delay: float) -> None:
        """A failed attempt (or check): `waiting` until `delay` has passed."""
        await self._wait(job.record, error_class, message, delay)
        self.emit("retry", job.record, error_class=error_class, retry_in_s=delay)

    async def set_back(self, job: Job, error_class: str, message: str, delay: float) -> None:
        """The service could not finish a step (a move to `failed/`): `waiting` to try it
        again; no attempt is charged for it."""
        await self._wait(job.record, error_class, message, delay)
        self.emit("set_back", job.record, error_class=error_class, retry_in_s=delay)

    async def _wait(self, r: JobRecord, error_class: str, message: str, delay: float) -> None:
        before = r.state
        r.next_attempt_at = time.time() + delay
        r.error_class, r.error = error_class, message[:4000]
        try:
            await self.ledger.update(*_fields(r, "waiting", _WAITING))
        except Exception:
            r.state = before  # not waiting: the job is set back and resumed as it was
            raise

    # -- deliver -------------------------------------------------------------------

    async def delivering(self, jobs: Sequence[Job], rows: Sequence[DeliveryRecord]) -> None:
        """Imported (or received, without an importer), bound for its sinks: the jobs
        `delivering` and their sinks' rows, in one transaction. A crash from here on
        delivers again; it never imports again."""
        now = time.time()
        for job in jobs:
            r = job.record
            r.next_attempt_at = r.error_class = r.error = None
            r.history.append({"event": "delivering", "at": rfc3339(now), "outcome": job.outcome})
        for row in rows:
            row.updated_at = now
        await self.ledger.save_deliveries(
            rows, [_fields(j.record, "delivering", _DELIVERING) for j in jobs]
        )
        for job in jobs:
            self.emit("delivering", job.record)

    async def sink(self, job: Job, row: DeliveryRecord, **facts: Any) -> None:
        """A sink's state changed: an attempt began, or ended (`outcome` in `facts`:
        delivered, found, retry, failed, paused). A sink failed for good is an event."""
        row.updated_at = time.time()
        events = self._events(job, "sink", row.updated_at, row) if row.state == "failed" else []
        await self.ledger.save_deliveries([row], events=events)
        if events:
            self.outbox.written()
        if "outcome" in facts:
            self.emit("delivery", job.record, row.updated_at, sink=row, **facts)

    async def delivery_waits(self, job: Job, next_attempt_at: float | None) -> None:
        """Its open sinks wait: the job stays `delivering`, due again at
        `next_attempt_at` (none: this process retries it itself, in its lane's order)."""
        job.record.next_attempt_at = next_attempt_at
        await self.ledger.update(*_fields(job.record, "delivering", ("next_attempt_at",)))

    # -- archive -------------------------------------------------------------------

    @staticmethod
    def bound_for_archive(job: Job, outcome: str, result: Result | None, archive_root: Path) -> Job:
        """Imported (or a duplicate): what the archiver needs, in memory; `archiving`
        is written by `archiving` or, with `done`, by `done`."""
        r = job.record
        r.state = "archiving"
        r.outcome = outcome  # type: ignore[assignment]
        r.archive_path = str(arch.archive_dir_for(archive_root, r.id))
        job.outcome, job.result = outcome, result
        return job

    async def archiving(self, jobs: Sequence[Job]) -> None:
        if jobs:
            await self.ledger.update_many(
                [_fields(j.record, "archiving", _ARCHIVING) for j in jobs]
            )
            for job in jobs:
                job.recorded = True
                self.emit("archiving", job.record)

    async def done(self, jobs: Sequence[Job]) -> None:
        """Archived and durable. Its event is emitted by `report_done`, which the archiver
        runs beside the next batch's build."""
        now = time.time()
        for job in jobs:
            job.record.state, job.done_at = "done", now
        events = [e for job in jobs for e in self._events(job, "done", now)]
        try:
            await self.ledger.update_many(
                [_fields(j.record, "done", _DONE if j.recorded else _ARCHIVED) for j in jobs],
                events=events,
            )
        except Exception:
            for job in jobs:
                job.record.state = "archiving"
            raise
        if events:
            self.outbox.written()

    def report_done(self, job: Job) -> None:
        """A job recorded `done`: its event, once."""
        if job.reported:
            return
        job.reported = True
        detail = job.result.detail if job.result else job.record.import_facts()
        self.emit("done", job.record, job.done_at, outcome=job.outcome, detail=detail)

    # -- fail ----------------------------------------------------------------------

    async def failed(self, job: Job, error: JobError, outcome: str, failed_dir: Path) -> None:
        """Moved to `failed/<id>/` with its `error.json`."""
        r, now = job.record, time.time()
        r.outcome = outcome  # type: ignore[assignment]
        r.error_class, r.error = error.error_class, error.message[:4000]
        r.failed_path, r.next_attempt_at = str(failed_dir), None
        job_id, fields = _fields(r, "failed", _FAILED)
        events = self._events(job, "failed", now)
        await self.ledger.update(job_id, fields, events=events)
        if events:
            self.outbox.written()
        self.emit(
            "failed",
            r,
            now,
            outcome=outcome,
            error_class=error.error_class,
            message=error.message,
        )


def _fields(r: JobRecord, state: str, columns: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """A job's new state, `updated_at` (now) and the named columns, for the ledger."""
    r.state = state  # type: ignore[assignment]
    r.updated_at = time.time()
    fields: dict[str, Any] = {c: getattr(r, c) for c in columns}
    fields.update(state=r.state, updated_at=r.updated_at)
    return r.id, fields
