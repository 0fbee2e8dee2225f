"""A scan's walk of `transfer/` (each folder's entries, classified, in a worker thread),
and its tally.

The walk is lazy (the scan pulls chunks of `CHUNK`), watches each subfolder before it
lists it (nothing falls between the two), and remembers listings that cannot change
without the folder showing it. A folder whose last listing found only unrouted files
and subfolders (nothing to queue, nothing whose readiness or stall depends on time)
is not listed again by a periodic scan while its inode, mtime and ctime are the ones
stat saw before that listing: the kernel changes them with every entry created,
renamed in or out, or removed, whether or not a watcher saw it, and `utime` cannot
set ctime back. On network filesystems, where they may be stale, the caller turns
listings off and every walk lists.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

from service.discovery.readiness import Readiness
from service.discovery.routes import Router
from service.settings import Route

__all__ = ["CHUNK", "SETTLED_S", "Found", "ScanTally", "TreeWalk", "take"]

CHUNK = 1024
# A folder changed this recently may change again within the same tick of its
# filesystem's clock (a jiffy; a second on ext4 with small inodes, two on FAT),
# unseen by its mtime and ctime: its listing is not reused.
SETTLED_S = 2.0
# (kind, route, relative path, stat of a routed file); kind "unchanged" names a folder
# whose last listing holds: `TreeWalk.unrouted_in` has its count of unrouted files.
Found = tuple[str, str | None, bytes, os.stat_result | None]


@dataclass
class ScanTally:
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


class TreeWalk:
    """Walks `transfer/` for scans; one walk at a time."""

    def __init__(
        self,
        transfer: bytes,
        router: Router,
        readiness: Readiness,
        watch_folder: Callable[[bytes], None],
        *,
        keep_listings: bool,
    ) -> None:
        self._tb = transfer
        self.router = router
        self.readiness = readiness
        self._watch_folder = watch_folder
        self._listings: dict[bytes, _Listing] = {}
        self._reuse = keep_listings

    def unrouted_in(self, rel_dir: bytes) -> int:
        return self._listings[rel_dir].unrouted

    def forget_except(self, visited: set[bytes]) -> None:
        """After a full walk: drop the listings of folders that are gone."""
        for gone in self._listings.keys() - visited:
            del self._listings[gone]

    def walk(self, subdir: bytes | None, *, reuse: bool, visited: set[bytes]) -> Iterator[Found]:
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
            if reuse and self._reuse and known is not None and known.key == key:
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
            if settled and max(folder.st_mtime, folder.st_ctime) < listed_at - SETTLED_S:
                self._listings[rel_dir] = _Listing(key, subdirs, unrouted)

    def _list(
        self, rel_dir: bytes, it: Iterator[os.DirEntry[bytes]]
    ) -> Generator[Found, None, tuple[tuple[bytes, ...], int, bool]]:
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


def take(it: Iterator[Found], n: int) -> list[Found]:
    """Up to `n` items of a walk (in the worker thread that runs it)."""
    out: list[Found] = []
    for item in it:
        out.append(item)
        if len(out) >= n:
            break
    return out
