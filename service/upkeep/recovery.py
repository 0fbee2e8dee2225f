"""Start-up recovery: reconcile `proc/`, `archive/`, `failed/`, `temp/` and the ledger.

The filesystem is the truth. Recovery finishes half-done moves, re-queues
interrupted imports, adopts job folders that have no ledger row, removes empty
job folders and our own unfinished copies (`<id>.tmp`, scratch in `temp/`), and
counts everything it does in `filedock_recovery_actions_total{kind}`.
It never deletes a payload: anything it cannot explain is counted as an
`inconsistency`, logged, and left where it is.

With several replicas it only touches jobs whose lease has expired, jobs of
instances known to have ended (`replicas.py`), and folders that have no row at all;
never a live instance's jobs, whatever its name.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from service.discovery.routes import Router
from service.errors import JobError
from service.face.logs import job_fields
from service.face.metrics import Metrics
from service.ledger import JobRecord, Ledger
from service.ledger.base import ReplicaRecord
from service.settings import Settings
from service.storage.archive import archive_dir_for, check_published, read_json
from service.storage.claim import payload_name, stored_name
from service.storage.fsutil import Barrier
from service.storage.names import rfc3339
from service.upkeep.replicas import take_orphans

__all__ = ["Recovery", "RecoveryReport"]

log = logging.getLogger("filedock.recovery")
JOB_ID = re.compile(r"^\d{8}T\d{9}Z-[0-9a-f]{8}$")
_SCRATCH_DAYS = 3


@dataclass
class RecoveryReport:
    actions: dict[str, int] = field(default_factory=dict)
    resume: list[JobRecord] = field(default_factory=list)

    def add(self, kind: str) -> None:
        self.actions[kind] = self.actions.get(kind, 0) + 1


class Recovery:
    """Recovery for the instance `replica`; `sole`: this process holds the ledger's
    single-replica lock (SQLite), so every job it finds is free to take."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        metrics: Metrics,
        router: Router,
        replica: ReplicaRecord,
        *,
        sole: bool = False,
        steady: Callable[[float], bool] = lambda now: True,
    ) -> None:
        self.settings = settings
        self.replica = replica
        self.sole = sole
        self.steady = steady  # whether this process may judge others by their silence
        self._taken: dict[str, JobRecord] = {}  # taken over, not handled yet (the ledger failed)
        self._resume: list[JobRecord] = []  # taken over and requeued, not yet handed back
        self.ledger = ledger
        self.metrics = metrics
        self.router = router
        self.proc = settings.folder("proc")
        self.failed = settings.folder("failed")
        self.archive = settings.folder("archive")
        self.temp = settings.folder("temp")

    def _act(self, report: RecoveryReport, kind: str, job_id: str, msg: str, **extra: Any) -> None:
        report.add(kind)
        self.metrics.recovery_actions.labels(kind).inc()
        level = logging.ERROR if kind == "inconsistency" else logging.INFO
        log.log(level, msg, extra=job_fields(job_id, recovery=kind, **extra))

    async def run(self, *, now: float | None = None) -> RecoveryReport:
        """Reconcile; the returned report lists the jobs the pipeline must resume."""
        now = time.time() if now is None else now
        report = RecoveryReport()
        # Its own too: a recovery the ledger interrupted may have taken some already.
        orphans = await self._take_orphans(now, mine=True)
        culprit = _lone_culprit(orphans)
        for job in orphans:
            await self._orphan(job, report, now, charge=job.id == culprit)
        await self._adopt_proc(report, now)
        await self._adopt_failed(report)
        await anyio.to_thread.run_sync(self._sweep_scratch, report)
        if report.actions:
            log.info("recovery finished", extra={"actions": report.actions})
        return report

    async def take_over(self, active: set[str], *, now: float | None = None) -> list[JobRecord]:
        """While running: jobs of instances that have ended (or whose lease expired), to
        resume here; jobs this process holds in memory are left alone."""
        now = time.time() if now is None else now
        # What an earlier take-over took but could not handle (or requeue) is this
        # process's now, which no query would give back: it comes first.
        report = RecoveryReport(resume=self._resume)
        orphans = await self._take_orphans(now)
        self._taken.update((job.id, job) for job in orphans)
        culprit = _lone_culprit(orphans)
        for job in list(self._taken.values()):
            if job.id not in active:
                await self._orphan(job, report, now, charge=job.id == culprit)
            del self._taken[job.id]
        # A replica that died between `done` and removing its source left a folder
        # whose job is final: finish that too.
        await self._adopt_proc(report, now, skip=active)
        resume, self._resume = self._resume, []
        return resume

    async def _take_orphans(self, now: float, *, mine: bool = False) -> list[JobRecord]:
        me, lease_s, by_age = self.replica, self.settings.lease_s, self.steady(now)
        ledger, sole = self.ledger, self.sole
        return await take_orphans(ledger, me, lease_s, now, sole=sole, by_age=by_age, mine=mine)

    # -- jobs the ledger knows ---------------------------------------------------------

    def _payload(self, job: JobRecord) -> bytes:
        return os.fsencode(self.proc / job.id) + b"/" + stored_name(job.name)

    async def _orphan(
        self, job: JobRecord, report: RecoveryReport, now: float, *, charge: bool = False
    ) -> None:
        in_proc = os.path.lexists(self._payload(job))
        final = archive_dir_for(self.archive, job.id)
        if (final / "manifest.json").exists() and await self._archive_verifies(job, final):
            await self._finish_done(job, report, now)
        elif (self.failed / job.id / "error.json").exists():
            doc = read_json(self.failed / job.id / "error.json") or {}
            await self.ledger.update(
                job.id,
                {
                    "state": "failed",
                    "outcome": doc.get("outcome", "set_aside"),
                    "error_class": doc.get("error_class", "io_error"),
                    "error": doc.get("message", "moved to failed/ before a crash"),
                    "failed_path": str(self.failed / job.id),
                    "updated_at": now,
                },
            )
            _remove_tree(self.proc / job.id)
            self._act(report, "finished_fail", job.id, "finished an interrupted move to failed/")
        elif in_proc:
            if job.state == "importing":
                history = [dict(h) for h in job.history]  # the record changes once written
                if history and history[-1].get("result") == "running":
                    history[-1].update(result="interrupted", ended_at=rfc3339(now))
                    if charge:
                        history[-1]["isolated"] = True
                await self.ledger.update(
                    job.id, {"state": "claimed", "history": history, "updated_at": now}
                )
                job.state, job.history = "claimed", history
            if job.state != "waiting":
                report.resume.append(job)
                self._act(report, "requeued", job.id, f"re-queued a job found {job.state}")
        elif job.state == "claimed" and not _has_payload(self.proc / job.id):
            # The row is written before the claim's mkdir and rename: the crash came in
            # between. The file is still in transfer/ (or another replica has it).
            _remove_tree(self.proc / job.id)
            await self.ledger.delete([job.id])
            self._act(report, "unclaimed_row", job.id, "removed the row of a claim never made")
        else:
            await self.ledger.update(
                job.id,
                {
                    "state": "failed",
                    "outcome": "set_aside",
                    "error_class": "io_error",
                    "error": "recovery found no file for this job in proc/, archive/ or failed/",
                    "updated_at": now,
                },
            )
            self._act(report, "inconsistency", job.id, "a job's file is missing", state=job.state)

    async def _archive_verifies(self, job: JobRecord, final: Path) -> bool:
        """A published archive counts only if it decompresses to the job's SHA-256 (and is
        made durable): its source is removed next. A bad copy, with its source still in
        proc/, is set back to be built again."""

        def check() -> bool:
            barrier = Barrier()
            try:
                check_published(final, job, barrier)
                barrier.flush()
            except (OSError, EOFError, ValueError, zlib.error, JobError):  # bad copy
                return False
            return True

        if job.sha256 is None or await anyio.to_thread.run_sync(check):
            return True
        if os.path.lexists(self._payload(job)):
            await anyio.to_thread.run_sync(shutil.rmtree, final)
            log.warning(
                "recovery: a published archive did not verify; it is built again",
                extra=job_fields(job.id, route=job.route, name=job.name),
            )
        return False

    async def _finish_done(self, job: JobRecord, report: RecoveryReport, now: float) -> None:
        final = archive_dir_for(self.archive, job.id)
        manifest = read_json(final / "manifest.json") or {}
        await self.ledger.update(
            job.id,
            {
                "state": "done",
                "outcome": manifest.get("outcome", job.outcome or "imported"),
                "archive_path": str(final),
                "sha256": manifest.get("sha256", job.sha256),
                "size": manifest.get("size", job.size),
                "updated_at": now,
            },
        )
        await anyio.to_thread.run_sync(_remove_tree, self.proc / job.id)
        self._act(report, "finished_archive", job.id, "finished an interrupted archive")

    # -- folders the ledger may not know -------------------------------------------------

    async def _adopt_proc(
        self, report: RecoveryReport, now: float, *, skip: set[str] | None = None
    ) -> None:
        """Folders in proc/ the ledger does not explain. At start (`skip` None): all of
        them; while running: only leftovers of final jobs this process does not hold."""
        final_only = skip is not None
        try:
            names = sorted(os.listdir(self.proc))
        except FileNotFoundError:
            return
        for entry in names:
            path = self.proc / entry
            if not JOB_ID.match(entry) or not path.is_dir() or path.is_symlink():
                continue
            if skip is not None and entry in skip:
                continue
            job = await self.ledger.get(entry)
            if final_only and (job is None or job.state not in ("done", "failed")):
                continue  # while running: other replicas' jobs in flight are theirs
            try:
                contents = [
                    n for n in os.listdir(os.fsencode(path)) if n not in (b"out", b"error.json")
                ]
            except FileNotFoundError:
                continue  # finished meanwhile
            if job is None:
                if not contents:
                    self._remove_empty(path, report)
                else:
                    await self._adopt(entry, contents[0], report, now)
            elif job.state == "done" and archive_dir_for(self.archive, entry).exists():
                await anyio.to_thread.run_sync(_remove_tree, path)
                self._act(report, "finished_archive", entry, "removed the source of a done job")
            elif job.state == "failed" and (self.failed / entry).exists():
                await anyio.to_thread.run_sync(_remove_tree, path)
                self._act(report, "finished_fail", entry, "removed a copy moved to failed/")
            elif job.state in ("done", "failed") and not final_only:
                self._act(report, "inconsistency", entry, "a final job still has a folder in proc/")

    async def _adopt(self, job_id: str, stored: bytes, report: RecoveryReport, now: float) -> None:
        name = payload_name(stored)
        c = self.router.classify(name)
        route = c.route.name if c.route is not None else None
        if route is None and self.settings.routes:
            route = self.settings.routes[0].name
        record = JobRecord(
            id=job_id,
            route=route or "unrouted",
            name=name,
            relative_path=name,
            state="claimed",
            detected_at=now,
            created_at=now,
            updated_at=now,
            owner=self.replica.instance,
            lease_expires_at=now + self.settings.lease_s,
        )
        await self.ledger.insert([record])
        report.resume.append(record)
        self._act(report, "adopted", job_id, "adopted a claimed file that had no ledger row")

    async def _adopt_failed(self, report: RecoveryReport) -> None:
        try:
            names = sorted(os.listdir(self.failed))
        except FileNotFoundError:
            return
        for entry in names:
            if not JOB_ID.match(entry) or await self.ledger.get(entry) is not None:
                continue
            doc = read_json(self.failed / entry / "error.json") or {}
            stored = [
                n
                for n in os.listdir(os.fsencode(self.failed / entry))
                if n not in (b"out", b"error.json")
            ]
            name = payload_name(stored[0]) if stored else entry.encode()
            now = time.time()
            await self.ledger.insert(
                [
                    JobRecord(
                        id=entry,
                        route=str(doc.get("route", "unrouted")),
                        name=name,
                        relative_path=name,
                        state="failed",
                        outcome=doc.get("outcome", "set_aside"),
                        error_class=doc.get("error_class", "io_error"),
                        error=doc.get("message", "adopted by recovery"),
                        sha256=doc.get("sha256"),
                        size=doc.get("size"),
                        detected_at=now,
                        created_at=now,
                        updated_at=now,
                        failed_path=str(self.failed / entry),
                    )
                ]
            )
            self._act(report, "adopted", entry, "adopted a failed/ folder that had no ledger row")

    def _sweep_scratch(self, report: RecoveryReport) -> None:
        """Our own unfinished copies: `<id>.tmp` in archive/ and failed/, and temp/."""
        for entry in _listdir(self.temp):
            if JOB_ID.match(entry) and not (self.proc / entry).exists():
                _remove_tree(self.temp / entry)
                self._act(report, "removed_tmp", entry, "removed scratch of an ended job")
        for tmp in _recent_tmp_dirs(self.failed, self.archive):
            job_id = tmp.name.removesuffix(".tmp")
            if (self.proc / job_id).exists() or (tmp.with_name(job_id)).exists():
                _remove_tree(tmp)  # the source is still in proc/, or the copy is done
                self._act(report, "removed_tmp", job_id, "removed an unfinished copy")
            else:
                self._act(report, "inconsistency", job_id, "an unfinished copy has no source")

    def _remove_empty(self, path: Path, report: RecoveryReport) -> None:
        shutil.rmtree(path)  # holds at most an empty out/
        self._act(report, "removed_empty", path.name, "removed an empty job folder")


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _recent_tmp_dirs(failed: Path, archive: Path) -> list[Path]:
    """`<id>.tmp` copies in failed/ and in the archive's last few day folders."""
    found = [failed / e for e in _listdir(failed) if e.endswith(".tmp")]
    now = time.time()
    for back in range(_SCRATCH_DAYS):
        t = time.gmtime(now - back * 86400)
        day = archive / f"{t.tm_year:04d}" / f"{t.tm_mon:02d}" / f"{t.tm_mday:02d}"
        found += [day / e for e in _listdir(day) if e.endswith(".tmp")]
    return found


def _lone_culprit(orphans: list[JobRecord]) -> str | None:
    """The job that was the only one importing when the service died: nothing else can
    have caused the crash, so it is charged for it (see `Pipeline._attempts_left`).
    With several importing, none is charged; each then imports alone, as a suspect."""
    importing = [job.id for job in orphans if job.state == "importing"]
    return importing[0] if len(importing) == 1 else None


def _has_payload(job_dir: Path) -> bool:
    """Whether a job folder holds anything but the (empty) folders made for its importer."""
    try:
        entries = os.listdir(job_dir)
    except FileNotFoundError:
        return False
    return any(e not in ("out",) or os.listdir(job_dir / e) for e in entries)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
