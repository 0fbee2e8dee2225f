"""The service's lifecycle: the only module that starts long-running tasks or owns signals.

settings → folders and self-checks → ledger → instance registered → recovery →
pipeline, discovery, HTTP, housekeeping → (signal) → ordered shutdown → stopped.

Shutdown has two stages. The first SIGTERM/SIGINT stops intake and lets
in-flight imports finish within `shutdown_grace_s`; what is left is cancelled
and picked up by recovery at the next start. A second signal cancels at once.
Bookkeeping (ledger writes, archive moves) is shielded either way, so nothing
is left half-moved.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from service.arrivals import Judge
from service.discovery.intake import Intake
from service.discovery.readiness import Readiness
from service.discovery.routes import Router
from service.discovery.watcher import Discovery, detect_watch_mode
from service.errors import StartupError
from service.face.gauges import Gauges
from service.face.http import Health, build_http_app, serve_http
from service.face.metrics import Metrics
from service.face.progress import ProgressReporter
from service.face.ui import OperatorPage
from service.ledger import JobRecord, Ledger, ledger_for_url
from service.ledger.base import ReplicaRecord
from service.notify.base import ChannelError
from service.notify.dispatcher import Dispatcher, MetricsTally
from service.notify.process import DispatcherProcess
from service.pipeline import Pipeline
from service.settings import Settings
from service.storage.fsutil import (
    filesystem_type,
    is_network_filesystem,
    libc,
    probe_same_filesystem,
)
from service.storage.progress import progress_dir
from service.upkeep.reaper import Reaper
from service.upkeep.recovery import Recovery
from service.upkeep.replicas import mark_stopped
from service.upkeep.startup import LedgerWait

__all__ = ["App"]

log = logging.getLogger("filedock.app")
FOLDERS = ("transfer", "proc", "archive", "failed", "temp")


class App:
    """One filedock process. `run()` returns the exit code.

    Args:
        settings: the effective configuration.
        once: drain what is in `transfer/` (and due retries), then return.
        metrics: a registry to export to (tests pass their own).
    """

    def __init__(self, settings: Settings, *, once: bool = False, metrics: Metrics | None = None):
        self.settings = settings
        self.once = once
        self.metrics = metrics or Metrics()
        self.shutdown = anyio.Event()
        self._signals = 0
        self._tg: TaskGroup | None = None
        self.http_port: int | None = None
        self.ready = anyio.Event()
        self._lock_fd: int | None = None
        self._operator_page: OperatorPage | None = None

    # -- signals (plain callables: tests call them directly) ---------------------------

    def request_shutdown(self) -> None:
        """First call: graceful stop. Second call: cancel everything now."""
        self._signals += 1
        if self._signals == 1:
            log.info(
                "shutting down: intake stopped, waiting for imports in flight",
                extra={"grace_s": self.settings.shutdown_grace_s},
            )
            self.shutdown.set()
        elif self._tg is not None:
            log.warning("second signal: stopping now; recovery finishes the rest at next start")
            self._tg.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                self.request_shutdown()

    # -- start-up ----------------------------------------------------------------------

    def _prepare_folders(self) -> None:
        s = self.settings
        for name in (*FOLDERS, "state"):
            s.folder(name).mkdir(parents=True, exist_ok=True)
        probe_same_filesystem(s.folder("transfer"), s.folder("proc"))
        url = s.effective_ledger_url
        if url.startswith("sqlite:///"):
            db = Path(url.removeprefix("sqlite:///"))
            fstype = filesystem_type(db.parent)
            if is_network_filesystem(fstype):
                raise StartupError(
                    f"the SQLite ledger is on a network filesystem ({fstype}): SQLite's locking "
                    "does not work there. Use a PostgreSQL ledger (ledger_url: postgresql://...)"
                )
            self._lock_fd = _lock_single_replica(db)

    async def run(self) -> int:
        """Signals, HTTP and the loop's tick first: while the ledger keeps the start
        waiting, the process answers `/healthz` and says on `/readyz` why it is not
        ready, and a signal stops it."""
        s = self.settings
        _limit_malloc_arenas()
        await anyio.to_thread.run_sync(self._prepare_folders)
        ledger = ledger_for_url(s.effective_ledger_url)
        folders: dict[str, os.PathLike[str]] = {n: s.folder(n) for n in (*FOLDERS, "state")}
        health = Health(ledger, self.metrics, folders, s.min_free_bytes)
        # The operator page's token file is read now: a bad one stops the start.
        if s.http.enabled and s.ui.enabled and not self.once:
            self._operator_page = OperatorPage(s, ledger, self.metrics)
        ui = self._operator_page
        code, error = 0, None
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if not self.once:
                tg.start_soon(self._watch_signals)
            if s.http.enabled and not self.once:
                app = build_http_app(health, ui.app if ui else None)
                self.http_port = await tg.start(serve_http, app, s.http.host, s.http.port)
                log.info("serving HTTP", extra={"host": s.http.host, "port": self.http_port})
            tg.start_soon(self._tick, health)
            try:
                code = await self._with_ledger(ledger, health)
            except Exception as e:  # raised as itself below, not inside an ExceptionGroup
                error = e
            tg.cancel_scope.cancel()
        if error is not None:
            raise error
        return code

    async def _with_ledger(self, ledger: Ledger, health: Health) -> int:
        s = self.settings
        wait = LedgerWait(
            ledger, self.metrics, self.shutdown, once=self.once, shown_url=_redact(ledger.url)
        )
        try:
            replica = await wait.register(s.replica_id, s.lease_s)
            if replica is None:  # asked to stop while waiting for the ledger
                return 0
            try:
                return await self._run(ledger, replica, health, wait)
            finally:
                with anyio.CancelScope(shield=True):
                    await mark_stopped(ledger, replica)
        finally:
            with anyio.CancelScope(shield=True):
                await ledger.close()

    async def _run(
        self, ledger: Ledger, replica: ReplicaRecord, health: Health, wait: LedgerWait
    ) -> int:
        s, m = self.settings, self.metrics
        router = Router(list(s.routes))
        transfer_fs = filesystem_type(s.folder("transfer"))
        mode = "scan" if self.once else detect_watch_mode(transfer_fs, s.watch_mode)
        intake = Intake([r.name for r in s.routes], s.queue_size, m)
        readiness = Readiness(s.folder("transfer"))
        discovery = Discovery(
            s,
            router,
            readiness,
            intake,
            m,
            mode=mode,
            network_fs=is_network_filesystem(transfer_fs),
        )
        pipeline = Pipeline(s, ledger, m, intake, readiness, replica)
        discovery_done = anyio.Event()
        health.discovery_alive = lambda: not discovery_done.is_set()
        health.heartbeat = pipeline.heartbeat.problem
        started = time.monotonic()
        log.info(
            "filedock starting",
            extra={
                "routes": [r.name for r in s.routes],
                "watch_mode": mode,
                "ledger": _redact(ledger.url),
                "replica_id": s.replica_id,
                "instance": replica.instance,
                "once": self.once,
            },
        )
        for channel in s.notify:
            m.declare_channel(channel.name)
        # `run --once` sends what its drain caused in this process, at the end; a
        # running service sends from a process of its own (`notify/process.py`).
        dispatcher = (
            Dispatcher(s.notify, ledger, MetricsTally(m), lease_s=s.lease_s, owner=replica.instance)
            if self.once or not s.notify
            else DispatcherProcess(s, m, pipeline.transitions.outbox, owner=replica.instance)
        )
        recovery = Recovery(
            s,
            ledger,
            m,
            router,
            replica,
            sole=self._lock_fd is not None,
            steady=pipeline.heartbeat.steady,
        )
        # The sinks' and channels' clients: a missing credential stops the start.
        await pipeline.open()
        try:
            await _open(dispatcher)
            try:
                await self._serve(
                    pipeline, dispatcher, discovery, ledger, health, recovery, wait, discovery_done
                )
            finally:
                await dispatcher.aclose()
        finally:
            await pipeline.aclose()
        intake.close()
        pipeline.close()
        t = pipeline.tally
        log.info(
            "filedock stopped",
            extra={
                "done": t.done,
                "failed": t.failed,
                "retried": t.retried,
                "outcomes": t.by_outcome,
                "in_flight_left": len(pipeline.in_flight),
                "uptime_s": round(time.monotonic() - started, 3),
            },
        )
        if self.once:
            return 1 if t.failed else 0
        return 0

    async def _serve(
        self,
        pipeline: Pipeline,
        dispatcher: Dispatcher | DispatcherProcess,
        discovery: Discovery,
        ledger: Ledger,
        health: Health,
        recovery: Recovery,
        wait: LedgerWait,
        discovery_done: anyio.Event,
    ) -> None:
        s = self.settings
        async with anyio.create_task_group() as tg:
            outer, self._tg = self._tg, tg  # a second signal ends this group: the stop is logged
            if self._operator_page is not None:
                tg.start_soon(self._operator_page.snapshot.run, name="operator page")
            tg.start_soon(pipeline.heartbeat.run, name="heartbeat")  # a long recovery beats too
            report = await wait.recover(recovery)
            health.recovery_done = True
            for name, task in pipeline.tasks():
                tg.start_soon(task, name=name)
            if isinstance(dispatcher, DispatcherProcess):
                tg.start_soon(dispatcher.run, name="dispatcher")
            outbox, instance = pipeline.transitions.outbox, recovery.replica.instance
            judge = Judge(s, ledger, self.metrics, outbox, owner=instance)
            if judge and not self.once:
                tg.start_soon(judge.run, name="arrivals")
            tg.start_soon(self._resume_all, pipeline, report.resume)
            if not self.once:
                tg.start_soon(self._take_over, recovery, pipeline)
            gauges = Gauges(s, self.metrics, FOLDERS)
            tg.start_soon(gauges.run, pipeline, discovery, ledger, health)
            in_flight = pipeline.in_flight
            progress = ProgressReporter(
                progress_dir(s.folder("state")), self.metrics, in_flight.__contains__
            )
            tg.start_soon(progress.run)
            self._start_reaper(tg, ledger)
            _hand_back_startup_memory()
            self.ready.set()
            if self.once:
                await self._drain(pipeline, discovery, report.resume)
                assert isinstance(dispatcher, Dispatcher)
                while await dispatcher.dispatch():  # the events of what was done
                    pass
            else:
                tg.start_soon(self._discover, discovery, discovery_done)
                tg.start_soon(pipeline.run_retry_scheduler)
                await self.shutdown.wait()
                health.stopping = True
                discovery.stop.set()
                await self._graceful_stop(pipeline)
            tg.cancel_scope.cancel()
        self._tg = outer

    async def _discover(self, discovery: Discovery, done: anyio.Event) -> None:
        try:
            await discovery.run()
        finally:
            done.set()

    async def _resume_all(self, pipeline: Pipeline, jobs: list[JobRecord]) -> None:
        for job in jobs:
            await pipeline.resume(job)

    async def _drain(
        self, pipeline: Pipeline, discovery: Discovery, resumed: list[JobRecord]
    ) -> None:
        """`run --once`: one scan, then until nothing is queued, in flight or due."""
        while True:
            await discovery.scan()
            await pipeline.wait_idle()
            if not await pipeline.dispatch_due():
                await pipeline.wait_idle()
                if not await pipeline.dispatch_due():
                    return

    async def _graceful_stop(self, pipeline: Pipeline) -> None:
        pipeline.stop_imports()
        with anyio.move_on_after(self.settings.shutdown_grace_s) as scope:
            await pipeline.wait_idle(include_intake=False)
        if scope.cancelled_caught:
            log.warning(
                "grace period over: cancelling imports still running",
                extra={"in_flight": len(pipeline.in_flight)},
            )

    async def _take_over(self, recovery: Recovery, pipeline: Pipeline) -> None:
        """Resume the jobs of replicas that died, once their lease has expired."""
        while True:
            await anyio.sleep(self.settings.lease_s / 2)
            try:
                jobs = await recovery.take_over(set(pipeline.in_flight.jobs))
            except Exception as e:
                self.metrics.ledger_errors.inc()
                log.error("lease take-over failed", extra={"error": repr(e)[:300]})
                continue
            for job in jobs:
                await pipeline.resume(job)

    async def _tick(self, health: Health) -> None:
        while True:
            health.loop_tick = time.monotonic()
            await anyio.sleep(1.0)

    def _start_reaper(self, tg: TaskGroup, ledger: Ledger) -> None:
        if not self.once:
            tg.start_soon(Reaper(self.settings, ledger, self.metrics).run_forever)


async def _open(dispatcher: Dispatcher | DispatcherProcess) -> None:
    """The channels' clients: a channel that cannot be used as configured (a missing
    secret) stops the start, named."""
    if isinstance(dispatcher, DispatcherProcess):
        await dispatcher.start()
        return
    try:
        await dispatcher.open()
    except ChannelError as e:
        raise StartupError(e.message) from None


def _lock_single_replica(db: Path) -> int:
    """Hold an exclusive lock for as long as the process runs: one service per SQLite ledger.

    The kernel drops the lock when the process dies, however it dies.
    """
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(db.with_name(db.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(
            f"another filedock is already running with the SQLite ledger {db}: several "
            "replicas must share a PostgreSQL ledger (ledger_url: postgresql://...)"
        ) from None
    return fd


def _limit_malloc_arenas() -> None:
    """Two glibc malloc arenas instead of up to eight per core (`MALLOC_ARENA_MAX=2`).

    A dozen threads allocate (file-system workers, importers, the ledger writer) and
    what they free stays spread over their own arenas: a 100,000-file burst peaked at
    106 MiB with the default and 74 MiB with two, at the same throughput
    (docs/benchmarks.md). Runs before the first worker thread; an explicit
    MALLOC_ARENA_MAX in the environment wins. A no-op where libc has no `mallopt`.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    if hasattr(libc, "mallopt"):
        libc.mallopt(-8, 2)  # M_ARENA_MAX


def _hand_back_startup_memory() -> None:
    """Return to the system the heap that start-up used and freed.

    Building an S3 sink's client parses botocore's JSON models, and glibc keeps the
    freed heap pages for later: 1.8 MiB of an idle service's 76 MiB with one S3 sink
    (docs/benchmarks.md). A no-op where libc has no `malloc_trim`.
    """
    gc.collect()
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _redact(url: str) -> str:
    """A ledger URL without its password, for logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url
