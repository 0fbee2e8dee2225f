"""Set a job aside: its folder moves to `failed/<id>/` with `error.json`, then the
ledger says `failed`. A folder in `failed/` is always complete (`error.json` is
written into the job folder before the move)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import anyio

from service.crash import crash_point
from service.errors import JobError
from service.face.logs import job_fields
from service.face.metrics import Metrics
from service.ledger.reach import one_line
from service.pipeline.job import InFlight, Job
from service.pipeline.later import Later
from service.pipeline.streams import shielded
from service.pipeline.transitions import Transitions
from service.storage import archive as arch
from service.storage.fsutil import remove_tree

__all__ = ["SetAsideStage"]

log = logging.getLogger("filedock.pipeline")
_MOVE_AGAIN_S = 60.0  # a move to failed/ that failed (disk full, permissions) is tried again
_RECORD_AGAIN_S = 5.0  # a set-aside the ledger did not take is recorded again after


class SetAsideStage:
    def __init__(
        self,
        transitions: Transitions,
        in_flight: InFlight,
        folders: dict[str, Path],
        fs_threads: anyio.CapacityLimiter,
        later: Later,
        metrics: Metrics,
    ) -> None:
        self.transitions = transitions
        self.in_flight = in_flight
        self.later, self.metrics = later, metrics
        self.proc, self.failed, self.temp = folders["proc"], folders["failed"], folders["temp"]
        self._fs_threads = fs_threads

    async def fail(self, job: Job, error: JobError, *, outcome: str = "set_aside") -> None:
        """Move the job folder to `failed/<id>/` with `error.json`; ledger `failed`."""
        r = job.record
        doc = arch.error_document(
            r,
            error_class=error.error_class,
            message=error.message,
            outcome=outcome,
            failed_at=time.time(),
            deliveries=list(job.receipts()),
        )
        failed_dir = self.failed / r.id
        try:
            await shielded(
                anyio.to_thread.run_sync(
                    lambda: self._move(r.id, failed_dir, doc), limiter=self._fs_threads
                )
            )
        except OSError as e:
            log.error(
                "cannot move the job to failed/; it stays in proc/ and is retried",
                extra=job_fields(r.id, route=r.route, name=r.name, error=repr(e)[:300]),
            )
            try:
                await shielded(
                    self.transitions.set_back(job, error.error_class, error.message, _MOVE_AGAIN_S)
                )
            except Exception as ledger_error:
                self._again(job, error, outcome, ledger_error)
                return
            self.in_flight.release(job)
            return
        try:
            await shielded(self.transitions.failed(job, error, outcome, failed_dir))
        except Exception as ledger_error:
            self._again(job, error, outcome, ledger_error)
            return
        self.in_flight.release(job)

    def _again(self, job: Job, error: JobError, outcome: str, ledger_error: Exception) -> None:
        """The ledger did not take the state: the job, still held, is set aside again
        later (a folder in failed/ already is left as it is, and the ledger told)."""
        r = job.record
        self.metrics.ledger_errors.inc()
        log.error(
            f"cannot record the job set aside; tried again in {_RECORD_AGAIN_S:g}s",
            extra=job_fields(r.id, route=r.route, name=r.name, error=one_line(ledger_error)),
        )
        self.later.call(_RECORD_AGAIN_S, lambda: self.fail(job, error, outcome=outcome))

    def _move(self, job_id: str, failed_dir: Path, doc: dict[str, Any]) -> None:
        crash_point("mid_fail")
        if failed_dir.exists():
            return  # moved already (an interrupted earlier try)
        arch.set_aside(self.proc / job_id, failed_dir, doc)
        remove_tree(self.temp / job_id)
