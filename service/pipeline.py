"""The job pipeline: claim, import with retries, archive or set aside.

Stages, each a task in the app's task group, joined by bounded streams:

    intake (per route) ─► claimer ─► jobs (per route) ─► workers ─► archiver
                                            ▲                 │
                         retry scheduler ───┘   (waiting) ◄───┘

Claims and archives are done in batches so that a batch shares one durability
barrier and one ledger commit: a claim batch is what arrives within
`batch_max_delay_ms` (up to `batch_max_files`); an archive batch is what waits for
the archiver, which never waits for more, as the next batch gathers while it
builds one.
The archiver's file work runs in a worker process (`archive_writer.py`); the
ledger writes and their order stay here. Imports run under the route's limiter
inside the global one. Ledger writes and file moves are shielded from
cancellation: a shutdown never leaves a half-written transition.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from service import archive as arch
from service.archive_writer import Entry, Writer
from service.claim import (
    Vetted,
    claim_batch,
    companion_suffixes,
    read_sidecar,
    stored_name,
    vet,
)
from service.crash import crash_point
from service.errors import JobError, Reject, Retry
from service.fsutil import remove_tree
from service.importers import (
    GroupImporter,
    Importer,
    ImportJob,
    Outcome,
    Result,
    build_importer,
    group_importer,
)
from service.intake import Candidate, Intake
from service.ledger import JobRecord, Ledger
from service.logs import job_fields
from service.metrics import Metrics
from service.names import new_job_id, rfc3339
from service.readiness import Readiness
from service.settings import CommandImporterSettings, Route, Settings

__all__ = ["Pipeline"]

log = logging.getLogger("filedock.pipeline")
T = TypeVar("T")
_ARCHIVE_RETRY_S = (1.0, 5.0, 15.0, 60.0)
_ARCHIVING = ("outcome", "archive_path", "duplicate_of", "history", "sha256", "size", "mtime_ns")
_DONE = ("outcome", "archive_path", "failed_path")
_ARCHIVED = (*_ARCHIVING, "failed_path")  # `done` for a job never recorded `archiving`
_GROUP_MAX = 16  # jobs a worker takes at once from a grouped lane
_QUICK_S = 0.005  # imports this quick are grouped: a thread hand-off costs ~0.1 ms
_FACTS_KEPT = 4096  # bytes of JSON: an importer's facts up to this size go in its attempt


@dataclass
class _Lane:
    """A route at run time: its importer, limiter and queue of claimed jobs.

    `grouped` is the importer when it can take several jobs in one go (a sync python
    callable) and the route keeps no order. While its imports are `quick` (the last
    ones each took under `_QUICK_S`), a worker takes what is waiting, up to `_GROUP_MAX`
    jobs, and records, imports and hands them on together: one ledger write and one
    thread hand-off for all. Slow imports go one to a worker, side by side, as before.

    Its queue has room for a claim batch, so that while imports are quick the claimer
    claims the next batch as the workers import this one; `taken` is set whenever a
    worker takes jobs from it.
    """

    route: Route
    importer: Importer
    limiter: anyio.CapacityLimiter
    send: MemoryObjectSendStream[JobRecord]
    receive: MemoryObjectReceiveStream[JobRecord]
    grouped: GroupImporter | None = None
    quick: bool = False
    taken: anyio.Event = field(default_factory=anyio.Event)


@dataclass
class _ToArchive:
    job: JobRecord
    outcome: str
    result: Result | None
    done: anyio.Event = field(default_factory=anyio.Event)
    tries: int = 0
    done_at: float = 0.0  # when the ledger recorded it `done`
    recorded: bool = False  # the ledger holds it `archiving`; else the archiver writes that
    reported: bool = False  # its metrics and `archived` line are out


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


@dataclass
class Tally:
    """What this process did, for `run --once`'s exit code and the shutdown summary."""

    done: int = 0
    failed: int = 0
    retried: int = 0
    by_outcome: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str, *, failed: bool) -> None:
        self.by_outcome[outcome] = self.by_outcome.get(outcome, 0) + 1
        if failed:
            self.failed += 1
        else:
            self.done += 1


