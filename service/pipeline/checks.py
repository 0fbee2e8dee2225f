"""The checks before an import: vetted, its checksum file, a duplicate, attempts left.

Each check ends in a verdict the worker acts on: import it, set it aside, let it
wait for a retry, or archive it as a duplicate. The checks change no state.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import anyio

from service.crash import crash_point
from service.errors import JobError
from service.ledger import JobRecord, Ledger
from service.pipeline.job import Job
from service.settings import CommandImporterSettings, Route
from service.storage.claim import Vetted, read_sidecar, stored_name, vet

__all__ = ["Checks", "Duplicate", "Import", "SetAside", "Verdict", "WaitRetry", "attempts_left"]


@dataclass(frozen=True)
class Import:
    """Import it."""


@dataclass(frozen=True)
class SetAside:
    error: JobError
    outcome: str


@dataclass(frozen=True)
class WaitRetry:
    error: JobError


@dataclass(frozen=True)
class Duplicate:
    original: str


Verdict = Import | SetAside | WaitRetry | Duplicate


class Checks:
    def __init__(
        self, ledger: Ledger, proc: Path, temp: Path, fs_threads: anyio.CapacityLimiter
    ) -> None:
        self.ledger = ledger
        self.proc, self.temp = proc, temp
        self._fs_threads = fs_threads

    async def verdict(self, route: Route, job: Job) -> Verdict:
        """What comes before an import. Raises when the ledger fails (the job is set
        back by the caller)."""
        r = job.record
        if job.rejected is not None:
            return SetAside(job.rejected, "set_aside")
        try:
            if job.vetted:
                job.vetted = False  # vetted in its claim batch, moments ago
            else:
                await self._vet(route, r)
            if route.checksum_sidecar:
                await self._check_sidecar(r)
        except JobError as e:
            if e.retryable and attempts_left(route, r):
                return WaitRetry(e)
            return SetAside(e, "set_aside" if not e.retryable else "exhausted")
        if route.duplicates == "skip" and r.sha256 is not None and not r.duplicate_of:
            since = time.time() - route.dedup_window_days * 86400
            original = await self.ledger.find_done_by_sha256(route.name, r.sha256, since)
            if original is not None and original != r.id:
                return Duplicate(original)
        if not attempts_left(route, r):
            # Its attempts were counted before imports that never finished (the
            # service died each time): a poison file ends here, not in a loop.
            return SetAside(
                JobError("exhausted", f"{route.max_attempts} attempts used up: {r.error}"),
                "exhausted",
            )
        return Import()

    async def _vet(self, route: Route, r: JobRecord) -> None:
        job_dir = self.proc / r.id
        path = os.fsencode(job_dir) + b"/" + stored_name(r.name)

        def check() -> Vetted:
            vetted = vet(path, max_size=route.max_size_bytes, want_hash=r.sha256 is None)
            if needs_dirs(route):  # made while we are in a worker thread anyway
                (job_dir / "out").mkdir(exist_ok=True)
                (self.temp / r.id).mkdir(exist_ok=True)
            return vetted

        vetted = await anyio.to_thread.run_sync(check, limiter=self._fs_threads)
        if r.sha256 is None:
            r.size, r.mtime_ns, r.sha256 = vetted.size, vetted.mtime_ns, vetted.sha256
        elif (vetted.size, vetted.mtime_ns) != (r.size, r.mtime_ns):
            raise JobError("modified_during_processing", "the file changed after it was claimed")
        crash_point("after_vet")

    async def _check_sidecar(self, r: JobRecord) -> None:
        announced = await anyio.to_thread.run_sync(
            read_sidecar, os.fsencode(self.proc / r.id), r.name, limiter=self._fs_threads
        )
        if announced is not None and announced != r.sha256:
            raise JobError(
                "checksum_mismatch",
                f"content SHA-256 {r.sha256} differs from {announced} in its .sha256 file",
            )


def attempts_left(route: Route, r: JobRecord) -> bool:
    """Attempts since the last manual retry, against `max_attempts`.

    An attempt that a crash of the service interrupted counts only if it ran in
    isolation: a file that kills the service is charged for it, the files that
    happened to be importing beside it are not.
    """
    charged = 0
    for entry in reversed(r.history):
        if entry.get("event") == "manual_retry":
            break
        if "n" in entry and (entry.get("result") != "interrupted" or entry.get("isolated")):
            charged += 1
    return charged < route.max_attempts


def needs_dirs(route: Route) -> bool:
    """A command gets `{out_dir}` and `$TMPDIR` made for it; in-process importers make
    them when they write there (most never do, and four metadata operations a file
    are a fifth of the per-file cost)."""
    return isinstance(route.importer, CommandImporterSettings)
