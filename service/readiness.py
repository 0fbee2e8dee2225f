"""When a routed file is complete, per route: `rename`, `stable` or `marker`.

- `rename`: the final name appearing is the signal (temp names are ignored).
- `stable`: size and mtime unchanged across two looks at least `settle_s` apart,
  for uploaders that write in place.
- `marker`: `<name><marker_suffix>` exists beside the file.
- `checksum_sidecar`: additionally, when the route asks for it, `<name>.sha256`
  must exist; the claim then checks the content against it.

Temp files (ignored names) that stop growing for `stalled_after_s` are reported
as stalled uploads: an upstream that died mid-upload becomes visible.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from service.logs import job_fields
from service.settings import Route

__all__ = ["Readiness", "Waiting"]

log = logging.getLogger("filedock.readiness")
_TRACK_CAP = 100_000


@dataclass
class _Look:
    size: int
    mtime_ns: int
    since: float
    reported: bool = False


@dataclass(frozen=True)
class Waiting:
    rel: bytes
    route: str
    reason: str


class Readiness:
    def __init__(self, transfer: Path) -> None:
        self._tb = os.fsencode(transfer)
        self._settling: dict[bytes, _Look] = {}
        self._temps: dict[bytes, _Look] = {}
        self._settle_deadline: float | None = None

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
            return self._settling_reason(route, rel, entry)
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
            self._wake_at(now + route.settle_s)
            return f"settling: size or mtime changed less than {route.settle_s:g}s ago"
        if now - look.since >= route.settle_s:
            del self._settling[rel]
            return None
        self._wake_at(look.since + route.settle_s)
        return f"settling: unchanged for {now - look.since:.1f}s of {route.settle_s:g}s"

    def _wake_at(self, t: float) -> None:
        if self._settle_deadline is None or t < self._settle_deadline:
            self._settle_deadline = t

    def next_check_in(self) -> float | None:
        """Seconds until a settling file may be ready (the scanner wakes up then)."""
        if self._settle_deadline is None:
            return None
        delay = max(0.05, self._settle_deadline - time.monotonic())
        self._settle_deadline = None
        return delay if self._settling else None

    def temp_file(self, route: Route, rel: bytes, entry: os.DirEntry[bytes] | None) -> None:
        """A temp name was seen: report it once if it stopped growing (a stalled upload)."""
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
                "upload stalled: a temporary file stopped growing",
                extra=job_fields(route=route.name, name=rel, size=st.st_size, state="stalled"),
            )

    def stalled_count(self) -> int:
        """Stalled uploads still present; forgets temp files that are gone."""
        for rel in [r for r in self._temps if not self._exists(r)]:
            del self._temps[rel]
        for rel in [r for r in self._settling if not self._exists(r)]:
            del self._settling[rel]
        return sum(1 for look in self._temps.values() if look.reported)

    def forget(self, rel: bytes) -> None:
        self._settling.pop(rel, None)
