"""An inotify reader for `transfer/` and its subfolders, driven by the event loop.

watchfiles wakes every `step` ms to poll its Rust thread, holds changes for
`debounce_ms`, walks the whole tree with the GIL held when it starts (seconds for a
million files) and dies on a name that is not UTF-8. This reads the inotify file
descriptor when the loop sees it readable: an event reaches the intake within
microseconds, nothing wakes while `transfer/` is quiet, names stay bytes, and the
kernel's queue overflow is reported instead of dropped.

Each folder needs its own watch (inotify is not recursive). `Discovery` adds one for
every folder a scan walks and for every folder an event announces, then scans that
folder: files written before its watch existed are found by that scan.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from dataclasses import dataclass

import anyio
from inotify_simple import INotify, flags

__all__ = ["TreeWatch", "WatchEvent", "WatchLimitReached", "inotify_available"]

# A file is complete when renamed in (`rename` readiness) or closed after writing
# (written in place); folders announce themselves by CREATE or MOVED_TO. MOVED_FROM
# of a folder drops its (now stale) watches. Symlinked folders are not followed, as
# scans do not follow them.
_MASK = (
    flags.MOVED_TO
    | flags.CLOSE_WRITE
    | flags.CREATE
    | flags.MOVED_FROM
    | flags.ONLYDIR
    | flags.DONT_FOLLOW
    | flags.EXCL_UNLINK
)


class WatchLimitReached(OSError):
    """The user's inotify watch limit (or instance limit) is exhausted."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    rel: bytes  # relative to the watched root
    is_dir: bool
    overflow: bool = False  # the kernel dropped events: only a full scan can tell which


_Events = list[WatchEvent]


def inotify_available() -> bool:
    """Linux: the kernel's inotify serves `events` mode (elsewhere, watchfiles does)."""
    return sys.platform.startswith("linux")


class TreeWatch:
    """Watches a folder and the subfolders added with `add`; `events()` yields batches.

    `add` may be called from a scan's worker thread while the event loop reads events:
    the folder maps are changed under a lock.
    """

    def __init__(self, root: bytes) -> None:
        self._root = root
        self._lock = threading.Lock()
        try:
            self._ino = INotify(nonblocking=True)
        except OSError as e:
            if e.errno == errno.EMFILE:
                raise WatchLimitReached(
                    e.errno, "inotify instance limit reached (fs.inotify.max_user_instances)"
                ) from e
            raise
        self._rel: dict[int, bytes] = {}  # watch descriptor -> folder relative to root
        self._wd: dict[bytes, int] = {}
        try:
            self._root_wd = self._add_watch(b"")
        except BaseException:
            self._ino.close()
            raise

    def close(self) -> None:
        self._ino.close()

    def __enter__(self) -> TreeWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def watched(self) -> int:
        return len(self._wd)

    def add(self, rel: bytes) -> None:
        """Watch a subfolder (relative to the root). Raises `WatchLimitReached`."""
        if rel not in self._wd:
            with self._lock:
                self._add_watch(rel)

    def _add_watch(self, rel: bytes) -> int:
        path = self._root + b"/" + rel if rel else self._root
        # The root itself may be a symlink (a mounted volume); subfolders never are.
        mask = _MASK if rel else _MASK & ~flags.DONT_FOLLOW
        try:
            wd: int = self._ino.add_watch(path, mask)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise WatchLimitReached(
                    e.errno, "inotify watch limit reached (fs.inotify.max_user_watches)"
                ) from e
            if e.errno in (errno.ENOENT, errno.ENOTDIR) and rel:
                return -1  # gone, or replaced by a file, before we got to it
            raise
        old = self._rel.get(wd)
        if old is not None:  # the same folder under a new name (moved within the tree)
            self._wd.pop(old, None)
        self._rel[wd], self._wd[rel] = rel, wd
        return wd

    def _forget(self, prefix: bytes) -> None:
        """Drop the watches of a folder that moved away, and of everything below it."""
        below = prefix + b"/"
        for rel in [r for r in self._wd if r == prefix or r.startswith(below)]:
            wd = self._wd.pop(rel)
            del self._rel[wd]
            try:
                self._ino.rm_watch(wd)
            except OSError:
                pass  # already gone with its folder

    async def events(self) -> _Events:
        """Wait until the kernel has events, then return them all (never an empty batch)."""
        while True:
            await anyio.wait_readable(self._ino.fileno())
            batch = self._read()
            if batch:
                return batch

    def _read(self) -> _Events:
        out: _Events = []
        for ev in self._ino.read(timeout=0):
            mask = ev.mask
            if mask & flags.Q_OVERFLOW:
                out.append(WatchEvent(b"", is_dir=True, overflow=True))
                continue
            if mask & flags.IGNORED:  # the watch ended: its folder was removed
                if ev.wd == self._root_wd:
                    raise OSError(errno.ENOENT, "the watched folder was removed or moved")
                with self._lock:
                    rel = self._rel.pop(ev.wd, None)
                    if rel is not None and self._wd.get(rel) == ev.wd:
                        del self._wd[rel]
                continue
            parent = self._rel.get(ev.wd)
            if parent is None:
                continue  # a late event of a watch already dropped
            name = os.fsencode(ev.name)
            rel = parent + b"/" + name if parent else name
            is_dir = bool(mask & flags.ISDIR)
            if mask & flags.MOVED_FROM:
                if is_dir:
                    with self._lock:
                        self._forget(rel)
                continue
            if mask & flags.CREATE and not is_dir:
                continue  # a file being written: its CLOSE_WRITE (or rename) follows
            out.append(WatchEvent(rel, is_dir))
        return out
