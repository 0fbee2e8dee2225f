"""The pipeline's wiring: the stages, the queues between them, and the tasks the app
starts for them.

    intake (per route) ─► claimer ─► lane (per route) ─► workers ─► delivery ─► archiver
                                          ▲                  │ verdict    ▲ (routes with
                           retries ───────┴──── wait ◄───────┤            │  `deliver:`)
                                                  set aside ◄┘────────────┘

Every state change goes through `Transitions`, which writes the ledger and tells
the subscribers (metrics, logs, the tally). Imports run under the route's limiter
inside the global one. Ledger writes and file moves are shielded from
cancellation: a shutdown never leaves a half-written transition.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import anyio

from service.discovery.intake import Intake
from service.discovery.readiness import Readiness
from service.face.metrics import Metrics
from service.importers import build_importer, group_importer
from service.ledger import JobRecord, Ledger
from service.ledger.base import ReplicaRecord
from service.notify.events import Outbox
from service.pipeline.archiver import Archiver
from service.pipeline.checks import Checks
from service.pipeline.claimer import Claimer
from service.pipeline.delivery import Delivery
from service.pipeline.events import Tally, log_transition, metrics_subscriber
from service.pipeline.heartbeat import Heartbeat
from service.pipeline.job import InFlight
from service.pipeline.lanes import Lane, Lanes
from service.pipeline.later import Later
from service.pipeline.retries import Retries
from service.pipeline.set_aside import SetAsideStage
from service.pipeline.transitions import Transitions
from service.pipeline.workers import Workers
from service.settings import Settings
from service.storage.archive_writer import Writer
from service.storage.codec import Codec, threads_available
from service.storage.progress import progress_dir

__all__ = ["Pipeline"]

Task = tuple[str, Callable[[], Coroutine[Any, Any, None]]]


class Pipeline:
    """Builds the stages; `tasks()` are what the app runs, `stop_imports` and
    `wait_idle` what it asks of them at shutdown. `replica` is this process's
    registered instance: the owner of the jobs it claims and takes."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        metrics: Metrics,
        intake: Intake,
        readiness: Readiness,
        replica: ReplicaRecord,
    ) -> None:
        s = settings
        folders = {n: s.folder(n) for n in ("proc", "archive", "failed", "temp")}
        global_limiter = anyio.CapacityLimiter(s.max_concurrency)
        # Blocking importer code runs in threads of its own limiter: anyio's default
        # one is shared with the watcher, which a busy import pool must not starve.
        import_threads = anyio.CapacityLimiter(s.max_concurrency)
        fs_threads = anyio.CapacityLimiter(4)
        codecs = {
            route.name: Codec(c.compression, c.level)
            for route in s.routes
            for c in [route.archive or s.archive]
        }
        self.writer = Writer(
            folders["proc"],
            folders["temp"],
            folders["failed"],
            codecs=codecs,
            threads=s.archive.threads or threads_available(),
            progress=progress_dir(s.folder("state")),
            barrier=s.barrier,
        )
        metrics.worker_pid = lambda: self.writer.worker_pid
        lanes = []
        for route in s.routes:
            importer = build_importer(route, limiter=import_threads)
            grouped = group_importer(importer) if route.order == "none" else None
            lanes.append(Lane(route, importer, grouped, max(route.concurrency, s.batch_max_files)))
            metrics.declare_route(route.name, route.concurrency)
        metrics.concurrency_limit.labels("").set(s.max_concurrency)
        self.lanes = Lanes(lanes)
        self.tally = Tally()
        self.in_flight = InFlight(intake)
        self.transitions = Transitions(
            ledger, [metrics_subscriber(metrics), log_transition, self.tally], Outbox(s.notify)
        )
        self.later = Later()
        self.set_aside = SetAsideStage(
            self.transitions, self.in_flight, folders, fs_threads, self.later, metrics
        )
        self.archiver = Archiver(
            self.writer,
            self.transitions,
            self.in_flight,
            self.set_aside,
            self.later,
            metrics,
            queue_size=s.queue_size,
            batch_max=s.batch_max_files,
        )
        self.delivery = Delivery(
            s,
            self.transitions,
            self.in_flight,
            self.archiver,
            self.set_aside,
            metrics,
            set_back=lambda job, e: self.retries.set_back(job, e),
            fs_threads=fs_threads,
        )
        self.retries = Retries(
            s,
            ledger,
            metrics,
            self.transitions,
            self.in_flight,
            self.lanes,
            self.archiver.take,
            self.delivery.take,
            self.set_aside,
            self.later,
            owner=replica.instance,
        )
        checks = Checks(ledger, folders["proc"], folders["temp"], fs_threads)
        self.workers = Workers(
            self.lanes,
            checks,
            self.transitions,
            self.archiver,
            self.delivery,
            self.retries,
            self.set_aside,
            self.in_flight,
            metrics,
            global_limiter=global_limiter,
            folders=folders,
        )
        self.claimer = Claimer(
            s,
            intake,
            readiness,
            self.lanes,
            self.transitions,
            self.in_flight,
            metrics,
            fs_threads,
            owner=replica.instance,
        )
        self.heartbeat = Heartbeat(s, ledger, metrics, replica)

    def tasks(self) -> list[Task]:
        """The long-running tasks of the stages (the retry scheduler is separate: `run
        --once` drives it itself; the heartbeat too: it starts before recovery)."""
        out: list[Task] = [("archive worker", self.writer.start)]  # claims need not wait
        for lane in self.lanes:
            name = lane.route.name
            out.append((f"claimer:{name}", partial(self.claimer.run, lane)))
            for i in range(lane.route.concurrency):
                out.append((f"worker:{name}:{i}", partial(self.workers.run, lane)))
        out += [
            ("delivery", self.delivery.run),
            ("archiver", self.archiver.run),
            ("later", self.later.run),
        ]
        return out

    async def open(self) -> None:
        """The sinks' clients (credentials read, connections ready to reuse)."""
        await self.delivery.open()

    async def aclose(self) -> None:
        await self.delivery.aclose()

    async def run_retry_scheduler(self) -> None:
        await self.retries.run()

    async def dispatch_due(self) -> int:
        return await self.retries.dispatch_due()

    async def resume(self, job: JobRecord) -> None:
        await self.retries.resume(job)

    def stop_imports(self) -> None:
        """Shutting down: no new import starts; claimed jobs stay in proc/ for the next
        start."""
        self.workers.draining = True

    async def wait_idle(self, *, include_intake: bool = True) -> None:
        await self.in_flight.wait_idle(include_intake=include_intake)

    def close(self) -> None:
        """The queues between the stages, once the stages have stopped."""
        for lane in self.lanes:
            lane.close()
        self.delivery.close()
        self.archiver.close()
