"""The ledger at start: opened, this instance registered and start-up recovery run,
each tried again while the ledger is unavailable.

A service (`run`) waits for its ledger rather than exiting: a database restarted
together with the service, or one that refuses connections for a while, needs no
operator, and a process that waits keeps answering `/healthz` (alive) and `/readyz`
(503, naming the ledger and the server's words) where an exit would be restarted
with a growing backoff and say less. It logs why at once and every 30 s while it
waits. `run --once` is a batch command: it refuses to start (exit 2, one line).

What is waited for is an unavailable ledger (`LedgerUnavailable`, or a failure the
backend counted as one in `Ledger.reach`); any other error ends the start as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from service.errors import LedgerUnavailable, StartupError
from service.face.metrics import Metrics
from service.ledger import Ledger
from service.ledger.base import ReplicaRecord
from service.ledger.reach import one_line
from service.upkeep.recovery import Recovery, RecoveryReport
from service.upkeep.replicas import register

__all__ = ["LedgerWait"]

log = logging.getLogger("filedock.app")
T = TypeVar("T")
_FIRST_S, _MAX_S = 1.0, 5.0  # between tries: doubling from the first, up to the last
_LOG_EVERY_S = 30.0


class LedgerWait:
    """Start-up steps that need the ledger, for one process.

    Args:
        ledger: the backend (open or not).
        metrics: `filedock_ledger_errors_total` counts each failed try.
        stop: set when the service is asked to stop: the wait ends.
        once: `run --once`: an unavailable ledger is a `StartupError`.
        shown_url: the ledger's URL without its password, for the messages.
    """

    def __init__(
        self, ledger: Ledger, metrics: Metrics, stop: anyio.Event, *, once: bool, shown_url: str
    ) -> None:
        self.ledger, self.metrics, self.stop = ledger, metrics, stop
        self.once, self.shown_url = once, shown_url
        self._opened = False

    async def register(self, replica_id: str, lease_s: float) -> ReplicaRecord | None:
        """Open the ledger and register this instance; None when asked to stop first."""

        async def step() -> ReplicaRecord:
            if not self._opened:
                await self.ledger.open()
                self._opened = True
            return await register(self.ledger, replica_id, lease_s)

        return await self._until_done(step, "the ledger is unavailable; waiting for it to start")

    async def recover(self, recovery: Recovery) -> RecoveryReport:
        """Start-up recovery, run again from the top until it finishes (each run takes up
        what an interrupted one left); an empty report when asked to stop first."""
        report = await self._until_done(
            recovery.run, "start-up recovery was interrupted by the ledger; waiting to run it again"
        )
        return report or RecoveryReport()

    async def _until_done(self, step: Callable[[], Awaitable[T]], waiting: str) -> T | None:
        delay, logged_at = _FIRST_S, -_LOG_EVERY_S
        while True:
            try:
                return await step()
            except Exception as e:
                if not (isinstance(e, LedgerUnavailable) or self.ledger.reach.down):
                    raise
                why = str(e) if isinstance(e, LedgerUnavailable) else one_line(e)
            self.metrics.ledger_errors.inc()
            if self.once:
                raise StartupError(f"the ledger at {self.shown_url} is unavailable: {why}")
            if time.monotonic() - logged_at >= _LOG_EVERY_S:
                logged_at = time.monotonic()
                log.error(waiting, extra={"ledger": self.shown_url, "error": why})
            with anyio.move_on_after(delay):
                await self.stop.wait()
            if self.stop.is_set():
                return None
            delay = min(delay * 2, _MAX_S)
