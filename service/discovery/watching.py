"""The watcher: inotify (or watchfiles) on `transfer/`, supervised, turning events into
hints for discovery.

Events only cut latency; scans are the truth. When the watcher dies (the inotify watch
or instance limit is reached, the watched folder is removed; under watchfiles also a
non-UTF-8 name) it is logged, counted, the mode gauge shows `scan`, a full scan runs at
once and the watcher restarts with backoff (1 s to 60 s) while scans carry on.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from service.discovery.inotify import TreeWatch, WatchLimitReached, inotify_available

if TYPE_CHECKING:
    from service.discovery.watcher import Discovery

__all__ = ["Watching"]

log = logging.getLogger("filedock.watcher")

_CHECKPOINT_EVERY = 512  # watcher events handled between two yields to the loop


class Watching:
    """The watcher of one `Discovery`: `since` is when it started watching (None while
    it is down), for judging which files it should have reported."""

    def __init__(self, discovery: Discovery) -> None:
        self._d = discovery
        self.since: float | None = None
        self._tree: TreeWatch | None = None  # inotify, while the watcher runs on it
        self._scope: anyio.CancelScope | None = None
        self._error: Exception | None = None

    async def supervise(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the watcher; when it dies, log, count, rescan at once and restart with backoff."""
        backoff, first = 1.0, True

        def watching() -> None:
            nonlocal first
            if first:
                first = False
                task_status.started()

        while not self._d.stop.is_set():
            started = time.monotonic()
            self._error = None
            try:
                with anyio.CancelScope() as self._scope:
                    await self._watch(watching, rescan=not first)
                if self._error is not None:
                    raise self._error
            except Exception as e:
                self._d.metrics.watcher_restarts.inc()
                self._set_mode("scan")
                log.error(
                    "file watcher died; scanning until it restarts",
                    extra={"error": str(e)[:500] or repr(e), "retry_in_s": backoff},
                )
            else:
                if self._d.stop.is_set():
                    return
                self._d.metrics.watcher_restarts.inc()
                log.warning("file watcher stopped; restarting", extra={"retry_in_s": backoff})
            finally:
                self._scope = None
            watching()
            self.since = None
            self._d.request_scan()
            if time.monotonic() - started > 60:
                backoff = 1.0
            with anyio.move_on_after(backoff):
                await self._d.stop.wait()
            backoff = min(backoff * 2, 60.0)

    async def _watch(self, watching: Callable[[], None], *, rescan: bool) -> None:
        if self._d.mode == "events" and inotify_available():
            await self._watch_inotify(watching, rescan=rescan)
        else:
            await self._watch_watchfiles(watching)

    async def _watch_inotify(self, watching: Callable[[], None], *, rescan: bool) -> None:
        with TreeWatch(self._d._tb) as tree:
            self._tree = tree
            try:
                self.since = time.time()
                self._set_mode(self._d.mode)
                watching()
                if rescan:
                    self._d.request_scan()  # what came while it was down; re-adds folder watches
                while not self._d.stop.is_set():
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
        self._d.metrics.watcher_overflows.inc()
        self._d.intake.misses_unknown_before = time.time()
        log.warning(
            "inotify queue overflowed; scanning for the files it lost",
            extra={"hint": "raise fs.inotify.max_queued_events if this repeats"},
        )
        self._d.request_scan()

    def watch_folder(self, rel: bytes) -> None:
        """Watch a subfolder a scan (in its thread) or an event found, before it is listed."""
        tree = self._tree
        if tree is None:
            return
        try:
            tree.add(rel)
        except WatchLimitReached as e:
            if self._error is None:
                self._error = e  # the event loop stops the watcher: raise_watch_error
        except (OSError, ValueError):
            pass  # unreadable (scans report it), or the watcher stopped meanwhile

    def raise_watch_error(self) -> None:
        """Stop the watcher (it restarts with backoff) when a folder could not be watched."""
        if self._error is not None and self._scope is not None:
            self._scope.cancel()

    async def _watch_watchfiles(self, watching: Callable[[], None]) -> None:
        from watchfiles import Change, awatch

        self.since = time.time()
        watching()
        first = True
        async for changes in awatch(
            self._d.transfer,
            watch_filter=None,  # the router decides, exactly as for scans
            debounce=self._d.settings.debounce_ms,
            step=min(50, self._d.settings.debounce_ms),
            stop_event=self._d.stop,
            raise_interrupt=False,
            force_polling=self._d.mode == "poll",
            recursive=True,
            yield_on_timeout=True,
            rust_timeout=5000,
        ):
            if first:
                # The watcher is running now: a scan catches what arrived while it was
                # down or starting (the restart backoff), without waiting a whole interval.
                self._set_mode(self._d.mode)
                self._d.request_scan()
                first = False
            for change, path in changes:
                if change == Change.deleted:
                    continue
                full = os.fsencode(path)
                if full.startswith(self._d._tb + b"/"):
                    await self._on_event(full[len(self._d._tb) + 1 :], is_dir=None)

    async def _on_event(self, rel: bytes, *, is_dir: bool | None) -> None:
        """A watcher saw `rel` appear (`is_dir` None: it does not say what it is)."""
        if not is_dir:
            try:
                st = os.lstat(self._d._tb + b"/" + rel)
            except OSError:
                return  # gone already: a late event for a file claimed meanwhile
            is_dir = stat.S_ISDIR(st.st_mode)
        c = self._d.router.classify(rel, is_dir=is_dir)
        if is_dir and c.kind != "candidate":
            if not self._d.router.prune_dir(rel.rsplit(b"/", 1)[-1]):
                # Watch it, then scan it: files written before the watch are found.
                self.watch_folder(rel)
                self.raise_watch_error()
                self._d.request_scan(rel)
            return
        if c.kind == "candidate" and c.route is not None:
            self._d.readiness.written(rel)  # closed after writing, or renamed in
            await self._d.look_again(c.route, rel)
            if self._d.readiness.take_sooner():
                self._d.look_sooner()
        elif c.kind == "companion" and c.route is not None:
            self._d.request_scan()  # a marker or checksum arrived: its file may be ready now

    def _set_mode(self, mode: str) -> None:
        for m in ("events", "poll", "scan"):
            self._d.metrics.watcher_mode.labels(m).set(1 if m == mode else 0)
