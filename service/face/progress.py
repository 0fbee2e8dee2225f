"""Long work told while it runs: a log line every `every_s` for each job of this
process whose archive or delivery has run that long, and the bytes done and to do as
metrics.

The work itself writes its progress into files (`storage/progress.py`), because the
archive runs in a worker process; this reads them back in the service.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from service.face.logs import job_fields
from service.face.metrics import Metrics
from service.storage.progress import read_progress

__all__ = ["ProgressReporter", "describe"]

log = logging.getLogger("filedock.progress")


def describe(doc: dict[str, Any], now: float) -> str:
    """`archive: 3.2 of 20.0 GiB (16 %), 41 s` for people."""
    done, total = int(doc.get("done", 0)), int(doc.get("total", 0)) or 1
    elapsed = now - float(doc.get("started_at", now))
    return (
        f"{doc.get('stage')}: {_gib(done)} of {_gib(total)} ({100 * done // total} %),"
        f" {elapsed:.0f} s"
    )


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


class ProgressReporter:
    """Reads the progress files every `every_s`: logs this process's long jobs (`mine`
    tells a job it holds) and sets the gauges per route and stage."""

    def __init__(
        self,
        folder: Path,
        metrics: Metrics,
        mine: Callable[[str], bool],
        *,
        every_s: float = 10.0,
    ) -> None:
        self.folder, self.metrics, self.mine, self.every_s = folder, metrics, mine, every_s
        self._shown: set[tuple[str, str]] = set()

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.every_s)
            docs = await anyio.to_thread.run_sync(read_progress, self.folder)
            self.report(docs, time.time())

    def report(self, docs: list[dict[str, Any]], now: float) -> None:
        ours = [d for d in docs if self.mine(str(d.get("job_id")))]
        sums: dict[tuple[str, str], list[int]] = {}
        for d in ours:
            key = (str(d.get("route")), str(d.get("stage")))
            done_total = sums.setdefault(key, [0, 0])
            done_total[0] += int(d.get("done", 0))
            done_total[1] += int(d.get("total", 0))
            if now - float(d.get("started_at", now)) >= self.every_s:
                log.info(
                    describe(d, now),
                    extra=job_fields(str(d.get("job_id")), route=key[0], stage=key[1]),
                )
        for key in self._shown - sums.keys():  # ended since the last look
            self.metrics.progress_done.labels(*key).set(0)
            self.metrics.progress_total.labels(*key).set(0)
        for key, (done, total) in sums.items():
            self.metrics.progress_done.labels(*key).set(done)
            self.metrics.progress_total.labels(*key).set(total)
        self._shown = set(sums)
