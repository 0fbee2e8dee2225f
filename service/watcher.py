"""Discovery: find ready files in `transfer/` and queue them, bounded, per route.

Scans are the truth and events only cut latency: the kernel's inotify queue
overflows under a burst, a new subfolder's first files can come before its watch,
and watchfiles (used for `poll`, and for `events` where there is no inotify) loses
events and dies on a non-UTF-8 name (RELIABILITY.md). So a full scan runs at
start, every `scan_interval_s`, after each watcher restart or overflow, and a
subfolder is scanned when it appears. A scan walks the tree lazily and waits when
a route's queue is full: a backlog stays on disk, and memory does not grow with it.

A periodic scan does not list a folder again when listing it could not tell
anything new: its last listing found only unrouted files and subfolders (nothing
to queue, nothing whose readiness or stall depends on time), and the folder's
inode, mtime and ctime are the ones stat saw before that listing. The kernel
changes them with every entry created, renamed in or out, or removed, whatever
the watcher saw; on network filesystems, where they may be stale, every scan lists.
Scans after a watcher restart, an overflow or a dropped hint list everything.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from service.fsutil import filesystem_type, is_network_filesystem
from service.inotify import TreeWatch, WatchLimitReached, inotify_available
from service.intake import Intake
from service.logs import job_fields
from service.metrics import Metrics
from service.readiness import Readiness
from service.routes import Router
from service.settings import Route, Settings

__all__ = ["Discovery", "detect_watch_mode"]

log = logging.getLogger("filedock.watcher")

_CHUNK = 1024
# (kind, route, relative path, stat of a routed file); kind "unchanged" names a folder
# whose last listing holds (see `_Listing`)
_Found = tuple[str, str | None, bytes, os.stat_result | None]
_REPORT_CAP = 10_000  # unrouted/stalled names remembered to report each once
_CHECKPOINT_EVERY = 512  # watcher events handled between two yields to the loop
# A folder changed this recently may change again within the same tick of its
# filesystem's clock (a jiffy; a second on ext4 with small inodes, two on FAT),
# unseen by its mtime and ctime: its listing is not reused.
_SETTLED_S = 2.0


@dataclass
class _ScanTally:
    """What a full scan saw: unrouted files, and routed files waiting (for the gauges)."""

    unrouted: int = 0
    files: int = 0
    size: int = 0
    oldest: float | None = None
    flagged: set[bytes] = field(default_factory=set)  # unrouted or orphaned, seen this scan
    unchanged: set[bytes] = field(default_factory=set)  # folders not listed again

    def add(self, st: os.stat_result) -> None:
        self.files += 1
        self.size += st.st_size
        self.oldest = st.st_mtime if self.oldest is None else min(self.oldest, st.st_mtime)


@dataclass(frozen=True, slots=True)
class _Listing:
    """A folder's last listing, when it found only unrouted files and subfolders."""

    key: tuple[int, int, int]  # the folder's (inode, mtime, ctime) before it was listed
    subdirs: tuple[bytes, ...]
    unrouted: int


