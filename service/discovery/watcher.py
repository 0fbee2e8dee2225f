"""Discovery: find ready files in `transfer/` and queue them, bounded, per route.

Scans are the truth and events only cut latency: the kernel's inotify queue
overflows under a burst, a new subfolder's first files can come before its watch,
and watchfiles (used for `poll`, and for `events` where there is no inotify) loses
events and dies on a non-UTF-8 name (docs/architecture.md, "Discovery"). So a full scan runs at
start, every `scan_interval_s`, after each watcher restart or overflow, and a
subfolder is scanned when it appears. A scan walks the tree lazily and waits when
a route's queue is full: a backlog stays on disk, and memory does not grow with it.

A periodic scan does not list again a folder whose last listing still holds (see
`walk.py`); scans at start, after a watcher restart, an overflow or a dropped hint
list everything.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Literal

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from service.discovery.intake import Intake
from service.discovery.readiness import Readiness
from service.discovery.routes import Router
from service.discovery.walk import CHUNK, Found, ScanTally, TreeWalk, take
from service.discovery.watching import Watching
from service.face.logs import job_fields
from service.face.metrics import Metrics
from service.settings import Route, Settings
from service.storage.fsutil import is_network_filesystem

__all__ = ["Discovery", "detect_watch_mode"]

log = logging.getLogger("filedock.watcher")

_REPORT_CAP = 10_000  # unrouted/stalled names remembered to report each once
_CHECKPOINT_EVERY = 512  # watcher events handled between two yields to the loop


def detect_watch_mode(fstype: str, configured: str) -> Literal["events", "poll", "scan"]:
    """`auto` picks `scan` on network filesystems (inotify sees no other node's writes)."""
    if configured != "auto":
        return configured  # type: ignore[return-value]
    if is_network_filesystem(fstype):
        return "scan"
    return "events"


class Discovery:
    """Scans and watches `transfer/`, and feeds the intake."""

    def __init__(
        self,
        settings: Settings,
        router: Router,
        readiness: Readiness,
        intake: Intake,
        metrics: Metrics,
        *,
        mode: Literal["events", "poll", "scan"],
        network_fs: bool,
    ) -> None:
        self.settings = settings
        self.transfer = settings.folder("transfer")
        self._tb = os.fsencode(self.transfer)
        self.router = router
        self.readiness = readiness
        self.intake = intake
        self.metrics = metrics
        self.mode = mode
        self.stop = anyio.Event()
        self._scan_now = anyio.Event()
        self._want_full = True
        self._thorough = True  # the next full scan lists every folder
        self._subdirs: set[bytes] = set()
        self.watching = Watching(self)
        self._unrouted_reported: set[bytes] = set()
        # Listings are kept only where a folder's mtime and ctime can be trusted.
        self._walk = TreeWalk(
            self._tb, router, readiness, self.watching.watch_folder, keep_listings=not network_fs
        )
        self._ordered = {r.name for r in settings.routes if r.order != "none"}
        self._routes = {r.name: r for r in settings.routes}
        self._look_now = anyio.Event()
        readiness.notify = self.look_sooner
        self.backlog_files = 0
        self.backlog_bytes = 0
        self.oldest_mtime: float | None = None

    # -- scanning ------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.metrics.watcher_mode.labels(self.mode).set(1)
        log.info("discovery started", extra={"mode": self.mode, "path": str(self.transfer)})
        async with anyio.create_task_group() as tg:
            if self.mode != "scan":
                # Watch first, then scan: whatever the scan does not see, the watch does.
                await tg.start(self.watching.supervise)
            tg.start_soon(self._look_when_due)
            task_status.started()
            await self._scan_loop()
            tg.cancel_scope.cancel()

    async def _scan_loop(self) -> None:
        while not self.stop.is_set():
            self._scan_now = anyio.Event()
            subdirs, self._subdirs = self._subdirs, set()
            if self._want_full:
                thorough, self._want_full, self._thorough = self._thorough, False, False
                await self.scan(periodic=not thorough)
            else:
                for sub in subdirs:
                    await self.scan(sub)
            with anyio.move_on_after(self.settings.scan_interval_s):
                await self._scan_now.wait()
                continue
            self._want_full = True

    async def _look_when_due(self) -> None:
        """Look again at each waiting file when it is due (a stable file at the end of
        its settle, a file that was open for writing after a backoff): it is claimed
        then, not at the next periodic scan."""
        while True:
            self._look_now = anyio.Event()
            due = self.readiness.next_due()
            delay = self.settings.scan_interval_s if due is None else due - time.monotonic()
            if delay > 0:
                with anyio.move_on_after(delay):
                    await self._look_now.wait()
                continue
            for route, rel in self.readiness.take_due(time.monotonic()):
                await self.look_again(self._routes[route], rel)

    def look_sooner(self) -> None:
        """A file became due sooner than any before: the due looks wake up."""
        self._look_now.set()

    async def look_again(self, route: Route, rel: bytes) -> None:
        """Look at one candidate again (an event, or its due time): queue it if ready."""
        if route.name in self._ordered:
            self.request_scan()  # an ordered lane takes files oldest first: scan
        elif self.readiness.is_ready(route, rel, None):
            await self._found(route.name, rel, from_watcher=True)

    def request_scan(self, subdir: bytes | None = None) -> None:
        """Ask for a scan soon: of one new subfolder, or (None) of everything."""
        if subdir is None:
            self._want_full = self._thorough = True
        else:
            self._subdirs.add(subdir)
        self._scan_now.set()

    async def scan(self, subdir: bytes | None = None, *, periodic: bool = False) -> None:
        """Walk `transfer/` (or one subfolder of it) and queue every ready file.

        `periodic`: a folder whose last listing still holds is not listed again.
        """
        started = time.monotonic()
        visited: set[bytes] = set()
        walker = self._walk.walk(subdir, reuse=periodic, visited=visited)
        tally = ScanTally()
        ordered: list[tuple[float, bytes, str]] = []  # (mtime, path, route): oldest first
        while True:
            chunk = await anyio.to_thread.run_sync(take, walker, CHUNK)
            self.watching.raise_watch_error()
            found = self._sort_chunk(chunk, tally, ordered)
            for route, rel in found:
                await self._found(route, rel, from_watcher=False)
            if self.readiness.take_sooner():
                self.look_sooner()  # the walk found a file due sooner than any before
            if len(chunk) < CHUNK or self.stop.is_set():
                break
        for _, rel, route in sorted(ordered):
            await self._found(route, rel, from_watcher=False)
        if subdir is None:
            self.metrics.unrouted_files.set(tally.unrouted)
            self.metrics.stalled_uploads.set(self.readiness.stalled_count())
            self.metrics.scan_duration.observe(time.monotonic() - started)
            self.backlog_files, self.backlog_bytes = tally.files, tally.size
            self.oldest_mtime = tally.oldest
            # Forget files that left; those in folders not listed again are still there.
            self._unrouted_reported = {
                rel
                for rel in self._unrouted_reported
                if rel in tally.flagged or rel.rpartition(b"/")[0] in tally.unchanged
            }
            self._walk.forget_except(visited)

    def _sort_chunk(
        self, chunk: list[Found], tally: ScanTally, ordered: list[tuple[float, bytes, str]]
    ) -> list[tuple[str, bytes]]:
        """Count a chunk of a scan; return the files to queue now (ordered lanes wait)."""
        found: list[tuple[str, bytes]] = []
        for kind, route, rel, st in chunk:
            if kind == "unchanged":
                tally.unchanged.add(rel)
                tally.unrouted += self._walk.unrouted_in(rel)
                continue
            if kind in ("unrouted", "orphan_companion") and len(tally.flagged) < _REPORT_CAP:
                tally.flagged.add(rel)
            if kind == "unrouted":
                tally.unrouted += 1
                self._report_once(rel, "file matches no route; left in transfer/", "unrouted")
            elif kind == "orphan_companion":
                self._report_once(
                    rel, "marker or checksum file without its file; left in transfer/", "orphan"
                )
            elif kind == "candidate" and route is not None:
                if route in self._ordered and st is not None:
                    ordered.append((st.st_mtime, rel, route))
                else:
                    found.append((route, rel))
            if st is not None:
                tally.add(st)
        return found

    async def _found(self, route: str, rel: bytes, *, from_watcher: bool) -> None:
        if from_watcher:
            if not self.intake.offer_nowait(route, rel):
                self.intake.seen_by_watcher(rel)
                self.request_scan()
            return
        if rel in self.intake:
            return
        if (
            self.watching.since is not None
            and not self.intake.was_seen_by_watcher(rel)
            and self._missed_by_watcher(rel)
        ):
            self.metrics.watcher_missed.inc()
        await self.intake.offer(route, rel)

    def _missed_by_watcher(self, rel: bytes) -> bool:
        """A file the watcher should have reported: it appeared while the watcher ran."""
        try:
            st = os.lstat(self._tb + b"/" + rel)
        except OSError:
            return False
        since = max(self.watching.since or 0.0, self.intake.misses_unknown_before)
        appeared = max(st.st_mtime, st.st_ctime)
        return since < appeared < time.time() - 2.0 - self.settings.debounce_ms / 1000

    def _report_once(self, rel: bytes, message: str, state: str) -> None:
        """Log a file that waits for a person once, not on every scan."""
        if rel in self._unrouted_reported or len(self._unrouted_reported) >= _REPORT_CAP:
            return
        self._unrouted_reported.add(rel)
        log.warning(message, extra=job_fields(name=rel, state=state))
