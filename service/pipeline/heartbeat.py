"""The heartbeat: this instance's row in `replicas` and the leases of its jobs are
written every third of `lease_s`, so that no other replica takes its jobs while it
lives, and `/readyz` says so when it cannot write them.

It also tells whether this process may judge the others by their silence (`steady`):
only once it has written every beat in time for `lease_s`. When the ledger was away
for everyone, the other replicas' heartbeats are as old as this one's, and they are
alive; by the time this one has beaten steadily for `lease_s`, a live one has too.
"""

from __future__ import annotations

import logging
import time

import anyio

from service.face.metrics import Metrics
from service.ledger import Ledger
from service.ledger.base import ReplicaRecord
from service.pipeline.streams import shielded
from service.settings import Settings

__all__ = ["Heartbeat"]

log = logging.getLogger("filedock.pipeline")


class Heartbeat:
    """Beats for `replica` (registered at start, which counts as its first beat)."""

    def __init__(
        self, settings: Settings, ledger: Ledger, metrics: Metrics, replica: ReplicaRecord
    ) -> None:
        self.settings, self.ledger, self.metrics = settings, ledger, metrics
        self.replica = replica
        self.written_at = replica.heartbeat_at  # the last beat that was written
        self.error: str | None = None  # why the last beat failed, while it did
        # Since when every beat has been written in time (registering was the first).
        self.steady_since: float | None = replica.heartbeat_at
        self._stale = False  # the last beat waited for the ledger

    async def run(self) -> None:
        """Beat every third of `lease_s`; once more at once after a beat that waited for
        the ledger (the time it wrote is old by the time it is written)."""
        while True:
            await anyio.sleep(self.settings.lease_s / 3)
            await self.beat()
            if self._stale:
                await self.beat()

    async def beat(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        interval = self.settings.lease_s / 3
        started = time.monotonic()
        self.replica.heartbeat_at = now
        try:
            await shielded(self.ledger.replica_heartbeat(self.replica))
            await shielded(
                self.ledger.renew_leases(self.replica.instance, now + self.settings.lease_s)
            )
        except Exception as e:
            self.error = repr(e)[:300]
            self.steady_since, self._stale = None, False
            self.metrics.ledger_errors.inc()
            log.error("could not write the heartbeat and job leases", extra={"error": self.error})
            return
        took = time.monotonic() - started
        self._stale = took > interval / 2
        if self.steady_since is None or self._stale or now - self.written_at > 1.5 * interval:
            self.steady_since = now + took  # a gap: the ledger may have been away meanwhile
        self.written_at, self.error = now, None

    def steady(self, now: float | None = None) -> bool:
        """Whether every beat of the last `lease_s` was written in time."""
        now = time.time() if now is None else now
        since = self.steady_since
        return since is not None and now - since >= self.settings.lease_s

    def problem(self, now: float | None = None) -> str | None:
        """Why this instance's heartbeat is not current (for `/readyz`), or None."""
        now = time.time() if now is None else now
        age = now - self.written_at
        if self.error is None and age <= self.settings.lease_s:
            return None
        reason = f"last written {age:.0f} s ago"
        if self.error is not None:
            reason += f", error {self.error}"
        elif age > self.settings.lease_s:
            reason += f", over lease_s ({self.settings.lease_s:g} s)"
        return reason
