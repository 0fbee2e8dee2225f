"""When a routed file is complete, per route: `rename`, `stable` or `marker`.

- `rename`: the final name appearing is the signal (temp names are ignored).
- `stable`: size and mtime unchanged across two looks at least `settle_s` apart,
  for uploaders that write in place.
- `marker`: `<name><marker_suffix>` exists beside the file.
- `checksum_sidecar`: additionally, when the route asks for it, `<name>.sha256`
  must exist; the claim then checks the content against it.

Whatever the mode, a file that some process still has open for writing is never
claimed (`writers.py`): the claim checks, and a file it finds open waits here (`busy`)
until it is closed, announced by the watcher or looked at again after a backoff.

A file that may become ready at a known time (a stable file at the end of its
settle, a busy file at its next look) is due then: `take_due` hands it to discovery,
which looks at that one file rather than waiting for the next periodic scan.

Temp files (ignored names) that stop growing for `stalled_after_s` are reported
as stalled uploads: an upstream that died mid-upload becomes visible.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.face.logs import job_fields
from service.settings import Route

__all__ = ["BUSY_REASON", "Readiness", "Waiting"]

log = logging.getLogger("filedock.readiness")
_TRACK_CAP = 100_000
_BUSY_FIRST_S = 1.0  # a file found open for writing is looked at again after this,
_BUSY_MAX_S = 8.0  # doubling up to this (a watcher's close event comes sooner)
BUSY_REASON = "open for writing by another process: an upload in progress"


@dataclass
class _Look:
    size: int
    mtime_ns: int
    since: float
    reported: bool = False


@dataclass
class _Busy:
    until: float
    tries: int


@dataclass(frozen=True)
class Waiting:
    rel: bytes
    route: str
    reason: str


class Readiness:
    """What each routed file waits for, and when a waiting file is due a look.

    `why_not_ready` runs in scans' worker threads and on the event loop: the due
    times are kept under a lock. `notify` (set by discovery) is called on the event
    loop when a file becomes due sooner than anything before it.
    """

    def __init__(self, transfer: Path) -> None:
        self._tb = os.fsencode(transfer)
        self._settling: dict[bytes, _Look] = {}
        self._temps: dict[bytes, _Look] = {}
        self._busy: dict[bytes, _Busy] = {}
        self._lock = threading.Lock()
        self._due: list[tuple[float, bytes, str]] = []  # (monotonic time, path, route)
        self._due_at: dict[bytes, float] = {}
        self._sooner = False  # a file became due before all others since `take_sooner`
        self.notify: Callable[[], None] = lambda: None

    def _stat(self, rel: bytes, entry: os.DirEntry[bytes] | None) -> os.stat_result | None:
        try:
            if entry is not None:
                return entry.stat(follow_symlinks=False)
            return os.lstat(self._tb + b"/" + rel)
        except OSError:
            return None

    def _exists(self, rel: bytes) -> bool:
        return os.path.lexists(self._tb + b"/" + rel)

    def why_not_ready(
        self, route: Route, rel: bytes, entry: os.DirEntry[bytes] | None
    ) -> str | None:
        """None when the file is ready; otherwise what it waits for."""
        if route.readiness == "marker" and not self._exists(rel + route.marker_suffix.encode()):
            return f"waiting for its marker {route.marker_suffix}"
        if route.checksum_sidecar and not self._exists(rel + b".sha256"):
            return "waiting for its .sha256 checksum file"
        if route.readiness == "stable":
            reason = self._settling_reason(route, rel, entry)
            if reason is not None:
                return reason
        busy = self._busy.get(rel)
        if busy is not None and time.monotonic() < busy.until:
            return BUSY_REASON
        return None

    def is_ready(self, route: Route, rel: bytes, entry: os.DirEntry[bytes] | None) -> bool:
        return self.why_not_ready(route, rel, entry) is None

    def _settling_reason(
        self, route: Route, rel: bytes, entry: os.DirEntry[bytes] | None
    ) -> str | None:
        st = self._stat(rel, entry)
        if st is None:
            self._settling.pop(rel, None)
            return "gone"
        now = time.monotonic()
        look = self._settling.get(rel)
        if look is None or (look.size, look.mtime_ns) != (st.st_size, st.st_mtime_ns):
            if len(self._settling) < _TRACK_CAP:
                self._settling[rel] = _Look(st.st_size, st.st_mtime_ns, now)
                self._schedule(route, rel, now + route.settle_s)
            return f"settling: size or mtime changed less than {route.settle_s:g}s ago"
        if now - look.since >= route.settle_s:
            del self._settling[rel]
            return None
        self._schedule(route, rel, look.since + route.settle_s)
        return f"settling: unchanged for {now - look.since:.1f}s of {route.settle_s:g}s"

    def busy(self, route: Route, rel: bytes) -> None:
        """The claim found the file open for writing: it waits, and is due again after a
        backoff (sooner when the watcher sees it closed: `written`). Event loop only."""
        old = self._busy.get(rel)
        tries = old.tries + 1 if old else 1
        delay = min(_BUSY_MAX_S, _BUSY_FIRST_S * 2 ** (tries - 1))
        if old is None and len(self._busy) >= _TRACK_CAP:
            return  # the next scan finds it, and the claim checks it again
        self._busy[rel] = _Busy(time.monotonic() + delay, tries)
        self._schedule(route, rel, time.monotonic() + delay)
        self.temp_file(route, rel, None)  # an upload in progress: reported if it stalls
        if self.take_sooner():
            self.notify()
        if tries == 1:
            log.info(
                "not claimed: " + BUSY_REASON,
                extra=job_fields(route=route.name, name=rel, state="writing"),
            )

    def written(self, rel: bytes) -> None:
        """The watcher saw the file closed after writing, or renamed in: look now."""
        self._busy.pop(rel, None)

    def _schedule(self, route: Route, rel: bytes, at: float) -> None:
        with self._lock:
            known = self._due_at.get(rel)
            if known is not None and known <= at:
                return
            self._due_at[rel] = at
            if not self._due or at < self._due[0][0]:
                self._sooner = True
            heapq.heappush(self._due, (at, rel, route.name))

    def take_sooner(self) -> bool:
        """Whether a file became due sooner than all others since the last call."""
        with self._lock:
            sooner, self._sooner = self._sooner, False
            return sooner

    def next_due(self) -> float | None:
        """The monotonic time the next waiting file is due a look, if any."""
        with self._lock:
            return self._due[0][0] if self._due else None

    def take_due(self, now: float) -> list[tuple[str, bytes]]:
        """The files due a look by `now`, as (route name, path)."""
        out: list[tuple[str, bytes]] = []
        with self._lock:
            while self._due and self._due[0][0] <= now:
                at, rel, route = heapq.heappop(self._due)
                if self._due_at.get(rel) == at:
                    del self._due_at[rel]
                    out.append((route, rel))
        return out

    def temp_file(self, route: Route, rel: bytes, entry: os.DirEntry[bytes] | None) -> None:
        """An upload in progress was seen (a temp name, or a file open for writing):
        report it once if it stopped growing (a stalled upload)."""
        st = self._stat(rel, entry)
        if st is None:
            return
        look = self._temps.get(rel)
        now = time.monotonic()
        if look is None or (look.size, look.mtime_ns) != (st.st_size, st.st_mtime_ns):
            if len(self._temps) < _TRACK_CAP:
                self._temps[rel] = _Look(st.st_size, st.st_mtime_ns, now)
            return
        stalled_for = max(now - look.since, time.time() - st.st_mtime)
        if not look.reported and stalled_for >= route.stalled_after_s:
            look.reported = True
            log.warning(
                "upload stalled: a file being uploaded stopped growing",
                extra=job_fields(route=route.name, name=rel, size=st.st_size, state="stalled"),
            )

    def stalled_count(self) -> int:
        """Stalled uploads still present; forgets temp files that are gone."""
        for rel in [r for r in self._temps if not self._exists(r)]:
            del self._temps[rel]
        for rel in [r for r in self._settling if not self._exists(r)]:
            del self._settling[rel]
        for rel in [r for r in self._busy if not self._exists(r)]:
            del self._busy[rel]
        return sum(1 for look in self._temps.values() if look.reported)