def detect_watch_mode(
    path: Path, configured: str, *, mounts: str = "/proc/self/mounts"
) -> Literal["events", "poll", "scan"]:
    """`auto` picks `scan` on network filesystems (inotify sees no other node's writes)."""
    if configured != "auto":
        return configured  # type: ignore[return-value]
    fstype = filesystem_type(path, mounts=mounts)
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
        self._listings: dict[bytes, _Listing] = {}
        self._reuse_listings = not is_network_filesystem(filesystem_type(self.transfer))
        self._ordered = {r.name for r in settings.routes if r.order != "none"}
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
            with anyio.move_on_after(self._next_scan_delay()):
                await self._scan_now.wait()
                continue
            self._want_full = True

    def _next_scan_delay(self) -> float:
        delay = self.settings.scan_interval_s
        wake = self.readiness.next_check_in()
        return min(delay, wake) if wake is not None else delay

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
        walker = self._walk(subdir, reuse=periodic and self._reuse_listings, visited=visited)
        tally = _ScanTally()
        ordered: list[tuple[float, bytes, str]] = []  # (mtime, path, route): oldest first
        while True:
            chunk = await anyio.to_thread.run_sync(_take, walker, _CHUNK)
            self._raise_watch_error()
            found = self._sort_chunk(chunk, tally, ordered)
            for route, rel in found:
                await self._found(route, rel, from_watcher=False)
            if len(chunk) < _CHUNK or self.stop.is_set():
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
            for gone in self._listings.keys() - visited:
                del self._listings[gone]

    def _sort_chunk(
        self, chunk: list[_Found], tally: _ScanTally, ordered: list[tuple[float, bytes, str]]
    ) -> list[tuple[str, bytes]]:
        """Count a chunk of a scan; return the files to queue now (ordered lanes wait)."""
        found: list[tuple[str, bytes]] = []
        for kind, route, rel, st in chunk:
            if kind == "unchanged":
                tally.unchanged.add(rel)
                tally.unrouted += self._listings[rel].unrouted
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

    def _walk(self, subdir: bytes | None, *, reuse: bool, visited: set[bytes]) -> Iterator[_Found]:
        """Blocking: the routed entries below `subdir`, lazily (the caller pulls chunks).

        `reuse`: a folder whose last listing holds is yielded as "unchanged" instead.
        """
        stack = [subdir] if subdir else [b""]
        while stack:
            rel_dir = stack.pop()
            visited.add(rel_dir)
            path = self._tb + b"/" + rel_dir if rel_dir else self._tb
            listed_at = time.time()
            try:
                folder = os.stat(path)
            except OSError:
                continue
            key = (folder.st_ino, folder.st_mtime_ns, folder.st_ctime_ns)
            known = self._listings.pop(rel_dir, None)
            if reuse and known is not None and known.key == key:
                self._listings[rel_dir] = known
                stack.extend(known.subdirs)
                yield "unchanged", None, rel_dir, None
                continue
            try:
                it = os.scandir(path)
            except OSError:
                continue
            with it:
                subdirs, unrouted, settled = yield from self._list(rel_dir, it)
            stack.extend(subdirs)
            if settled and max(folder.st_mtime, folder.st_ctime) < listed_at - _SETTLED_S:
                self._listings[rel_dir] = _Listing(key, subdirs, unrouted)

    def _list(
        self, rel_dir: bytes, it: Iterator[os.DirEntry[bytes]]
    ) -> Generator[_Found, None, tuple[tuple[bytes, ...], int, bool]]:
        """One folder's entries. Returns its subfolders, its count of unrouted files, and
        whether it held nothing else: nothing to queue and nothing to look at again."""
        subdirs: list[bytes] = []
        unrouted, settled = 0, True
        for entry in it:
            rel = rel_dir + b"/" + entry.name if rel_dir else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                settled = False
                continue
            c = self.router.classify(rel, is_dir=is_dir)
            if is_dir and c.kind != "candidate":
                if not self.router.prune_dir(entry.name):
                    # Watched before it is listed: nothing falls between the two.
                    self._watch_folder(rel)
                    subdirs.append(rel)
                continue
            if c.kind == "unrouted" or (c.kind == "ignored" and c.route is None):
                unrouted += c.kind == "unrouted"
                yield c.kind, None, rel, None
                continue
            settled = False
            if c.kind == "ignored" and c.route is not None:
                self.readiness.temp_file(c.route, rel, entry)
            elif c.kind == "companion" and c.route is not None:
                if self._orphan_companion(c.route, rel, entry):
                    yield "orphan_companion", c.route.name, rel, None
            elif c.kind != "candidate" or c.route is None:
                yield c.kind, None, rel, None
            else:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                ready = self.readiness.is_ready(c.route, rel, entry)
                yield ("candidate" if ready else "waiting"), c.route.name, rel, st
        return tuple(subdirs), unrouted, settled

    def _orphan_companion(self, route: Route, rel: bytes, entry: os.DirEntry[bytes]) -> bool:
        """A marker or checksum whose file has not come for `stalled_after_s`."""
        if self.router.companion_has_file(route, rel, self._tb):
            return False
        try:
            age = time.time() - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            return False
        return age >= route.stalled_after_s

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
            if c.route.name in self._ordered:
                self.request_scan()  # an ordered lane takes files oldest first: scan
            elif self.readiness.is_ready(c.route, rel, None):
                await self._found(c.route.name, rel, from_watcher=True)
        elif c.kind == "companion" and c.route is not None:
            self.request_scan()  # a marker or checksum arrived: its file may be ready now

    def _set_mode(self, mode: str) -> None:
        for m in ("events", "poll", "scan"):
            self.metrics.watcher_mode.labels(m).set(1 if m == mode else 0)


def _take(it: Iterator[_Found], n: int) -> list[_Found]:
    out: list[_Found] = []
    for item in it:
        out.append(item)
        if len(out) >= n:
            break
    return out
