"""The lease heartbeat: this replica's jobs keep their leases, so that no other replica
takes them over while this one lives."""

from __future__ import annotations

import logging
import time

import anyio

from service.face.metrics import Metrics
from service.ledger import Ledger
from service.pipeline.streams import shielded
from service.settings import Settings

__all__ = ["Heartbeat"]

log = logging.getLogger("filedock.pipeline")


class Heartbeat:
    def __init__(self, settings: Settings, ledger: Ledger, metrics: Metrics) -> None:
        self.settings, self.ledger, self.metrics = settings, ledger, metrics

    async def run(self) -> None:
        """Renew the leases every third of `lease_s`."""
        s = self.settings
        while True:
            await anyio.sleep(s.lease_s / 3)
            try:
                await shielded(self.ledger.renew_leases(s.replica_id, time.time() + s.lease_s))
            except Exception as e:
                self.metrics.ledger_errors.inc()
                log.error("could not renew job leases", extra={"error": repr(e)[:300]})
