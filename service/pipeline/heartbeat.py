"""The heartbeat: this instance's row in `replicas` and the leases of its jobs are
written every third of `lease_s`, so that no other replica takes its jobs while it
lives, and `/readyz` says so when it cannot write them."""

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

    async def run(self) -> None:
        """Beat every third of `lease_s`."""
        while True:
            await anyio.sleep(self.settings.lease_s / 3)
            await self.beat()

    async def beat(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.replica.heartbeat_at = now
        try:
            await shielded(self.ledger.replica_heartbeat(self.replica))
            await shielded(
                self.ledger.renew_leases(self.replica.instance, now + self.settings.lease_s)
            )
        except Exception as e:
            self.error = repr(e)[:300]
            self.metrics.ledger_errors.inc()
            log.error("could not write the heartbeat and job leases", extra={"error": self.error})
            return
        self.written_at, self.error = now, None

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
