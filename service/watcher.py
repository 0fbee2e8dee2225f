"""Discovery: find ready files in `transfer/` and queue them, bounded, per route.

Scans are the truth and events only cut latency: the kernel's inotify queue
overflows under a burst, a new subfolder's first files can come before its watch,
and watchfiles (used for `poll`, and for `events` where there is no inotify) loses
events and dies on a non-UTF-8 name (RELIABILITY.md). So a full scan runs at
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
import stat
import time
from collections.abc import Callable
from typing import Literal

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from service.fsutil import is_network_filesystem
from service.inotify import TreeWatch, WatchLimitReached, inotify_available
from service.intake import Intake
from service.logs import job_fields
from service.metrics import Metrics
from service.readiness import Readiness
from service.routes import Router
from service.settings import Route, Settings
from service.walk import CHUNK, Found, ScanTally, TreeWalk, take

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
        self._watcher_since: float | None = None
        self._tree: TreeWatch | None = None  # inotify, while the watcher runs on it
        self._watch_scope: anyio.CancelScope | None = None
        self._watch_error: Exception | None = None
        self._unrouted_reported: set[bytes] = set()
        # Listings are kept only where a folder's mtime and ctime can be trusted.
        self._walk = TreeWalk(
            self._tb, router, readiness, self._watch_folder, keep_listings=not network_fs
        )
        self._ordered = {r.name for r in settings.routes if r.order != "none"}
        self._routes = {r.name: r for r in settings.routes}
        self._look_now = anyio.Event()
        readiness.notify = self._look_sooner
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
                await tg.start(self._supervise_watcher)
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
                await self._look_again(self._routes[route], rel)

    def _look_sooner(self) -> None:
        self._look_now.set()

    async def _look_again(self, route: Route, rel: bytes) -> None:
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
            self._raise_watch_error()
            found = self._sort_chunk(chunk, tally, ordered)
            for route, rel in found:
                await self._found(route, rel, from_watcher=False)
            if self.readiness.take_sooner():
                self._look_sooner()  # the walk found a file due sooner than any before
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
            self._watcher_since is not None
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
        since = max(self._watcher_since or 0.0, self.intake.misses_unknown_before)
        appeared = max(st.st_mtime, st.st_ctime)
        return since < appeared < time.time() - 2.0 - self.settings.debounce_ms / 1000

    def _report_once(self, rel: bytes, message: str, state: str) -> None:
        """Log a file that waits for a person once, not on every scan."""
        if rel in self._unrouted_reported or len(self._unrouted_reported) >= _REPORT_CAP:
            return
        self._unrouted_reported.add(rel)
        log.warning(message, extra=job_fields(name=rel, state=state))

    # -- watching ------------------------------------------------------------------

    async def _supervise_watcher(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the watcher; when it dies, log, count, rescan at once and restart with backoff."""
        backoff, first = 1.0, True

        def watching() -> None:
            nonlocal first
            if first:
                first = False
                task_status.started()

        while not self.stop.is_set():
            started = time.monotonic()
            self._watch_error = None
            try:
                with anyio.CancelScope() as self._watch_scope:
                    await self._watch(watching, rescan=not first)
                if self._watch_error is not None:
                    raise self._watch_error
            except Exception as e:
                self.metrics.watcher_restarts.inc()
                self._set_mode("scan")
                log.error(
                    "file watcher died; scanning until it restarts",
                    extra={"error": str(e)[:500] or repr(e), "retry_in_s": backoff},
                )
            else:
                if self.stop.is_set():
                    return
                self.metrics.watcher_restarts.inc()
                log.warning("file watcher stopped; restarting", extra={"retry_in_s": backoff})
            finally:
                self._watch_scope = None
            watching()
            self._watcher_since = None
            self.request_scan()
            if time.monotonic() - started > 60:
                backoff = 1.0
            with anyio.move_on_after(backoff):
                await self.stop.wait()
            backoff = min(backoff * 2, 60.0)

    async def _watch(self, watching: Callable[[], None], *, rescan: bool) -> None:
        if self.mode == "events" and inotify_available():
            await self._watch_inotify(watching, rescan=rescan)
        else:
            await self._watch_watchfiles(watching)

    async def _watch_inotify(self, watching: Callable[[], None], *, rescan: bool) -> None:
        with TreeWatch(self._tb) as tree:
            self._tree = tree
            try:
                self._watcher_since = time.time()
                self._set_mode(self.mode)
                watching()
                if rescan:
                    self.request_scan()  # what came while it was down; re-adds folder watches
                while not self.stop.is_set():
                    for n, ev in enumerate(await tree.events(), 1):
                        if ev.overflow:
                            self._overflowed()
                        else:
                            await self._on_event(ev.rel, is_dir=ev.is_dir)
                        if n % _CHECKPOINT_EVERY == 0:
                            await anyio.lowlevel.checkpoint()
            finally:
                self._tree = None

    def _overflowed(self) -> None:
        """The kernel dropped events: a full scan finds those files (not counted as missed)."""
        self.metrics.watcher_overflows.inc()
        self.intake.misses_unknown_before = time.time()
        log.warning(
            "inotify queue overflowed; scanning for the files it lost",
            extra={"hint": "raise fs.inotify.max_queued_events if this repeats"},
        )
        self.request_scan()

    def _watch_folder(self, rel: bytes) -> None:
        """Watch a subfolder a scan (in its thread) or an event found, before it is listed."""
        tree = self._tree
        if tree is None:
            return
        try:
            tree.add(rel)
        except WatchLimitReached as e:
            if self._watch_error is None:
                self._watch_error = e  # the event loop stops the watcher: _raise_watch_error
        except (OSError, ValueError):
            pass  # unreadable (scans report it), or the watcher stopped meanwhile

    def _raise_watch_error(self) -> None:
        """Stop the watcher (it restarts with backoff) when a folder could not be watched."""
        if self._watch_error is not None and self._watch_scope is not None:
            self._watch_scope.cancel()

    async def _watch_watchfiles(self, watching: Callable[[], None]) -> None:
        from watchfiles import Change, awatch

        self._watcher_since = time.time()
        watching()
        first = True
        async for changes in awatch(
            self.transfer,
            watch_filter=None,  # the router decides, exactly as for scans
            debounce=self.settings.debounce_ms,
            step=min(50, self.settings.debounce_ms),
            stop_event=self.stop,
            raise_interrupt=False,
            force_polling=self.mode == "poll",
            recursive=True,
            yield_on_timeout=True,
            rust_timeout=5000,
        ):
            if first:
                # The watcher is running now: a scan catches what arrived while it was
                # down or starting (the restart backoff), without waiting a whole interval.
                self._set_mode(self.mode)
                self.request_scan()
                first = False
            for change, path in changes:
                if change == Change.deleted:
                    continue
                full = os.fsencode(path)
                if full.startswith(self._tb + b"/"):
                    await self._on_event(full[len(self._tb) + 1 :], is_dir=None)

    async def _on_event(self, rel: bytes, *, is_dir: bool | None) -> None:
        """A watcher saw `rel` appear (`is_dir` None: it does not say what it is)."""
        if not is_dir:
            try:
                st = os.lstat(self._tb + b"/" + rel)
            except OSError:
                return  # gone already: a late event for a file claimed meanwhile
            is_dir = stat.S_ISDIR(st.st_mode)
        c = self.router.classify(rel, is_dir=is_dir)
        if is_dir and c.kind != "candidate":
            if not self.router.prune_dir(rel.rsplit(b"/", 1)[-1]):
                # Watch it, then scan it: files written before the watch are found.
                self._watch_folder(rel)
                self._raise_watch_error()
                self.request_scan(rel)
            return
        if c.kind == "candidate" and c.route is not None:
            self.readiness.written(rel)  # closed after writing, or renamed in
            await self._look_again(c.route, rel)
            if self.readiness.take_sooner():
                self._look_sooner()
        elif c.kind == "companion" and c.route is not None:
            self.request_scan()  # a marker or checksum arrived: its file may be ready now

    def _set_mode(self, mode: str) -> None:
        for m in ("events", "poll", "scan"):
            self.metrics.watcher_mode.labels(m).set(1 if m == mode else 0)
