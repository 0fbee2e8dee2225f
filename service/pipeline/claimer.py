"""The claimer: ready files from the intake, claimed in batches into `proc/<id>/`, then
queued in their lane.

A claim batch is what arrives within `batch_max_delay_ms` (up to `batch_max_files`):
its rows are inserted in one ledger write, its renames share one durability barrier
(`claim.py`), all in one trip to a worker thread.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from service.crash import crash_point
from service.discovery.intake import Candidate, Intake
from service.discovery.readiness import Readiness
from service.face.logs import job_fields
from service.face.metrics import Metrics
from service.ledger import JobRecord
from service.ledger.reach import one_line
from service.pipeline.checks import needs_dirs
from service.pipeline.job import InFlight, Job
from service.pipeline.lanes import Lane, Lanes
from service.pipeline.streams import shielded, take_waiting
from service.pipeline.transitions import Transitions
from service.settings import Route, Settings
from service.storage.claim import ClaimResult, claim_batch, companion_suffixes
from service.storage.names import new_job_id

__all__ = ["Claimer"]

log = logging.getLogger("filedock.pipeline")


class Claimer:
    def __init__(
        self,
        settings: Settings,
        intake: Intake,
        readiness: Readiness,
        lanes: Lanes,
        transitions: Transitions,
        in_flight: InFlight,
        metrics: Metrics,
        fs_threads: anyio.CapacityLimiter,
        *,
        owner: str,
    ) -> None:
        self.settings = settings
        self.owner = owner  # this instance: its claims' leases are its own
        self.intake = intake
        self.readiness = readiness
        self.lanes = lanes
        self.transitions = transitions
        self.in_flight = in_flight
        self.metrics = metrics
        self._fs_threads = fs_threads
        self.transfer: Path = settings.folder("transfer")
        self.proc: Path = settings.folder("proc")
        self.temp: Path = settings.folder("temp")
        self._unsure: list[str] = []  # rows that may be in the ledger without a claim

    async def run(self, lane: Lane) -> None:
        """Claim a lane's ready files, a batch at a time."""
        receive = self.intake.receive[lane.route.name]
        async with receive:
            while True:
                try:
                    first = await receive.receive()
                except anyio.EndOfStream:
                    return
                batch = await self._gather(receive, first)
                claimed = await shielded(self._claim(lane.route, batch))
                for job in claimed:
                    await self.lanes.enqueue(lane, job)
                await lane.wait_for_workers()

    async def _gather(
        self, receive: MemoryObjectReceiveStream[Candidate], first: Candidate
    ) -> list[Candidate]:
        """`first` and what else arrives within the batch delay, up to a batch: what
        waits is taken at once, and only an empty queue is waited on."""
        limit = self.settings.batch_max_files
        batch = take_waiting(receive, first, limit)
        with anyio.move_on_after(self.settings.batch_max_delay_ms / 1000):
            while len(batch) < limit:
                try:
                    more = await receive.receive()
                except anyio.EndOfStream:
                    break
                batch += take_waiting(receive, more, limit - len(batch))
        return batch

    async def _claim(self, route: Route, batch: list[Candidate]) -> list[Job]:
        now = time.time()
        s = self.settings
        records = [
            JobRecord(
                id=new_job_id(now),
                route=route.name,
                name=c.rel.rsplit(b"/", 1)[-1],
                relative_path=c.rel,
                state="claimed",
                detected_at=c.detected_at,
                created_at=now,
                updated_at=now,
                owner=self.owner,
                lease_expires_at=now + s.lease_s,
            )
            for c in batch
        ]
        if not await self._insert(records):
            self._left_intake(batch)
            await anyio.sleep(1.0)
            return []
        results = await anyio.to_thread.run_sync(
            lambda: claim_batch(
                self.transfer,
                self.proc,
                [(r.relative_path, r.id) for r in records],
                companions=companion_suffixes(route),
                max_size=route.max_size_bytes,
                temp=self.temp if needs_dirs(route) else None,
                barrier_mode=s.barrier,
            ),
            limiter=self._fs_threads,
        )
        self._left_intake(batch)
        claimed, lost = [], []
        for record, result in zip(records, results, strict=True):
            if result.status == "claimed":
                job = _job(record, result)
                claimed.append(job)
                self.in_flight.hold(job)
                crash_point("after_claim")
                self.transitions.claimed(job)
            else:
                lost.append(record.id)
                self._not_claimed(route, record, result)
        try:
            await self.transitions.unclaimed(lost)
        except Exception as e:
            self._unsure += lost
            self._ledger_failed(e, "ledger unavailable; rows of files not claimed go later")
        return claimed

    async def _insert(self, records: list[JobRecord]) -> bool:
        """The batch's rows, after those of earlier batches that may be in the ledger
        without a claim; False (no file moves) when the ledger fails.

        An insert whose answer is lost with its connection may have committed: its rows
        are deleted before the next insert, so that the files, claimed again later under
        new ids, have one row each.
        """
        unsure, self._unsure = self._unsure, []
        try:
            await self.transitions.unclaimed(unsure)
        except Exception as e:
            self._unsure += unsure
            self._ledger_failed(e)
            return False
        try:
            await self.transitions.insert(records)
        except Exception as e:
            self._unsure += [r.id for r in records]
            self._ledger_failed(e)
            return False
        return True

    def _ledger_failed(
        self, error: Exception, message: str = "ledger unavailable; files stay in transfer/"
    ) -> None:
        self.metrics.ledger_errors.inc()
        log.error(message, extra={"error": one_line(error)})

    def _left_intake(self, batch: list[Candidate]) -> None:
        for c in batch:
            self.intake.release(c.rel)
        self.in_flight.wake()  # files not claimed (gone, open for writing) hold no job

    def _not_claimed(self, route: Route, record: JobRecord, result: ClaimResult) -> None:
        if result.status == "busy":
            self.metrics.claims_put_off.labels(route.name).inc()
            self.readiness.busy(route, record.relative_path)
        elif result.status == "error":
            log.error(
                "cannot claim; left in transfer/",
                extra=job_fields(route=route.name, name=record.relative_path, error=result.error),
            )


def _job(record: JobRecord, result: ClaimResult) -> Job:
    """The job, with what its claim learned."""
    job = Job(record)
    if result.vetted is not None:
        v = result.vetted
        record.size, record.mtime_ns, record.sha256 = v.size, v.mtime_ns, v.sha256
        job.vetted = True
    elif result.rejected is not None:
        job.rejected = result.rejected
    return job
