"""The gauges read from the state of things rather than set where it changes: readiness,
free space per folder, the backlogs, the oldest waiting file, each sink's deliveries not
done yet, the paused sinks and the outbox, every few seconds."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import anyio

from service.discovery.watcher import Discovery
from service.face.http import Health
from service.face.metrics import Metrics
from service.ledger import UNFINISHED, Ledger
from service.notify.dispatcher import show_backlog
from service.pipeline import Pipeline
from service.settings import Settings

__all__ = ["Gauges"]


class Gauges:
    def __init__(self, settings: Settings, metrics: Metrics, folders: Sequence[str]) -> None:
        self.settings, self.metrics, self.folders = settings, metrics, folders

    async def run(
        self,
        pipeline: Pipeline,
        discovery: Discovery,
        ledger: Ledger,
        health: Health,
    ) -> None:
        """Readiness, folder backlogs, oldest waiting file, free space: every few seconds."""
        s, m = self.settings, self.metrics
        while True:
            await health.ready()  # keeps filedock_ready current without a prober
            for name in self.folders:
                try:
                    st = os.statvfs(s.folder(name))
                except OSError:
                    continue
                m.filesystem_free.labels(name).set(st.f_bavail * st.f_frsize)
                m.filesystem_size.labels(name).set(st.f_blocks * st.f_frsize)
            try:
                counts = await ledger.counts()
            except Exception:
                m.ledger_errors.inc()
                counts = {}
            now = time.time()
            waiting_jobs = sum(counts.get(st, 0) for st in UNFINISHED)
            await self._delivery_backlog(ledger, now)
            m.backlog_files.labels("transfer").set(discovery.backlog_files)
            m.backlog_bytes.labels("transfer").set(discovery.backlog_bytes)
            m.backlog_files.labels("proc").set(waiting_jobs)
            m.backlog_files.labels("failed").set(counts.get("failed", 0))
            oldest = min(
                [discovery.oldest_mtime or now]
                + [j.record.detected_at for j in pipeline.in_flight.jobs.values()]
            )
            m.oldest_waiting_age.set(max(0.0, now - oldest))
            pipeline.delivery.show_paused()
            try:
                await show_backlog(ledger, m, [ch.name for ch in s.notify])
            except Exception:
                m.ledger_errors.inc()
            await anyio.sleep(5.0)

    async def _delivery_backlog(self, ledger: Ledger, now: float) -> None:
        """Per sink: deliveries not done yet and the age of the oldest, from the ledger
        (so every replica shows the whole backlog)."""
        try:
            backlog = await ledger.delivery_backlog()
        except Exception:
            self.metrics.ledger_errors.inc()
            return
        found = {(route, sink): (n, oldest) for route, sink, n, oldest in backlog}
        for route in self.settings.routes:
            for sink in route.deliver:
                n, oldest = found.get((route.name, sink.name), (0, None))
                self.metrics.deliveries_waiting.labels(route.name, sink.name).set(n)
                age = max(0.0, now - oldest) if oldest is not None else 0.0
                self.metrics.oldest_delivery_age.labels(route.name, sink.name).set(age)
