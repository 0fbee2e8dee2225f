"""The import workers: a lane's jobs, checked, imported under the limiters, and handed
on by their verdict: to the archiver, to wait for a retry, or to be set aside.

Each attempt is counted in the ledger (`importing`) before the importer starts, so
a file that kills the service each time ends in `failed/`. After a crash of the
service, each job it interrupted imports alone (no other import runs meanwhile):
if it is the one that kills the service, the next recovery finds it the only one
importing, and only it pays for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from service.crash import crash_point
from service.errors import JobError, Reject, Retry
from service.face.logs import job_fields
from service.face.metrics import Metrics
from service.importers import ImportJob, Outcome, Result
from service.pipeline.archiver import Archiver
from service.pipeline.checks import (
    Checks,
    Duplicate,
    Import,
    SetAside,
    Verdict,
    WaitRetry,
    attempts_left,
)
from service.pipeline.delivery import Delivery
from service.pipeline.job import InFlight, Job
from service.pipeline.lanes import Lane, Lanes
from service.pipeline.retries import Retries
from service.pipeline.set_aside import SetAsideStage
from service.pipeline.streams import shielded
from service.pipeline.transitions import Transitions
from service.settings import CommandImporterSettings, Route
from service.storage.claim import stored_name
from service.storage.names import rfc3339

__all__ = ["Workers"]

log = logging.getLogger("filedock.pipeline")
_FACTS_KEPT = 4096  # bytes of JSON: an importer's facts up to this size go in its attempt


class _Gate:
    """Shared entry for ordinary imports, exclusive entry for suspects of a crash.

    A waiting suspect stops new ordinary imports from starting, so it is not starved.
    """

    def __init__(self) -> None:
        self._cond = anyio.Condition()
        self._running = 0
        self._exclusive = False
        self._suspects_waiting = 0

    @contextlib.asynccontextmanager
    async def enter(self, *, exclusive: bool) -> AsyncIterator[None]:
        async with self._cond:
            if exclusive:
                self._suspects_waiting += 1
                while self._exclusive or self._running:
                    await self._cond.wait()
                self._suspects_waiting -= 1
                self._exclusive = True
            else:
                while self._exclusive or self._suspects_waiting:
                    await self._cond.wait()
            self._running += 1
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                async with self._cond:
                    self._running -= 1
                    if exclusive:
                        self._exclusive = False
                    self._cond.notify_all()


class Workers:
    def __init__(
        self,
        lanes: Lanes,
        checks: Checks,
        transitions: Transitions,
        archiver: Archiver,
        delivery: Delivery,
        retries: Retries,
        set_aside: SetAsideStage,
        in_flight: InFlight,
        metrics: Metrics,
        *,
        global_limiter: anyio.CapacityLimiter,
        folders: dict[str, Path],
    ) -> None:
        self.lanes = lanes
        self.checks = checks
        self.transitions = transitions
        self.archiver = archiver
        self.delivery = delivery
        self.retries = retries
        self.set_aside = set_aside
        self.in_flight = in_flight
        self.metrics = metrics
        self.global_limiter = global_limiter
        self.proc, self.temp, self.archive_root = (
            folders["proc"],
            folders["temp"],
            folders["archive"],
        )
        self.draining = False  # shutting down: start no new import
        self._gate = _Gate()

    async def run(self, lane: Lane) -> None:
        """One worker of a lane."""
        async with lane.receive:
            async for first in lane.receive:
                jobs = lane.take(first)
                try:
                    if jobs[0].after is not None:
                        await jobs[0].after.wait()  # its predecessor in an ordered lane
                    await self._work(lane, jobs)
                finally:
                    for job in jobs:
                        self.lanes.left(job)

    async def _work(self, lane: Lane, jobs: list[Job]) -> None:
        while True:
            if self.draining:
                for job in jobs:
                    self.in_flight.release(job)  # stays in proc/; the next start resumes it
                return
            async with lane.limiter, self.global_limiter:
                await self._process(lane, jobs)
            r = jobs[0].record
            if lane.route.order == "none" or r.state != "waiting":
                return
            # An ordered lane (one job at a time) holds its place: the retry happens
            # here, in order.
            await anyio.sleep(max(0.0, (r.next_attempt_at or 0) - time.time()))
            r.state = "claimed"

    async def _process(self, lane: Lane, jobs: list[Job]) -> None:
        """Check each job, then import those that pass: a suspect of a crash alone, the
        others together. A failure of the ledger (or a bug) sets back the job it hit."""
        suspects: list[Job] = []
        plain: list[Job] = []
        received: list[Job] = []  # `importer: none`: checked, and on their way
        for job in jobs:
            try:
                verdict = await self.checks.verdict(lane.route, job)
                if isinstance(verdict, Import) and lane.importer is None:
                    received.append(self._bound(job, "imported", None))
                elif isinstance(verdict, Import):
                    (suspects if _suspect(job) else plain).append(job)
                else:
                    await self._hand_on(lane.route, job, verdict)
            except Exception as e:
                self.retries.set_back(job, e)
        if received:
            await self._onward(lane.route, received)
        for job in suspects:
            async with self._gate.enter(exclusive=True):
                await self._run_attempts(lane, [job], isolated=True)
        if plain:
            async with self._gate.enter(exclusive=False):
                await self._run_attempts(lane, plain, isolated=False)

    async def _hand_on(self, route: Route, job: Job, verdict: Verdict) -> None:
        """A job that will not import now goes where its verdict says."""
        if isinstance(verdict, SetAside):
            await self.set_aside.fail(job, verdict.error, outcome=verdict.outcome)
        elif isinstance(verdict, WaitRetry):
            error = verdict.error
            await self.retries.wait(route, job, error.error_class, error.message)
        elif isinstance(verdict, Duplicate):
            job.record.duplicate_of = verdict.original
            await self.archiver.submit(route, [self._bound(job, "duplicate", None)])

    def _bound(self, job: Job, outcome: str, result: Result | None) -> Job:
        return self.transitions.bound_for_archive(job, outcome, result, self.archive_root)

    async def _run_attempts(self, lane: Lane, jobs: list[Job], *, isolated: bool) -> None:
        """Record the attempts `importing` (one ledger write), import, hand each on."""
        route = lane.route
        now = time.time()
        before = [(job.record.state, job.record.attempts) for job in jobs]
        import_jobs = [self._begin(route, job, now, isolated=isolated) for job in jobs]
        try:
            await shielded(self.transitions.importing(jobs))
        except Exception as e:
            for job, (state, attempts) in zip(jobs, before, strict=True):
                # Not counted, not run: resumed later as it was, the attempt counted then.
                job.record.state, job.record.attempts = state, attempts
                job.record.history.pop()
                self.retries.set_back(job, e)
            return
        gauge = self.metrics.in_progress.labels(route.name)
        gauge.inc(len(jobs))
        for _ in jobs:
            crash_point("before_import")
        try:
            outcomes = await self._import(lane, import_jobs)
        finally:
            gauge.dec(len(jobs))
        imported: list[Job] = []
        for job, outcome in zip(jobs, outcomes, strict=True):
            try:
                result = self._imported(route, job, outcome)
                if result is not None:
                    imported.append(self._bound(job, result.outcome, result))
                else:
                    await self._import_failed(route, job, outcome.error)
            except Exception as e:
                self.retries.set_back(job, e)
        if imported:
            await self._onward(route, imported, record_all=isolated)

    async def _onward(self, route: Route, jobs: list[Job], *, record_all: bool = False) -> None:
        """Imported jobs go to their sinks, or straight to the archiver."""
        if route.deliver:
            await self.delivery.submit(route, jobs)
        else:
            await self.archiver.submit(route, jobs, record_all=record_all)

    def _begin(self, route: Route, job: Job, now: float, *, isolated: bool) -> ImportJob:
        r = job.record
        n = r.attempts + 1
        r.attempts, r.state = n, "importing"
        r.history.append({"n": n, "started_at": _ts(now), "result": "running"})
        if isolated:
            r.history[-1]["isolated"] = True
        path = os.fsencode(self.proc / r.id) + b"/" + stored_name(r.name)
        return ImportJob(
            id=r.id,
            route=route.name,
            path=Path(os.fsdecode(path)),
            name=r.name,
            relative_path=r.relative_path,
            out_dir=self.proc / r.id / "out",
            temp_dir=self.temp / r.id,
            attempt=n,
            size=r.size or 0,
            sha256=r.sha256 or "",
        )

    async def _import(self, lane: Lane, jobs: list[ImportJob]) -> list[Outcome]:
        """Each job's outcome: a grouped lane's in one go, any other's one by one."""
        timeout = _timeout(lane.route)
        if lane.grouped is not None:
            try:
                outcomes = await lane.grouped.run_group(jobs, timeout)
            except Exception as e:  # a bug of the group runner: each job failed with it
                return [Outcome(error=e) for _ in jobs]
            lane.timed(outcomes)
            return outcomes
        outcomes = []
        assert lane.importer is not None  # `importer: none` never comes here
        for job in jobs:
            started = time.monotonic()
            try:
                with anyio.fail_after(timeout):
                    result = await lane.importer(job)
            except Exception as e:
                outcomes.append(Outcome(error=e, elapsed_s=time.monotonic() - started))
            else:
                outcomes.append(Outcome(result, elapsed_s=time.monotonic() - started))
        return outcomes

    def _imported(self, route: Route, job: Job, outcome: Outcome) -> Result | None:
        """Note how the attempt ended (history, metrics); its result if it succeeded."""
        r, error = job.record, outcome.error
        if error is not None and not isinstance(error, Retry | Reject | JobError | TimeoutError):
            log.warning(
                "importer raised",
                extra=job_fields(r.id, route=route.name, name=r.name, error=repr(error)[:500]),
                exc_info=error,
            )
        self.metrics.import_duration.labels(route.name).observe(outcome.elapsed_s)
        crash_point("after_import")
        r.history[-1]["ended_at"] = _ts(time.time())
        r.history[-1]["elapsed_s"] = round(outcome.elapsed_s, 4)
        if error is None and outcome.result is not None:
            r.history[-1]["result"] = "ok"
            facts = outcome.result.detail
            if facts and len(json.dumps(facts)) <= _FACTS_KEPT:
                r.history[-1]["detail"] = facts  # the manifest's `importer`, after a crash
            return outcome.result
        return None

    async def _import_failed(self, route: Route, job: Job, error: BaseException | None) -> None:
        """The verdict on a failed attempt: set aside, or wait for a retry."""
        last = job.record.history[-1]
        log_bytes = getattr(error, "log", None)
        if log_bytes:
            last["log_tail"] = log_bytes[-2000:].decode("utf-8", "backslashreplace")
        if isinstance(error, Reject):
            last["result"] = "rejected"
            await self.set_aside.fail(job, JobError("rejected", error.reason), outcome="rejected")
            return
        if isinstance(error, JobError) and not error.retryable:
            last["result"] = error.error_class
            await self.set_aside.fail(job, error, outcome="set_aside")
            return
        if isinstance(error, TimeoutError):
            error_class, message = "timeout", f"no result within {_timeout(route):g}s"
        elif isinstance(error, JobError):
            error_class, message = error.error_class, error.message
        elif isinstance(error, Retry):
            error_class, message = "retry", error.reason
        else:
            error_class, message = "import_error", repr(error)[:2000]
        last["result"] = error_class
        if attempts_left(route, job.record):
            defer = error.defer_s if isinstance(error, Retry) else None
            await self.retries.wait(route, job, error_class, message, defer_s=defer)
            return
        await self.set_aside.fail(
            job,
            JobError("exhausted", f"{route.max_attempts} attempts used up; last: {message}"),
            outcome="exhausted",
        )


def _suspect(job: Job) -> bool:
    """Its last attempt was interrupted by a crash of the service."""
    attempts = [h for h in job.record.history if "n" in h]
    return bool(attempts) and attempts[-1].get("result") == "interrupted"


def _timeout(route: Route) -> float:
    s = route.importer
    if isinstance(s, CommandImporterSettings):
        # The command importer enforces its own timeout and kill grace; this is a backstop.
        return s.timeout_s + s.kill_grace_s + 30
    return 0.0 if s == "none" else s.timeout_s


def _ts(t: float) -> str:
    return rfc3339(t) or ""