async def shielded(coro: Awaitable[T]) -> T:
    """Await bookkeeping that must finish even when the caller is being cancelled."""
    with anyio.CancelScope(shield=True):
        return await coro
    raise AssertionError("unreachable")  # mypy: a shielded scope never swallows the return


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        metrics: Metrics,
        intake: Intake,
        readiness: Readiness,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.metrics = metrics
        self.intake = intake
        self.readiness = readiness
        self.transfer = settings.folder("transfer")
        self.proc = settings.folder("proc")
        self.archive_root = settings.folder("archive")
        self.failed_root = settings.folder("failed")
        self.temp = settings.folder("temp")
        self.global_limiter = anyio.CapacityLimiter(settings.max_concurrency)
        # Blocking importer code runs in threads of its own limiter: anyio's default
        # one is shared with the watcher, which a busy import pool must not starve.
        self.import_threads = anyio.CapacityLimiter(settings.max_concurrency)
        self.fs_threads = anyio.CapacityLimiter(4)
        # The archiver's file work, in a process of its own.
        self.writer = Writer(self.proc, self.temp, self.failed_root)
        metrics.worker_pid = lambda: self.writer.worker_pid
        self.lanes: dict[str, _Lane] = {}
        for route in settings.routes:
            # Room for a whole claim batch (see `_wait_for_workers`).
            send, receive = anyio.create_memory_object_stream[JobRecord](
                max(route.concurrency, settings.batch_max_files)
            )
            importer = build_importer(route, limiter=self.import_threads)
            self.lanes[route.name] = _Lane(
                route,
                importer,
                anyio.CapacityLimiter(route.concurrency),
                send,
                receive,
                group_importer(importer) if route.order == "none" else None,
            )
            metrics.declare_route(route.name, route.concurrency)
        metrics.concurrency_limit.labels("").set(settings.max_concurrency)
        self._archive_send, self._archive_receive = anyio.create_memory_object_stream[_ToArchive](
            settings.queue_size
        )
        self.active: dict[str, JobRecord] = {}
        self._vetted: set[str] = set()
        self._set_aside: dict[str, JobError] = {}  # claimed, then found not importable
        # Ordered lanes: each job waits for the event of the job before it with its key.
        self._order_tail: dict[tuple[str, str], anyio.Event] = {}
        self._order_wait: dict[str, tuple[anyio.Event | None, anyio.Event]] = {}
        self.tally = Tally()
        self.draining = False  # shutting down: start no new import
        self._gate = _Gate()  # suspects of a crash import with nothing else running
        self._tg: anyio.abc.TaskGroup | None = None
        self._changed = anyio.Event()

    # -- running -------------------------------------------------------------------

    async def run_stages(self, tg: anyio.abc.TaskGroup) -> None:
        """Start the claimers, the workers and the archiver in `tg`."""
        self._tg = tg
        tg.start_soon(self.writer.start, name="archive worker")  # claims need not wait
        for lane in self.lanes.values():
            tg.start_soon(self._claimer, lane, name=f"claimer:{lane.route.name}")
            for i in range(lane.route.concurrency):
                tg.start_soon(self._worker, lane, name=f"worker:{lane.route.name}:{i}")
        tg.start_soon(self._archiver, name="archiver")

    async def run_retry_scheduler(self, *, interval_s: float = 1.0) -> None:
        while True:
            await self.dispatch_due()
            await anyio.sleep(interval_s)

    async def dispatch_due(self) -> int:
        """Hand every due retry to its route's workers; returns how many."""
        due = await shielded(
            self.ledger.take_due(time.time(), 256, self.settings.replica_id, self.settings.lease_s)
        )
        for job in due:
            await self.resume(job)
        return len(due)

    async def run_heartbeat(self) -> None:
        """Renew the leases of this replica's jobs, so no other replica takes them over."""
        period = self.settings.lease_s / 3
        while True:
            await anyio.sleep(period)
            try:
                await shielded(
                    self.ledger.renew_leases(
                        self.settings.replica_id, time.time() + self.settings.lease_s
                    )
                )
            except Exception as e:
                self.metrics.ledger_errors.inc()
                log.error("could not renew job leases", extra={"error": repr(e)[:300]})

    async def resume(self, job: JobRecord) -> None:
        """Put a job taken from the ledger (a due retry, or recovered) back to work."""
        if job.id in self.active:
            return
        lane = self.lanes.get(job.route)
        if lane is None:
            await self._fail(
                job, JobError("unrouted", f"route {job.route!r} is no longer configured")
            )
            return
        self._hold(job)
        if job.state == "archiving":
            await self._archive_send.send(_ToArchive(job, job.outcome or "imported", None))
        else:
            await self._enqueue(lane, job)

    async def _enqueue(self, lane: _Lane, job: JobRecord) -> None:
        """Queue a job for the lane's workers, chained behind its predecessor in order."""
        route = lane.route
        if route.order != "none":
            key = (route.name, order_key(route, job.relative_path))
            before, mine = self._order_tail.get(key), anyio.Event()
            self._order_tail[key] = mine
            self._order_wait[job.id] = (before, mine)
        await _put(lane.send, job)

    def _hold(self, job: JobRecord) -> None:
        self.active[job.id] = job

    def _release(self, job: JobRecord) -> None:
        self.active.pop(job.id, None)
        self._wake_idle()

    def _wake_idle(self) -> None:
        """What `wait_idle` waits on changed: a job released, or files left the intake."""
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_idle(self, *, include_intake: bool = True) -> None:
        """Return when nothing is in flight (and, by default, nothing is queued either)."""
        while self.active or (include_intake and self.intake.pending()):
            await self._changed.wait()

    # -- claim ---------------------------------------------------------------------

    async def _claimer(self, lane: _Lane) -> None:
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
                    await self._enqueue(lane, job)
                await self._wait_for_workers(lane)

    async def _wait_for_workers(self, lane: _Lane) -> None:
        """Run a batch ahead of the workers only while their imports are quick.

        Then the next batch is claimed while this one imports (when claims waited for
        the workers, the two took turns: docs/benchmarks.md). A lane of slow imports
        holds no more than a batch and its workers' next jobs; what it cannot start
        soon stays in transfer/, where another replica can claim it and the backlog's
        metrics count it.
        """
        while (
            not lane.quick and lane.send.statistics().current_buffer_used > lane.route.concurrency
        ):
            lane.taken = anyio.Event()
            await lane.taken.wait()

    async def _gather(self, receive: MemoryObjectReceiveStream[T], first: T) -> list[T]:
        """`first` and what else arrives within the batch delay, up to a batch: what
        waits is taken at once, and only an empty queue is waited on."""
        limit = self.settings.batch_max_files
        batch = _take_waiting(receive, first, limit)
        with anyio.move_on_after(self.settings.batch_max_delay_ms / 1000):
            while len(batch) < limit:
                try:
                    more = await receive.receive()
                except anyio.EndOfStream:
                    break
                batch += _take_waiting(receive, more, limit - len(batch))
        return batch

    async def _claim(self, route: Route, batch: list[Candidate]) -> list[JobRecord]:
        now = time.time()
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
                owner=self.settings.replica_id,
                lease_expires_at=now + self.settings.lease_s,
            )
            for c in batch
        ]
        # The row first: a crash after the rename then always finds its job's row.
        try:
            await self.ledger.insert(records)
        except Exception as e:
            self.metrics.ledger_errors.inc()
            log.error("ledger unavailable; files stay in transfer/", extra={"error": repr(e)[:300]})
            for c in batch:
                self.intake.release(c.rel)
            self._wake_idle()
            await anyio.sleep(1.0)
            return []
        results = await anyio.to_thread.run_sync(
            lambda: claim_batch(
                self.transfer,
                self.proc,
                [(r.relative_path, r.id) for r in records],
                companions=companion_suffixes(route),
                max_size=route.max_size_bytes,
                temp=self.temp if _needs_dirs(route) else None,
            ),
            limiter=self.fs_threads,
        )
        for c in batch:
            self.intake.release(c.rel)
        self._wake_idle()  # files not claimed (gone, open for writing) hold no job
        claimed, lost = [], []
        for record, result in zip(records, results, strict=True):
            if result.status == "claimed":
                if result.vetted is not None:
                    v = result.vetted
                    record.size, record.mtime_ns, record.sha256 = v.size, v.mtime_ns, v.sha256
                    self._vetted.add(record.id)
                elif result.rejected is not None:
                    self._set_aside[record.id] = result.rejected
                claimed.append(record)
                self._hold(record)
                crash_point("after_claim")
                log.info(
                    "claimed",
                    extra=job_fields(
                        record.id, route=route.name, name=record.name, state="claimed"
                    ),
                )
            else:
                lost.append(record.id)
                if result.status == "busy":
                    self.metrics.claims_put_off.labels(route.name).inc()
                    self.readiness.busy(route, record.relative_path)
                elif result.status == "error":
                    log.error(
                        "cannot claim; left in transfer/",
                        extra=job_fields(
                            route=route.name, name=record.relative_path, error=result.error
                        ),
                    )
        if lost:
            await self.ledger.delete(lost)
        return claimed

    # -- import --------------------------------------------------------------------

    async def _worker(self, lane: _Lane) -> None:
        async with lane.receive:
            async for job in lane.receive:
                if lane.grouped is not None:
                    limit = _GROUP_MAX if lane.quick else 1
                    jobs = _take_waiting(lane.receive, job, limit)
                    lane.taken.set()
                    await self._work(lane, jobs)
                    continue
                lane.taken.set()
                before, mine = self._order_wait.pop(job.id, (None, None))
                try:
                    if before is not None:
                        await before.wait()
                    await self._work(lane, [job])
                finally:
                    if mine is not None:
                        mine.set()
                        self._forget_tail(mine)

    async def _work(self, lane: _Lane, jobs: list[JobRecord]) -> None:
        while True:
            if self.draining:
                for job in jobs:
                    self._release(job)  # stays claimed in proc/; the next start resumes it
                return
            async with lane.limiter, self.global_limiter:
                await self._process(lane, jobs)
            if lane.route.order == "none" or jobs[0].state != "waiting":
                return
            # An ordered lane (one job at a time) holds its place: the retry happens
            # here, in order.
            await anyio.sleep(max(0.0, (jobs[0].next_attempt_at or 0) - time.time()))
            jobs[0].state = "claimed"

    def _defer(self, job: JobRecord, error: BaseException) -> None:
        """Set a job back after an unexpected failure: it stays in proc/, resumed later."""
        self.metrics.ledger_errors.inc()
        log.error(
            "could not handle the job; it stays in proc/ and is resumed in 5s",
            extra=job_fields(job.id, route=job.route, name=job.name, error=repr(error)[:500]),
            exc_info=not isinstance(error, OSError),
        )
        self._release(job)
        assert self._tg is not None
        self._tg.start_soon(self._resume_later, job, 5.0)

    async def _resume_later(self, job: JobRecord, delay: float) -> None:
        await anyio.sleep(delay)
        await self.resume(job)

    def _forget_tail(self, event: anyio.Event) -> None:
        for key, tail in list(self._order_tail.items()):
            if tail is event:
                del self._order_tail[key]

    def job_dir(self, job: JobRecord) -> Path:
        return self.proc / job.id

    async def _process(self, lane: _Lane, jobs: list[JobRecord]) -> None:
        """Check each job, then import those that pass: a suspect of a crash alone,
        the others together. A failure of the ledger (or a bug) defers the job it hit."""
        suspects: list[JobRecord] = []
        plain: list[JobRecord] = []
        for job in jobs:
            try:
                if await self._prepare(lane.route, job):
                    (suspects if _suspect(job) else plain).append(job)
            except Exception as e:
                self._defer(job, e)
        # After a crash of the service, each job it interrupted imports alone (no other
        # import runs meanwhile): if it is the one that kills the service, the next
        # recovery finds it the only one importing, and only it pays for it.
        for job in suspects:
            async with self._gate.enter(exclusive=True):
                await self._run_attempts(lane, [job], isolated=True)
        if plain:
            async with self._gate.enter(exclusive=False):
                await self._run_attempts(lane, plain, isolated=False)

    async def _prepare(self, route: Route, job: JobRecord) -> bool:
        """What comes before an import: vet, sidecar, duplicate, attempts left. False
        when that settled the job (failed, waiting for a retry, or a duplicate)."""
        rejected = self._set_aside.pop(job.id, None)
        if rejected is not None:
            await self._fail(job, rejected, outcome="set_aside")
            return False
        try:
            if job.id in self._vetted:
                self._vetted.discard(job.id)  # vetted in its claim batch, moments ago
            else:
                await self._vet(route, job)
            if route.checksum_sidecar:
                await self._check_sidecar(job)
        except JobError as e:
            if e.retryable and self._attempts_left(route, job):
                await self._wait_retry(route, job, e, e.message)
            else:
                await self._fail(job, e, outcome="set_aside" if not e.retryable else "exhausted")
            return False
        if route.duplicates == "skip" and job.sha256 is not None and not job.duplicate_of:
            since = time.time() - route.dedup_window_days * 86400
            original = await self.ledger.find_done_by_sha256(route.name, job.sha256, since)
            if original is not None and original != job.id:
                job.duplicate_of = original
                await self._to_archive(route, [self._archivable(job, "duplicate", None)])
                return False
        if not self._attempts_left(route, job):
            # Its attempts were counted before imports that never finished (the
            # service died each time): a poison file ends here, not in a loop.
            await self._fail(
                job,
                JobError("exhausted", f"{route.max_attempts} attempts used up: {job.error}"),
                outcome="exhausted",
            )
            return False
        return True

    async def _vet(self, route: Route, job: JobRecord) -> None:
        path = os.fsencode(self.job_dir(job)) + b"/" + stored_name(job.name)

        def check() -> Vetted:
            vetted = vet(path, max_size=route.max_size_bytes, want_hash=job.sha256 is None)
            if _needs_dirs(route):  # made while we are in a worker thread anyway
                (self.job_dir(job) / "out").mkdir(exist_ok=True)
                (self.temp / job.id).mkdir(exist_ok=True)
            return vetted

        vetted = await anyio.to_thread.run_sync(check, limiter=self.fs_threads)
        if job.sha256 is None:
            job.size, job.mtime_ns, job.sha256 = vetted.size, vetted.mtime_ns, vetted.sha256
        elif (vetted.size, vetted.mtime_ns) != (job.size, job.mtime_ns):
            raise JobError("modified_during_processing", "the file changed after it was claimed")
        crash_point("after_vet")

    async def _check_sidecar(self, job: JobRecord) -> None:
        announced = await anyio.to_thread.run_sync(
            read_sidecar, os.fsencode(self.job_dir(job)), job.name, limiter=self.fs_threads
        )
        if announced is not None and announced != job.sha256:
            raise JobError(
                "checksum_mismatch",
                f"content SHA-256 {job.sha256} differs from {announced} in its .sha256 file",
            )

    def _attempts_left(self, route: Route, job: JobRecord) -> bool:
        """Attempts since the last manual retry, against `max_attempts`.

        An attempt that a crash of the service interrupted counts only if it ran in
        isolation: a file that kills the service is charged for it, the files that
        happened to be importing beside it are not.
        """
        charged = 0
        for entry in reversed(job.history):
            if entry.get("event") == "manual_retry":
                break
            if "n" in entry and (entry.get("result") != "interrupted" or entry.get("isolated")):
                charged += 1
        return charged < route.max_attempts

    async def _run_attempts(self, lane: _Lane, jobs: list[JobRecord], *, isolated: bool) -> None:
        """Record the attempts `importing` (one ledger write), import, hand each on."""
        route = lane.route
        now = time.time()
        import_jobs = [self._begin(route, job, now, isolated=isolated) for job in jobs]
        try:
            await shielded(
                self.ledger.update_many(
                    [
                        self._fields(j, "attempts", "size", "mtime_ns", "sha256", "history")
                        for j in jobs
                    ]
                )
            )
        except Exception as e:
            for job in jobs:
                self._defer(job, e)
            return
        gauge = self.metrics.in_progress.labels(route.name)
        gauge.inc(len(jobs))
        for _ in jobs:
            crash_point("before_import")
        try:
            outcomes = await self._import(lane, import_jobs)
        finally:
            gauge.dec(len(jobs))
        imported: list[_ToArchive] = []
        for job, outcome in zip(jobs, outcomes, strict=True):
            try:
                result = self._imported(route, job, outcome)
                if result is not None:
                    imported.append(self._archivable(job, result.outcome, result))
                else:
                    await self._import_failed(route, job, outcome.error)
            except Exception as e:
                self._defer(job, e)
        if imported:
            await self._to_archive(route, imported, record_all=isolated)

    def _begin(self, route: Route, job: JobRecord, now: float, *, isolated: bool) -> ImportJob:
        n = job.attempts + 1
        if n == 1 or not any("n" in h for h in job.history):
            self.metrics.queue_wait.labels(route.name).observe(max(0.0, now - job.detected_at))
        job.attempts, job.state = n, "importing"
        job.history.append({"n": n, "started_at": _ts(now), "result": "running"})
        if isolated:
            job.history[-1]["isolated"] = True
        return ImportJob(
            id=job.id,
            route=route.name,
            path=Path(os.fsdecode(os.fsencode(self.job_dir(job)) + b"/" + stored_name(job.name))),
            name=job.name,
            relative_path=job.relative_path,
            out_dir=self.job_dir(job) / "out",
            temp_dir=self.temp / job.id,
            attempt=n,
            size=job.size or 0,
            sha256=job.sha256 or "",
        )

    async def _import(self, lane: _Lane, jobs: list[ImportJob]) -> list[Outcome]:
        """Each job's outcome: a grouped lane's in one go, any other's one by one."""
        timeout = _timeout(lane.route)
        if lane.grouped is not None:
            try:
                outcomes = await lane.grouped.run_group(jobs, timeout)
            except Exception as e:  # a bug of the group runner: each job failed with it
                return [Outcome(error=e) for _ in jobs]
            lane.quick = all(o.elapsed_s < _QUICK_S for o in outcomes)
            return outcomes
        outcomes = []
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

    def _imported(self, route: Route, job: JobRecord, outcome: Outcome) -> Result | None:
        """Note how the attempt ended (history, metrics); its result if it succeeded."""
        error = outcome.error
        if error is not None and not isinstance(error, Retry | Reject | JobError | TimeoutError):
            log.warning(
                "importer raised",
                extra=job_fields(job.id, route=route.name, name=job.name, error=repr(error)[:500]),
                exc_info=error,
            )
        self.metrics.import_duration.labels(route.name).observe(outcome.elapsed_s)
        crash_point("after_import")
        job.history[-1]["ended_at"] = _ts(time.time())
        job.history[-1]["elapsed_s"] = round(outcome.elapsed_s, 4)
        if error is None and outcome.result is not None:
            job.history[-1]["result"] = "ok"
            facts = outcome.result.detail
            if facts and len(json.dumps(facts)) <= _FACTS_KEPT:
                job.history[-1]["detail"] = facts  # the manifest's `importer`, after a crash
            return outcome.result
        return None

    async def _import_failed(
        self, route: Route, job: JobRecord, error: BaseException | None
    ) -> None:
        log_bytes = getattr(error, "log", None)
        if log_bytes:
            job.history[-1]["log_tail"] = log_bytes[-2000:].decode("utf-8", "backslashreplace")
        if isinstance(error, Reject):
            job.history[-1]["result"] = "rejected"
            await self._fail(job, JobError("rejected", error.reason), outcome="rejected")
            return
        if isinstance(error, JobError) and not error.retryable:
            job.history[-1]["result"] = error.error_class
            await self._fail(job, error, outcome="set_aside")
            return
        if isinstance(error, TimeoutError):
            error_class, message = "timeout", f"no result within {_timeout(route):g}s"
        elif isinstance(error, JobError):
            error_class, message = error.error_class, error.message
        elif isinstance(error, Retry):
            error_class, message = "retry", error.reason
        else:
            error_class, message = "import_error", repr(error)[:2000]
        job.history[-1]["result"] = error_class
        if self._attempts_left(route, job):
            defer = error.defer_s if isinstance(error, Retry) else None
            await self._wait_retry(route, job, error_class, message, defer_s=defer)
            return
        await self._fail(
            job,
            JobError("exhausted", f"{route.max_attempts} attempts used up; last: {message}"),
            outcome="exhausted",
        )

    async def _wait_retry(
        self,
        route: Route,
        job: JobRecord,
        error: JobError | str,
        message: str,
        *,
        defer_s: float | None = None,
    ) -> None:
        error_class = error.error_class if isinstance(error, JobError) else error
        delay = defer_s if defer_s is not None else backoff(route, job.attempts)
        job.state = "waiting"
        job.next_attempt_at = time.time() + delay
        job.error_class, job.error = error_class, message[:4000]
        await shielded(self._save(job, "next_attempt_at", "error_class", "error", "history"))
        self.metrics.retries.labels(route.name).inc()
        self.tally.retried += 1
        log.info(
            "import will be retried",
            extra=job_fields(
                job.id,
                route=route.name,
                name=job.name,
                state="waiting",
                error_class=error_class,
                retry_in_s=round(delay, 3),
                attempt=job.attempts,
            ),
        )
        if route.order == "none":
            self._release(job)  # the retry scheduler picks it up when due

    async def _save(self, job: JobRecord, *columns: str) -> None:
        await self.ledger.update(*self._fields(job, *columns))

    @staticmethod
    def _fields(job: JobRecord, *columns: str) -> tuple[str, dict[str, Any]]:
        """A job's state, `updated_at` (now) and the named columns, for the ledger."""
        job.updated_at = time.time()
        fields: dict[str, Any] = {c: getattr(job, c) for c in columns}
        fields.update(state=job.state, updated_at=job.updated_at)
        return job.id, fields

    # -- archive -------------------------------------------------------------------

    def _archivable(self, job: JobRecord, outcome: str, result: Result | None) -> _ToArchive:
        job.state = "archiving"
        job.outcome = outcome  # type: ignore[assignment]
        job.archive_path = str(arch.archive_dir_for(self.archive_root, job.id))
        return _ToArchive(job, outcome, result)

    async def _to_archive(
        self, route: Route, items: list[_ToArchive], *, record_all: bool = False
    ) -> None:
        """Record the jobs `archiving` (one ledger write) and hand them to the archiver.

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
                self._record_archiving([i for i in items if record_all or _rebuildable(i.result)])
            )
        except Exception as e:
            self.metrics.ledger_errors.inc()
            log.error(
                "cannot record jobs archiving; the archiver will", extra={"error": repr(e)[:300]}
            )
        for item in items:
            await _put(self._archive_send, item)
        if route.order != "none":
            for item in items:
                await item.done.wait()  # the next file of an ordered lane waits for this one

    async def _archiver(self) -> None:
        """One batch at a time: what is waiting, never waiting for more (while one batch
        is built, the next one gathers). A batch's sources leave proc/ (once it is
        recorded `done`) while the worker builds the next batch, or at once if none is
        waiting."""
        archived: list[_ToArchive] = []  # recorded `done`, their sources still in proc/
        async with self._archive_receive:
            while True:
                try:
                    first = self._archive_receive.receive_nowait()
                except anyio.WouldBlock:
                    await shielded(self._remove_sources(archived))
                    archived = []
                    try:
                        first = await self._archive_receive.receive()
                    except anyio.EndOfStream:
                        return
                except anyio.EndOfStream:
                    await shielded(self._remove_sources(archived))
                    return
                batch = _take_waiting(self._archive_receive, first, self.settings.batch_max_files)
                archived = await shielded(self._archive_batch(batch, archived))

    async def _archive_batch(
        self, batch: list[_ToArchive], archived: list[_ToArchive]
    ) -> list[_ToArchive]:
        """Record `archiving` where that is not done yet (and the archive needs nothing
        the ledger does not keep); build and publish the archives, removing the sources
        of `archived` meanwhile; record `done`. Returns the jobs now `done`, whose
        sources are still to be removed."""
        try:
            await self._record_archiving(
                [i for i in batch if not i.recorded and _rebuildable(i.result)]
            )
        except Exception as e:  # the ledger cannot be written: try the batch again later
            await self._remove_sources(archived)
            for item in batch:
                await self._archive_failed(item, e)
            return []
        written = await self.writer.write(
            [Entry(i.job, i.outcome, i.result) for i in batch],
            remove=[i.job.id for i in archived],
        )
        for item in archived:
            self._signal(item)
        errors = [w.error for w in written]
        for item, w in zip(batch, written, strict=True):
            if w.failed_path is not None:
                item.job.failed_path = w.failed_path
        published = [item for item, err in zip(batch, errors, strict=True) if err is None]
        now = time.time()
        for item in published:
            item.job.state, item.done_at = "done", now
        try:
            await self.ledger.update_many(
                [self._fields(i.job, *(_DONE if i.recorded else _ARCHIVED)) for i in published]
            )
        except Exception as e:  # published, not yet recorded: the retry finds the archive
            for item in published:
                item.job.state = "archiving"
                await self._archive_failed(item, e)
            published = []
        crash_point("after_ledger_done")
        if published:  # its log lines and metrics, beside the next batch's build
            assert self._tg is not None
            self._tg.start_soon(self._report, published)
        for item, err in zip(batch, errors, strict=True):
            if err is not None:
                await self._archive_failed(item, err)
        return published

    async def _record_archiving(self, items: list[_ToArchive]) -> None:
        if items:
            await self.ledger.update_many([self._fields(i.job, *_ARCHIVING) for i in items])
            for item in items:
                item.recorded = True

    async def _remove_sources(self, archived: list[_ToArchive]) -> None:
        if archived:
            await self.writer.remove([i.job.id for i in archived])
            for item in archived:
                self._signal(item)

    async def _archive_failed(self, item: _ToArchive, err: BaseException) -> None:
        job = item.job
        if isinstance(err, JobError) and not err.retryable:
            await self._fail(job, err, outcome="set_aside")
            self._signal(item)
            return
        # The archive side failed (disk full, I/O error): the import stands; keep the
        # source in proc/ and try the archive again later, without a new import.
        item.tries += 1
        delay = _ARCHIVE_RETRY_S[min(item.tries, len(_ARCHIVE_RETRY_S)) - 1]
        self.metrics.archive_retries.inc()
        log.error(
            "cannot archive yet; will try again",
            extra=job_fields(
                job.id,
                route=job.route,
                name=job.name,
                state="archiving",
                error=repr(err)[:500],
                retry_in_s=delay,
            ),
        )
        assert self._tg is not None
        self._tg.start_soon(self._archive_later, item, delay)  # the archiver goes on meanwhile

    async def _archive_later(self, item: _ToArchive, delay: float) -> None:
        await anyio.sleep(delay)
        await self._archive_send.send(item)

    async def _report(self, items: list[_ToArchive]) -> None:
        for item in items:
            self._reported(item)

    def _reported(self, item: _ToArchive) -> None:
        """A job recorded `done`: its metrics and its `archived` line, once."""
        if item.reported:
            return
        item.reported = True
        job, now = item.job, item.done_at
        m = self.metrics
        m.jobs.labels(job.route, item.outcome).inc()
        m.bytes.labels(job.route).inc(job.size or 0)
        m.last_success.labels(job.route).set(now)
        m.end_to_end.labels(job.route).observe(max(0.0, now - job.detected_at))
        detail = item.result.detail if item.result else job.import_facts()
        for key, label in (("rows_imported", "imported"), ("rows_failed", "failed")):
            if isinstance(detail.get(key), int):
                m.rows.labels(job.route, label).inc(detail[key])
        self.tally.count(item.outcome, failed=False)
        log.info(
            "archived",
            extra=job_fields(
                job.id,
                route=job.route,
                name=job.name,
                state="done",
                outcome=item.outcome,
                elapsed_s=now - job.detected_at,
                attempts=job.attempts,
            ),
        )

    def _signal(self, item: _ToArchive) -> None:
        """The job has left proc/ (or failed/ holds it): its lane and `wait_idle` may go on."""
        if item.job.state == "done":
            self._reported(item)  # should its report not have run yet
        item.done.set()
        self._release(item.job)

    # -- fail ----------------------------------------------------------------------

    async def _fail(self, job: JobRecord, error: JobError, *, outcome: str = "set_aside") -> None:
        """Move the job folder to `failed/<id>/` with `error.json`; ledger `failed`."""
        now = time.time()
        doc = arch.error_document(
            job,
            error_class=error.error_class,
            message=error.message,
            outcome=outcome,
            failed_at=now,
        )
        failed_dir = self.failed_root / job.id
        try:
            await shielded(
                anyio.to_thread.run_sync(
                    lambda: self._move_to_failed(job, failed_dir, doc), limiter=self.fs_threads
                )
            )
        except OSError as e:
            log.error(
                "cannot move the job to failed/; it stays in proc/ and is retried",
                extra=job_fields(job.id, route=job.route, name=job.name, error=repr(e)[:300]),
            )
            job.state, job.next_attempt_at = "waiting", now + 60
            job.error_class, job.error = error.error_class, error.message[:4000]
            await shielded(self._save(job, "next_attempt_at", "error_class", "error", "history"))
            self._release(job)
            return
        job.state, job.outcome = "failed", outcome  # type: ignore[assignment]
        job.error_class, job.error = error.error_class, error.message[:4000]
        job.failed_path, job.next_attempt_at = str(failed_dir), None
        await shielded(
            self._save(
                job,
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
        )
        self.metrics.jobs.labels(job.route, outcome).inc()
        self.metrics.job_failures.labels(job.route, error.error_class).inc()
        self.metrics.end_to_end.labels(job.route).observe(max(0.0, now - job.detected_at))
        self.tally.count(outcome, failed=True)
        log.warning(
            "failed",
            extra=job_fields(
                job.id,
                route=job.route,
                name=job.name,
                state="failed",
                outcome=outcome,
                error_class=error.error_class,
                error=error.message[:500],
                elapsed_s=now - job.detected_at,
            ),
        )
        self._release(job)

    def _move_to_failed(self, job: JobRecord, failed_dir: Path, doc: dict[str, Any]) -> None:
        crash_point("mid_fail")
        if failed_dir.exists():
            return  # moved already (an interrupted earlier try)
        arch.set_aside(self.job_dir(job), failed_dir, doc)
        remove_tree(self.temp / job.id)


def _needs_dirs(route: Route) -> bool:
    """A command gets `{out_dir}` and `$TMPDIR` made for it; in-process importers make
    them when they write there (most never do, and four metadata operations a file
    are a fifth of the per-file cost)."""
    return isinstance(route.importer, CommandImporterSettings)


def _rebuildable(result: Result | None) -> bool:
    """The archive needs nothing of this result that the ledger does not keep (a job
    recovered `archiving` is archived without its result, its log or pending records).
    A job whose result is not stays `importing` until `done`: a crash imports it again."""
    return result is None or (result.log is None and result.pending is None)


def _suspect(job: JobRecord) -> bool:
    """Its last attempt was interrupted by a crash of the service."""
    attempts = [h for h in job.history if "n" in h]
    return bool(attempts) and attempts[-1].get("result") == "interrupted"


def order_key(route: Route, rel: bytes) -> str:
    """The lane key: one for `fifo`, the `key` group of `partition_key` for `partition`."""
    if route.order != "partition" or route.partition_key is None:
        return ""
    m = re.search(route.partition_key, rel.decode("utf-8", "surrogateescape"))
    return m.group("key") or "" if m else ""


def backoff(route: Route, attempt: int) -> float:
    """`backoff_s` doubling per attempt, capped at `max_backoff_s`, with ±20 % jitter."""
    base = min(route.max_backoff_s, route.backoff_s * math.pow(2, max(0, attempt - 1)))
    return min(route.max_backoff_s, base * random.uniform(0.8, 1.2))


def _timeout(route: Route) -> float:
    s = route.importer
    if isinstance(s, CommandImporterSettings):
        # The command importer enforces its own timeout and kill grace; this is a backstop.
        return s.timeout_s + s.kill_grace_s + 30
    return s.timeout_s


def _ts(t: float) -> str:
    return rfc3339(t) or ""


def _take_waiting(receive: MemoryObjectReceiveStream[T], first: T, limit: int) -> list[T]:
    """`first` and what is already waiting behind it, up to `limit` (none is waited for)."""
    items = [first]
    while len(items) < limit:
        try:
            items.append(receive.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            break
    return items


async def _put(send: MemoryObjectSendStream[T], item: T) -> None:
    """Send `item` as `send()` does, but yield to the event loop only when the stream
    is full.

    `send()` yields at every call, and a turn of the loop runs every ready task and
    polls epoll: two such sends a job cost 10 % of a 10,000-file burst's throughput
    (docs/benchmarks.md, "Burst throughput"). A cancelled task still stops here, as
    at `send()`: at shutdown the receiving workers are gone.
    """
    await anyio.lowlevel.checkpoint_if_cancelled()
    try:
        send.send_nowait(item)
    except anyio.WouldBlock:
        await send.send(item)
