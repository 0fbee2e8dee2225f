"""The retention reaper: deletes archive and failed job folders and ledger rows past their age.

What goes, per kind (`settings.retention`, never below 7 days):
- `archive`: a folder `archive/YYYY/MM/DD/<job-id>/` older than `archive_days`;
- `failed`: a folder `failed/<job-id>/` older than `failed_days`;
- `ledger`: a done or failed row whose `updated_at` is older than `ledger_days`; and
  the outbox's sent (or given up) events written before then; and the `replicas` rows
  of instances silent for `REPLICA_DAYS` (7).

A folder's age is its ledger row's `updated_at`, and only a done or failed row lets
it go: a folder whose row is younger, or unfinished, stays. A folder without a row
(its row already reaped, or never written) is aged by its job id's time prefix.
Anything that is not a directory named like a job id (`<id>.tmp`, symlinks, stray
files) is never touched. Day, month and year folders are removed once empty and
wholly older than the cutoff.

Each pass handles at most `retention.batch_size` items per kind, oldest first, and
says in `ReapReport.more` whether a full batch was found, so more may be waiting.
With a PostgreSQL ledger only one replica reaps at a time (a session advisory lock,
`REAPER_LOCK`); a replica that does not get it skips the pass.

`filedock reap` calls `reap_once` until `more` is False (`--dry-run`: once, deleting
nothing); `app.py` runs `run_forever`. The clock is injectable (`clock=time.time`).

`ReapReport` holds `archive` and `failed` (paths), `ledger` (job ids), `pruned`
(emptied date folders), `errors`, `more`, `skipped`, and has `counts()`, `render()`
(text for a person) and `to_json()`. A dry run lists
exactly what a real run at the same moment deletes. `Reaper(...)` and `reap_once`
raise `ConfigError` when a retention is below 7 days.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal, Protocol, runtime_checkable

import anyio
import anyio.to_thread

from service.errors import ConfigError
from service.face.logs import get_logger
from service.face.metrics import Metrics
from service.ledger import FINAL_STATES, Ledger
from service.settings import Retention, Settings
from service.storage.names import rfc3339
from service.upkeep.archive_days import Day, old_days, prune, prune_plan, subdirs

__all__ = ["MIN_RETENTION_DAYS", "REAPER_LOCK", "ReapReport", "Reaper", "job_id_time"]

MIN_RETENTION_DAYS: Final = 7
REAPER_LOCK: Final = "filedock-reaper"
REPLICA_DAYS: Final = 7  # how long `filedock replicas` shows an instance that has ended
_DAY: Final = 86400.0
_JOB_ID = re.compile(r"^(\d{8}T\d{6})(\d{3})Z-[0-9a-f]{8}\Z")
_FINAL: Final = sorted(FINAL_STATES)

Kind = Literal["archive", "failed", "ledger"]
log = get_logger(__name__)


@runtime_checkable
class _Lockable(Protocol):
    """A ledger shared by replicas (PostgreSQL) offers a lock; SQLite has one replica."""

    def advisory_lock(self, key: str) -> AbstractAsyncContextManager[bool]: ...


@dataclass
class ReapReport:
    """What one pass deleted, or with `dry_run` would delete."""

    dry_run: bool
    now: float
    archive: list[Path] = field(default_factory=list)
    failed: list[Path] = field(default_factory=list)
    ledger: list[str] = field(default_factory=list)
    pruned: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    more: bool = False
    skipped: str | None = None

    def counts(self) -> dict[str, int]:
        return {
            "archive": len(self.archive),
            "failed": len(self.failed),
            "ledger": len(self.ledger),
        }

    def to_json(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "now": rfc3339(self.now),
            "counts": self.counts(),
            "archive": [str(p) for p in self.archive],
            "failed": [str(p) for p in self.failed],
            "ledger": self.ledger,
            "pruned": [str(p) for p in self.pruned],
            "errors": self.errors,
            "more": self.more,
            "skipped": self.skipped,
        }

    def render(self) -> str:
        """The report for a person: a summary line, then one line per item."""
        if self.skipped:
            return f"reap skipped: {self.skipped}"
        verb = "would delete" if self.dry_run else "deleted"
        c = self.counts()
        lines = [
            f"{verb} {c['archive']} archive folder(s), {c['failed']} failed folder(s),"
            f" {c['ledger']} ledger row(s)"
        ]
        lines += [f"archive  {p}" for p in self.archive]
        lines += [f"failed   {p}" for p in self.failed]
        lines += [f"ledger   {i}" for i in self.ledger]
        lines += [f"pruned   {p}" for p in self.pruned]
        lines += [f"error    {e}" for e in self.errors]
        if self.more:
            lines.append("a batch was full: more may be due (run again)")
        return "\n".join(lines)


def job_id_time(name: str) -> float | None:
    """The creation time in a job id (`20261123T175400123Z-3f9a1c7e`), or None.

    >>> job_id_time("19700102T000000500Z-0badf00d")
    86400.5
    >>> job_id_time("19700102T000000500Z-0badf00d.tmp") is None
    True
    """
    m = _JOB_ID.match(name)
    if m is None:
        return None
    try:
        stamp = datetime.strptime(m[1], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    return stamp.timestamp() + int(m[2]) / 1000


def check_floor(retention: Retention) -> None:
    """Refuse any retention below 7 days, however the settings were built."""
    for kind in ("archive", "failed", "ledger"):
        days = getattr(retention, f"{kind}_days")
        if not days >= MIN_RETENTION_DAYS:
            raise ConfigError(
                f"retention.{kind}_days: {days} is below the {MIN_RETENTION_DAYS}-day floor;"
                " the reaper refuses to run"
            )
    if retention.batch_size < 1:
        raise ConfigError(f"retention.batch_size: {retention.batch_size} must be at least 1")


class Reaper:
    """Applies `settings.retention` to the archive, failed folders and the ledger."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_floor(settings.retention)
        self.retention = settings.retention
        self.archive_root = settings.folder("archive")
        self.failed_root = settings.folder("failed")
        self._ledger = ledger
        self._metrics = metrics
        self._clock = clock

    async def run_forever(self) -> None:
        """Reap every `interval_s`, at once again while a pass found a full batch."""
        while True:
            more = False
            try:
                more = (await self.reap_once(dry_run=False)).more
            except Exception as e:  # e.g. the ledger is away: try again next interval
                log.warning("reap failed", extra={"error": repr(e)})
            await anyio.sleep(0 if more else self.retention.interval_s)

    async def reap_once(self, dry_run: bool) -> ReapReport:
        """One pass: at most `batch_size` archive folders, failed folders and ledger rows."""
        check_floor(self.retention)
        started = time.monotonic()
        report = ReapReport(dry_run=dry_run, now=self._clock())
        if dry_run or not isinstance(self._ledger, _Lockable):
            await self._reap(report)
        else:
            async with self._ledger.advisory_lock(REAPER_LOCK) as held:
                if held:
                    await self._reap(report)
                else:
                    report.skipped = "another replica is reaping"
        if any(report.counts().values()) or report.errors or report.skipped:
            log.info(
                "reaped" if not dry_run else "reap dry run",
                extra={
                    **report.counts(),
                    "pruned": len(report.pruned),
                    "errors": len(report.errors),
                    "more": report.more,
                    "skipped": report.skipped,
                    "elapsed_s": round(time.monotonic() - started, 4),
                },
            )
        return report

    async def _reap(self, report: ReapReport) -> None:
        r, now = self.retention, report.now
        archive_cut = now - r.archive_days * _DAY
        days = await anyio.to_thread.run_sync(old_days, self.archive_root, archive_cut)
        visited: list[Day] = []
        budget = r.batch_size
        for day in days:
            visited.append(day)
            budget -= await self._sweep("archive", day.path, archive_cut, report, budget)
            if budget == 0:
                break
        archive_full = budget == 0
        if report.dry_run:
            gone = set(report.archive)
            report.pruned = await anyio.to_thread.run_sync(prune_plan, visited, gone, archive_cut)
        else:
            report.pruned = await anyio.to_thread.run_sync(prune, visited, archive_cut)

        failed_cut = now - r.failed_days * _DAY
        handled = await self._sweep("failed", self.failed_root, failed_cut, report, r.batch_size)
        failed_full = handled == r.batch_size

        rows = await self._ledger.older_than(_FINAL, now - r.ledger_days * _DAY, r.batch_size)
        report.ledger = [row.id for row in rows]
        if report.ledger and not report.dry_run:
            with anyio.CancelScope(shield=True):
                await self._ledger.delete(report.ledger)
                self._metrics.reaped.labels("ledger").inc(len(report.ledger))
        if not report.dry_run:  # sent events and judged windows, kept as long as the jobs
            before = now - r.ledger_days * _DAY
            with anyio.CancelScope(shield=True):
                events = await self._ledger.prune_outbox(before, r.batch_size)
                windows = await self._ledger.prune_windows(before, r.batch_size)
                ended = await self._ledger.prune_replicas(now - REPLICA_DAYS * _DAY, r.batch_size)
            self._metrics.reaped.labels("events").inc(events)
            self._metrics.reaped.labels("windows").inc(windows)
            self._metrics.reaped.labels("replicas").inc(ended)

        # A full batch that deleted nothing (say, folders we may not remove) must not spin.
        report.more = (
            (archive_full and bool(report.archive))
            or (failed_full and bool(report.failed))
            or len(rows) >= r.batch_size
        )

    async def _sweep(
        self, kind: Kind, folder: Path, cutoff: float, report: ReapReport, limit: int
    ) -> int:
        """Reap up to `limit` expired job folders of one folder; returns how many it tried."""
        root, out = (
            (self.archive_root, report.archive)
            if kind == "archive"
            else (self.failed_root, report.failed)
        )
        tried = 0
        for name, created in await anyio.to_thread.run_sync(_job_dirs, folder):
            if tried >= limit or created >= cutoff:
                break  # names sort by creation time, and a job is never older than its id
            row = await self._ledger.get(name)
            if row is not None and not (row.state in FINAL_STATES and row.updated_at < cutoff):
                continue  # a younger or unfinished row keeps its folder
            tried += 1
            path = folder / name
            if report.dry_run:
                out.append(path)
                continue
            with anyio.CancelScope(shield=True):
                error = await anyio.to_thread.run_sync(_remove_job_dir, path, root)
                if error is None:
                    out.append(path)
                    self._metrics.reaped.labels(kind).inc()
                elif error:
                    report.errors.append(error)
                    log.warning("reap: cannot remove a job folder", extra={"error": error})
        return tried


# -- blocking file work (run in threads) ----------------------------------------------


def _job_dirs(folder: Path) -> list[tuple[str, float]]:
    """Job folders in `folder` (real directories named like a job id) and their id times."""
    found: list[tuple[str, float]] = []
    for name in subdirs(folder, _JOB_ID):
        created = job_id_time(name)
        if created is not None:
            found.append((name, created))
    return found


def _remove_job_dir(path: Path, root: Path) -> str | None:
    """Delete one job folder; None when done, "" when already gone, else the reason not."""
    real_root = os.path.realpath(root)
    parent = os.path.realpath(path.parent)
    if parent != real_root and not parent.startswith(real_root + os.sep):
        return f"{path} is outside {root}: left alone"
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            return f"{path} is not a directory (a symlink?): left alone"
        # rmtree works on directory descriptors here, so a symlink swapped in below
        # is removed as a link, never followed.
        shutil.rmtree(path)
    except FileNotFoundError:
        return ""  # another reaper (or `filedock reap`) was first
    except OSError as e:
        return f"cannot remove {path}: {e.strerror or e}"
    return None
