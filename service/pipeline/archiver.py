"""The archiver: jobs that imported (or are duplicates) go to `archive/…/<id>/`, then
the ledger says `done`, then their folders leave `proc/`.

One batch at a time: what is waiting, never waiting for more (while one batch is
built, the next one gathers). The file work runs in a worker process
(`archive_writer.py`); the ledger writes and their order stay here. A batch's
sources leave `proc/` (once it is recorded `done`) while the worker builds the next
batch, or at once if none is waiting; its metrics and log lines go out meanwhile.
"""

from __future__ import annotations

import logging

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from service.crash import crash_point
from service.errors import JobError
from service.face.logs import job_fields
from service.face.metrics import Metrics
from service.importers import Result
from service.pipeline.job import InFlight, Job
from service.pipeline.later import Later
from service.pipeline.set_aside import SetAsideStage
from service.pipeline.streams import put, shielded, take_waiting
from service.pipeline.transitions import Transitions
from service.settings import Route
from service.storage.archive_writer import Entry, Writer

__all__ = ["Archiver"]

log = logging.getLogger("filedock.pipeline")
_RETRY_S = (1.0, 5.0, 15.0, 60.0)  # an archive that cannot be written yet is tried again


class Archiver:
    def __init__(
        self,
        writer: Writer,
        transitions: Transitions,
        in_flight: InFlight,
        set_aside: SetAsideStage,
        later: Later,
        metrics: Metrics,
        *,
        queue_size: int,
        batch_max: int,
    ) -> None:
        self.writer = writer
        self.transitions = transitions
        self.in_flight = in_flight
        self.set_aside = set_aside
        self.later = later
        self.metrics = metrics
        self._batch_max = batch_max
        self._send: MemoryObjectSendStream[Job]
        self._receive: MemoryObjectReceiveStream[Job]
        self._send, self._receive = anyio.create_memory_object_stream[Job](queue_size)

    def close(self) -> None:
        self._send.close()
        self._receive.close()

    async def take(self, job: Job) -> None:
        """Queue a job recorded or to be recorded `archiving` (a resumed one)."""
        await self._send.send(job)

    async def submit(self, route: Route, jobs: list[Job], *, record_all: bool = False) -> None:
        """Record the jobs `archiving` (one ledger write) and queue them.

        Recorded here, a job that has imported no longer looks `importing`: a crash
        while it waits for the archiver neither imports it again nor blames it for the
        crash. Its archive is then built from the ledger alone, so a job whose result
        holds more (an importer log, pending records) stays `importing` until `done`,
        and a crash meanwhile imports it again. `record_all` records those too: a
        suspect of a crash must not look `importing` once the next suspect starts.
        Should the write fail, the archiver tries it before the build.
        """
        try:
            await shielded(
                self.transitions.archiving(
                    [j for j in jobs if record_all or _rebuildable(j.result)]
                )
            )
        except Exception as e:
            self.metrics.ledger_errors.inc()
            log.error(
                "cannot record jobs archiving; the archiver will", extra={"error": repr(e)[:300]}
            )
        for job in jobs:
            await put(self._send, job)
        if route.order != "none":
            for job in jobs:
                await job.left.wait()  # the next file of an ordered lane waits for this one

    async def run(self) -> None:
        archived: list[Job] = []  # recorded `done`, their sources still in proc/
        async with self._receive:
            while True:
                try:  # each batch is shielded: a stop that cancels ends the loop between two
                    await anyio.lowlevel.checkpoint_if_cancelled()
                except anyio.get_cancelled_exc_class():
                    await shielded(self._remove_sources(archived))
                    raise
                try:
                    first = self._receive.receive_nowait()
                except anyio.WouldBlock:
                    await shielded(self._remove_sources(archived))
                    archived = []
                    try:
                        first = await self._receive.receive()
                    except anyio.EndOfStream:
                        return
                except anyio.EndOfStream:
                    await shielded(self._remove_sources(archived))
                    return
                batch = take_waiting(self._receive, first, self._batch_max)
                archived = await shielded(self._archive_batch(batch, archived))

    async def _archive_batch(self, batch: list[Job], archived: list[Job]) -> list[Job]:
        """Record `archiving` where that is not done yet (and the archive needs nothing
        the ledger does not keep); build and publish the archives, removing the sources
        of `archived` and reporting them meanwhile; record `done`. Returns the jobs now
        `done`, whose sources are still to be removed."""
        try:
            await self.transitions.archiving(
                [j for j in batch if not j.recorded and _rebuildable(j.result)]
            )
        except Exception as e:  # the ledger cannot be written: try the batch again later
            await self._remove_sources(archived)
            for job in batch:
                self._failed(job, e)
            return []
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._report, archived)  # beside the build, off its path
            written = await self.writer.write(
                [Entry(j.record, j.outcome, j.result, j.receipts()) for j in batch],
                remove=[j.id for j in archived],
            )
        for job in archived:
            self._left(job)
        for job, w in zip(batch, written, strict=True):
            if w.failed_path is not None:
                job.record.failed_path = w.failed_path
        published = [j for j, w in zip(batch, written, strict=True) if w.error is None]
        try:
            await self.transitions.done(published)
        except Exception as e:  # published, not yet recorded: the retry finds the archive
            for job in published:
                self._failed(job, e)
            published = []
        crash_point("after_ledger_done")
        for job, w in zip(batch, written, strict=True):
            if w.error is not None:
                if isinstance(w.error, JobError) and not w.error.retryable:
                    await self.set_aside.fail(job, w.error, outcome="set_aside")
                    self._left(job)
                else:
                    self._failed(job, w.error)
        return published

    async def _remove_sources(self, archived: list[Job]) -> None:
        if archived:
            await self.writer.remove([j.id for j in archived])
            for job in archived:
                self._left(job)

    def _failed(self, job: Job, err: BaseException) -> None:
        """The archive side failed (disk full, I/O error, the ledger): the import stands;
        the source stays in proc/ and the archive is tried again later, without a new
        import."""
        r = job.record
        job.archive_tries += 1
        delay = _RETRY_S[min(job.archive_tries, len(_RETRY_S)) - 1]
        self.metrics.archive_retries.inc()
        log.error(
            "cannot archive yet; will try again",
            extra=job_fields(
                r.id,
                route=r.route,
                name=r.name,
                state="archiving",
                error=repr(err)[:500],
                retry_in_s=delay,
            ),
        )
        self.later.call(delay, lambda: self.take(job))

    async def _report(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.transitions.report_done(job)

    def _left(self, job: Job) -> None:
        """The job has left proc/ (or failed/ holds it): its lane and `wait_idle` may go on."""
        if job.record.state == "done":
            self.transitions.report_done(job)  # should its report not have run yet
        job.left.set()
        self.in_flight.release(job)


def _rebuildable(result: Result | None) -> bool:
    """The archive needs nothing of this result that the ledger does not keep (a job
    recovered `archiving` is archived without its result, its log or pending records).
    A job whose result is not stays `importing` until `done`: a crash imports it again."""
    return result is None or (result.log is None and result.pending is None)
