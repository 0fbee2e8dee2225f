"""How far long work on one job has come: archiving a large source, or sending it on.

The process doing the work (the archive worker is a process of its own, the
delivery runs in the service) writes a small JSON file per job and stage into
`<state>/progress/`, at most once a second, and removes it when the work ends.
`filedock status` and `show`, the service's progress log line and its metric read
them back: no other channel reaches from the worker to a command run elsewhere.
A file not rewritten for `STALE_S` is what a killed process left, and is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["LONG_BYTES", "STALE_S", "Progress", "progress_dir", "read_progress"]

# Work on a file this large is reported; smaller jobs end before anyone would look.
LONG_BYTES = 64 << 20
STALE_S = 60.0


def progress_dir(state: Path) -> Path:
    return state / "progress"


class Progress:
    """The progress of one job's stage (`archive`, `deliver:<sink>`): `add` the bytes
    done as they are; the file is written when a second has passed since the last."""

    def __init__(
        self,
        folder: Path,
        job_id: str,
        route: str,
        stage: str,
        total: int,
        *,
        every_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = folder / f"{job_id}.{stage.replace('/', '_')}.json"
        self.doc: dict[str, Any] = {
            "job_id": job_id,
            "route": route,
            "stage": stage,
            "done": 0,
            "total": total,
            "started_at": clock(),
            "updated_at": clock(),
        }
        self._every_s, self._clock = every_s, clock
        self._next = self.doc["started_at"]
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, n: int) -> None:
        self.doc["done"] += n
        now = self._clock()
        if now >= self._next:
            self._next = now + self._every_s
            self.doc["updated_at"] = now
            self._write()

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(json.dumps(self.doc))
            os.replace(tmp, self.path)
        except OSError:
            pass  # progress is a courtesy: the work goes on without it


def read_progress(folder: Path, *, now: float | None = None) -> list[dict[str, Any]]:
    """The progress files of work going on, oldest start first."""
    now = time.time() if now is None else now
    out = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue
        try:
            doc = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue  # removed meanwhile, or not ours
        if isinstance(doc, dict) and now - float(doc.get("updated_at", 0)) < STALE_S:
            out.append(doc)
    return sorted(out, key=lambda d: (d.get("started_at", 0), d.get("job_id", "")))
