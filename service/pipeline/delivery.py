"""The delivery stage: an imported job goes on to each sink of its route, then to the
archiver; a sink that fails waits for its own retry, and one that fails for good
sets the job aside.

    workers ─► delivery ─► each sink (its limit, its breaker) ─► archiver
                   ▲            │ retryable: the sink waits (backoff, in the ledger)
     retries ──────┘            └ final, or attempts used up: set aside, delivery_failed

Each sink has its own row in the ledger. An attempt is counted (`delivering`)
before it runs, and its end is written after the remote holds the bytes: a crash
in between delivers again, and the sink then finds our bytes there already
(`found`) instead of sending them twice. A sink delivered is never sent to again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from service.crash import crash_point
from service.delivery.base import Receipt, SinkError
from service.delivery.runtime import SinkRuntime, items_for
from service.delivery.template import TemplateError
from service.errors import JobError, StartupError
from service.face.logs import job_fields
from service.face.metrics import Metrics
from service.ledger import DeliveryRecord
from service.pipeline.archiver import Archiver
from service.pipeline.job import InFlight, Job
from service.pipeline.retries import backoff
from service.pipeline.set_aside import SetAsideStage
from service.pipeline.streams import put, shielded
from service.pipeline.transitions import Transitions
from service.settings import Route, Settings
from service.storage.progress import LONG_BYTES, Progress, progress_dir

__all__ = ["Delivery"]

log = logging.getLogger("filedock.delivery")
_OPEN = ("pending", "delivering", "waiting")


class Delivery:
    def __init__(
        self,
        settings: Settings,
        transitions: Transitions,
        in_flight: InFlight,
        archiver: Archiver,
        set_aside: SetAsideStage,
        metrics: Metrics,
        *,
        set_back: Callable[[Job, BaseException], None],
        fs_threads: anyio.CapacityLimiter,
    ) -> None:
        self.transitions = transitions
        self.in_flight = in_flight
        self.archiver = archiver
        self.set_aside = set_aside
        self.metrics = metrics
        self._set_back = set_back
        self._fs_threads = fs_threads
        self.proc = settings.folder("proc")
        self.archive_root = settings.folder("archive")
        self.progress = progress_dir(settings.folder("state"))
        self.routes = {r.name: r for r in settings.routes}
        self.sinks: dict[tuple[str, str], SinkRuntime] = {}
        for route in settings.routes:
            for sink in route.deliver:
                self.sinks[route.name, sink.name] = SinkRuntime(route.name, sink)
                metrics.declare_sink(route.name, sink.name)
        # Jobs delivering at once: enough to keep every sink's limit busy.
        total = sum(rt.settings.concurrency for rt in self.sinks.values())
        self._slots = anyio.Semaphore(max(8, 2 * total))
        self._send: MemoryObjectSendStream[Job]
        self._receive: MemoryObjectReceiveStream[Job]
        self._send, self._receive = anyio.create_memory_object_stream[Job](settings.queue_size)

    async def open(self) -> None:
        """Build every sink's client; a sink that cannot be built stops the start."""
        for (route, name), rt in self.sinks.items():
            try:
                await rt.sink.open()
            except SinkError as e:
                raise StartupError(f"routes.{route}.deliver.{name}: {e.message}") from None

    def show_paused(self) -> None:
        """`filedock_sink_paused`, as each breaker stands now."""
        for rt in self.sinks.values():
            paused = 1 if rt.breaker.paused_for() else 0
            self.metrics.sink_paused.labels(rt.route, rt.name).set(paused)

    async def aclose(self) -> None:
        for rt in self.sinks.values():
            with anyio.CancelScope(shield=True):
                await rt.sink.close()

    def close(self) -> None:
        self._send.close()
        self._receive.close()

    # -- in ------------------------------------------------------------------------

    async def submit(self, route: Route, jobs: list[Job]) -> None:
        """Jobs bound for their sinks (imported, or received without an importer):
        recorded `delivering` with a pending row per sink, then queued."""
        now = time.time()
        rows: list[DeliveryRecord] = []
        for job in jobs:
            job.deliveries = {
                s.name: DeliveryRecord(job.id, s.name, route.name, created_at=now)
                for s in route.deliver
            }
            rows += job.deliveries.values()
        try:
            await shielded(self.transitions.delivering(jobs, rows))
        except Exception as e:
            for job in jobs:
                self._set_back(job, e)  # resumed `delivering`: the rows are made again
            return
        for job in jobs:
            await put(self._send, job)
        if route.order != "none":
            for job in jobs:
                await job.left.wait()  # the next file of an ordered lane waits for this one

    async def take(self, job: Job) -> None:
        """Queue a job the ledger holds `delivering` (a due retry, or resumed after a
        restart), with its sinks' rows; a sink added to the route since gets one."""
        r = job.record
        route = self.routes[r.route]
        self.transitions.bound_for_archive(job, r.outcome or "imported", None, self.archive_root)
        try:
            rows = {d.sink: d for d in await self.transitions.ledger.deliveries(r.id)}
            added = [
                DeliveryRecord(r.id, s.name, route.name, created_at=time.time())
                for s in route.deliver
                if s.name not in rows
            ]
            if added:
                await self.transitions.ledger.save_deliveries(added)
        except Exception as e:
            self._set_back(job, e)
            return
        job.deliveries = {**rows, **{d.sink: d for d in added}}
        await put(self._send, job)

    async def run(self) -> None:
        async with self._receive, anyio.create_task_group() as tg:
            async for job in self._receive:
                await self._slots.acquire()
                tg.start_soon(self._job, job)

    # -- a job ---------------------------------------------------------------------

    async def _job(self, job: Job) -> None:
        try:
            await self._deliver(job)
        except Exception as e:  # the ledger failed (or a bug): the job is resumed later
            self._set_back(job, e)
        finally:
            self._slots.release()

    async def _deliver(self, job: Job) -> None:
        """Each open sink that is due, side by side; then archive, set aside, or wait."""
        route = self.routes[job.record.route]
        configured = {s.name for s in route.deliver}
        while True:
            now = time.time()
            due = [
                row
                for name, row in job.deliveries.items()
                if name in configured
                and row.state in _OPEN
                and (row.state != "waiting" or (row.next_attempt_at or 0) <= now)
            ]
            async with anyio.create_task_group() as tg:
                for row in due:
                    tg.start_soon(self._attempt, job, self.sinks[route.name, row.sink], row)
            rows = [row for name, row in job.deliveries.items() if name in configured]
            if all(row.state == "delivered" for row in rows):
                await self.archiver.submit(route, [job])
                return
            failed = [row for row in rows if row.state == "failed"]
            if failed:
                await self._fail(job, failed)
                return
            next_at = min(row.next_attempt_at or now for row in rows if row.state == "waiting")
            if route.order == "none":
                await shielded(self.transitions.delivery_waits(job, next_at))
                self.in_flight.release(job)  # the retry scheduler takes it back when due
                return
            # An ordered lane keeps its place: the job waits here, in order.
            await anyio.sleep(max(0.0, next_at - time.time()))

    async def _fail(self, job: Job, failed: list[DeliveryRecord]) -> None:
        message = "; ".join(f"{r.sink}: {r.error_class}: {r.error}" for r in failed)
        error = JobError("delivery_failed", f"delivery failed for good to {message}")
        await self.set_aside.fail(job, error, outcome="set_aside")
        job.left.set()

    # -- a sink ----------------------------------------------------------------------

    async def _attempt(self, job: Job, rt: SinkRuntime, row: DeliveryRecord) -> None:
        """One attempt of one sink: counted, run, and its end recorded."""
        async with rt.limiter:
            # Looked at once a slot is free: the attempts before it may have paused it.
            paused = rt.breaker.paused_for()
            if paused:
                row.state, row.next_attempt_at = "waiting", time.time() + paused
                why = f"{rt.name} is paused after {rt.settings.breaker_failures} failures in a row"
                await shielded(
                    self.transitions.sink(
                        job, row, outcome="paused", message=why, retry_in_s=paused
                    )
                )
                return
            row.attempts += 1
            row.state, row.next_attempt_at = "delivering", None
            await shielded(self.transitions.sink(job, row))
            crash_point("before_delivery")
            started = time.monotonic()
            try:
                receipts = await self._send_items(job, rt)
            except SinkError as e:
                await self._failed(job, rt, row, e, time.monotonic() - started)
                return
        elapsed = time.monotonic() - started
        crash_point("after_delivery")
        rt.breaker.succeeded()
        row.state, row.receipts = "delivered", [r.to_json() for r in receipts]
        row.error_class = row.error = None
        outcome = "found" if all(r.found for r in receipts) else "delivered"
        sent = sum(r.bytes for r in receipts if not r.found)
        await shielded(
            self.transitions.sink(job, row, outcome=outcome, elapsed_s=elapsed, sent_bytes=sent)
        )

    async def _send_items(self, job: Job, rt: SinkRuntime) -> list[Receipt]:
        """Every item of the job for this sink, each under the sink's timeout; any
        failure is a `SinkError`."""
        skip = frozenset({job.result.pending.name}) if job.result and job.result.pending else None
        args = (job.record, rt.settings, self.proc, skip or frozenset())
        try:
            if rt.settings.send == "source":  # nothing is read: no thread hop
                items = items_for(*args)
            else:  # the outputs are listed and hashed
                items = await anyio.to_thread.run_sync(items_for, *args, limiter=self._fs_threads)
        except TemplateError as e:
            raise SinkError("bad_target", str(e), retryable=False) from None
        except OSError as e:
            raise SinkError("io_error", f"cannot read the job's files: {e}", retryable=True) from e
        receipts = []
        for item in items:
            report = None
            if item.size >= LONG_BYTES:
                stage = f"deliver:{rt.name}"
                report = Progress(self.progress, job.id, rt.route, stage, item.size)
                item = dataclasses.replace(item, progress=report.add)
            try:
                with anyio.fail_after(rt.settings.timeout_s):
                    receipts.append(await rt.sink.deliver(item))
            except SinkError:
                raise
            except TimeoutError:
                msg = f"{rt.sink.location(item)}: no answer within {rt.settings.timeout_s:g}s"
                raise SinkError("timeout", msg, retryable=True) from None
            except Exception as e:  # a bug of the sink: logged whole, retried
                log.exception("sink raised", extra=job_fields(job.id, route=rt.route, sink=rt.name))
                raise SinkError("sink_error", repr(e)[:500], retryable=True) from e
            finally:
                if report is not None:
                    report.close()
        return receipts

    async def _failed(
        self, job: Job, rt: SinkRuntime, row: DeliveryRecord, e: SinkError, elapsed: float
    ) -> None:
        row.error_class, row.error = e.error_class, e.message[:4000]
        if e.retryable and rt.breaker.failed():
            log.warning(
                "sink paused after repeated failures",
                extra={"route": rt.route, "sink": rt.name, "pause_s": rt.settings.breaker_pause_s},
            )
        if e.retryable and row.attempts < rt.settings.max_attempts:
            delay = max(backoff(rt.settings, row.attempts), rt.breaker.paused_for())
            row.state, row.next_attempt_at = "waiting", time.time() + delay
            outcome, retry_in = "retry", delay
        else:
            row.state, row.next_attempt_at = "failed", None
            outcome, retry_in = "failed", None
            if e.retryable:
                row.error = f"{rt.settings.max_attempts} attempts used up; last: {row.error}"
        await shielded(
            self.transitions.sink(
                job,
                row,
                outcome=outcome,
                error_class=e.error_class,
                message=row.error,
                retry_in_s=retry_in,
                elapsed_s=elapsed,
            )
        )
