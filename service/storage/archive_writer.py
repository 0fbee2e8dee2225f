"""The archiver's file work, in a worker process of its own.

Archiving is a long run of short system calls: for each file a folder, the copy,
`manifest.json`, a rename, and later the removal of the source. Each call
releases the GIL, and in the service's process each then waits to take it back behind
the event loop and the importer threads: that wait made the archiver the slowest stage
(2.0 ms a file, against 0.7 ms for the same calls with no other thread about; see
docs/benchmarks.md). In a worker process (`anyio.to_process`) the calls run on the
other core, and the service's process keeps its GIL for the ledger, the watcher and
the imports.

`write` and `remove` run in that worker; their arguments and results cross a pipe,
pickled. The order of the durability protocol stays the caller's: it records a
batch `done` in the ledger after its `write`, and only then hands its jobs to be
removed, normally along with the next batch's `write`.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_process
from anyio import BrokenWorkerProcess

from service import crash
from service.crash import crash_point, fsync_fault
from service.errors import JobError
from service.importers.base import Result
from service.ledger.base import JobRecord
from service.storage import archive as arch
from service.storage.codec import GZIP, Codec
from service.storage.fsutil import Barrier, BarrierMode, libc, remove_tree

__all__ = ["Entry", "Packing", "Writer", "Written", "remove", "write"]

log = logging.getLogger("filedock.archiver")
_PR_SET_PDEATHSIG = 1
_removals = ThreadPoolExecutor(1, thread_name_prefix="filedock-remove")  # its thread starts on use
T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """One job to archive, what its import produced, and its sinks' receipts."""

    job: JobRecord
    outcome: str
    result: Result | None
    deliveries: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Packing:
    """How sources are compressed and made durable: each route's codec, the threads
    that compress one source, the folder a large one's progress is written into, and
    the barrier's mode."""

    codecs: dict[str, Codec] = field(default_factory=dict)
    threads: int = 1
    progress: Path | None = None
    barrier: BarrierMode = "syncfs"


@dataclass(frozen=True)
class Written:
    """What became of one entry: `error` None when its archive is published and
    durable; `failed_path` when a partial import's pending records were set aside."""

    error: BaseException | None = None
    failed_path: str | None = None


class Writer:
    """The service's side: one worker process, one call at a time, started at once so
    that the first file does not wait for it. Where no worker process can start (the
    interpreter cannot be run again, e.g. under another user), the same work runs in a
    thread of the service, as it did before the worker existed."""

    def __init__(
        self,
        proc_root: Path,
        temp_root: Path,
        failed_root: Path,
        *,
        codecs: dict[str, Codec] | None = None,
        threads: int = 1,
        progress: Path | None = None,
        barrier: BarrierMode = "syncfs",
    ) -> None:
        self.proc_root, self.temp_root, self.failed_root = proc_root, temp_root, failed_root
        # Per route, how its sources are compressed; the threads that compress one; where
        # a large one's progress is written.
        self.packing = Packing(codecs or {}, threads, progress, barrier)
        self._limiter = anyio.CapacityLimiter(1)
        self._in_worker = True
        self.worker_pid: int | None = None  # the last call's worker; None in a thread

    async def start(self) -> None:
        try:
            self.worker_pid = await anyio.to_process.run_sync(_become_worker, limiter=self._limiter)
        except (BrokenWorkerProcess, OSError) as e:
            self._in_worker = False
            log.warning(
                "cannot start the archive worker process: archiving in the service's "
                "own process (slower under load)",
                extra={"error": repr(e.__cause__ or e)[:500]},
            )

    async def write(self, entries: Sequence[Entry], *, remove: Sequence[str] = ()) -> list[Written]:
        """Build, make durable and publish each entry's archive (see `write`), and remove
        the folders of the jobs in `remove` meanwhile (see `remove`): those must be
        recorded `done` already. When this returns, they are gone.

        A worker that died mid-batch, or could not be started again, fails the whole
        batch: each archive is built again on the archiver's next try."""
        batch, ids = list(entries), list(remove)
        args = (self.proc_root, self.temp_root, self.failed_root, batch, ids, self.packing)
        try:
            try:
                written, removal_error = await self._run(write, *args)
            except BrokenWorkerProcess:  # it died since its last call: once more, with a new one
                written, removal_error = await self._run(write, *args)
        except Exception as e:
            written, removal_error = [Written(e)] * len(batch), e
        if removal_error is not None:
            await self.remove(ids)
        return written

    async def remove(self, job_ids: Sequence[str]) -> None:
        """Remove the folders of jobs recorded `done` (see `remove`)."""
        if not job_ids:
            return
        args = (self.proc_root, self.temp_root, list(job_ids))
        try:
            await self._run(remove, *args)
        except Exception:  # the same work, here: the sources must not stay
            await anyio.to_thread.run_sync(remove, *args)

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        if self._in_worker:
            self.worker_pid, result = await anyio.to_process.run_sync(
                _in_worker, func, *args, limiter=self._limiter
            )
            return result
        return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter)


def write(
    proc_root: Path,
    temp_root: Path,
    failed_root: Path,
    entries: list[Entry],
    removable: list[str],
    packing: Packing | None = None,
) -> tuple[list[Written], BaseException | None]:
    """Blocking: build each `<id>.tmp/`, one barrier, publish all, one barrier; and
    meanwhile, in a thread, `remove` the folders of the jobs in `removable`.

    The removal mostly waits (here each unlink waits for the disk's discard), so it
    overlaps the build rather than taking a call of its own. Returns what became of
    each entry, and the removal's error if it failed (`Writer.write` removes again).
    `packing`: how the sources are compressed (`Packing`).

    A failed barrier (fsync) fails the whole batch: each archive is built again from
    its source on the next try, never trusted after a failed fsync.
    """
    removal = _removals.submit(remove, proc_root, temp_root, removable) if removable else None
    try:
        written = _write(proc_root, failed_root, entries, packing or Packing())
    finally:
        removal_error = removal.exception() if removal is not None else None  # waits for it
    return written, _portable(removal_error)


def _write(
    proc_root: Path,
    failed_root: Path,
    entries: list[Entry],
    packing: Packing,
) -> list[Written]:
    barrier = Barrier(packing.barrier)
    errors: list[BaseException | None] = []
    done_before: set[str] = set()
    for entry in entries:
        job = entry.job
        final = Path(job.archive_path or "")
        if os.path.exists(f"{final}/manifest.json"):  # published by an earlier try
            try:
                arch.check_published(final, job, barrier)
                done_before.add(job.id)
                errors.append(None)
            except Exception as e:
                errors.append(e)
            continue
        result = entry.result
        try:
            pending = result.pending if result else None
            arch.build_archive(
                job,
                proc_dir=proc_root / job.id,
                final_dir=final,
                outcome=entry.outcome,
                importer=result.detail if result else job.import_facts(),
                log=result.log if result else None,
                skip_outputs={pending.name} if pending else set(),
                barrier=barrier,
                deliveries=list(entry.deliveries),
                codec=packing.codecs.get(job.route, GZIP),
                threads=packing.threads,
                progress=packing.progress,
            )
            crash_point("mid_archive")
            errors.append(None)
        except Exception as e:
            errors.append(e)
    failed_paths: list[str | None] = [None] * len(entries)
    try:
        fsync_fault("build")
        barrier.flush()
        for k, (entry, err) in enumerate(zip(entries, errors, strict=True)):
            if err is not None or entry.job.id in done_before:
                continue
            final = Path(entry.job.archive_path or "")
            arch.publish_archive(final)
            barrier.dir(final.parent)
            crash_point("after_archive_rename")
            failed_paths[k] = _set_aside_pending(failed_root, entry)
        fsync_fault("publish")
        barrier.flush()
    except OSError as e:
        errors = [err if err is not None else e for err in errors]
        failed_paths = [None] * len(entries)
    return [Written(_portable(err), path) for err, path in zip(errors, failed_paths, strict=True)]


def remove(proc_root: Path, temp_root: Path, job_ids: list[str]) -> None:
    """Blocking: the jobs are archived and recorded; their folders in proc/ and their
    scratch in temp/ go."""
    for job_id in job_ids:
        remove_tree(proc_root / job_id)
        remove_tree(temp_root / job_id)


def _set_aside_pending(failed_root: Path, entry: Entry) -> str | None:
    """A partial import's pending records go to `failed/<id>/`, with `error.json`."""
    job, result = entry.job, entry.result
    if result is None or result.pending is None:
        return None
    failed_dir = failed_root / job.id
    if failed_dir.exists() or not result.pending.exists():
        return None
    doc = arch.error_document(
        job,
        error_class="rejected",
        message=result.message or "some records failed; fix them and drop this file again",
        outcome="partial",
        failed_at=time.time(),
    )
    arch.set_aside_pending(result.pending, failed_dir, doc)
    return str(failed_dir)


def _portable(err: BaseException | None) -> BaseException | None:
    """The error itself if it survives the pipe, else a retryable I/O error saying what
    it was (an error the parent cannot unpickle would break the worker)."""
    if err is None:
        return None
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return JobError("io_error", repr(err)[:500], retryable=True)
    return err


def _in_worker(func: Callable[..., T], *args: Any) -> tuple[int, T]:
    return _become_worker(), func(*args)


_is_worker = False


def _become_worker() -> int:
    """Once per worker process: the service decides when it stops, not a terminal's
    Ctrl-C to the whole process group; it dies with the service (`PR_SET_PDEATHSIG`);
    and a test crash point takes the service down with it. Returns the worker's pid,
    for its metrics."""
    global _is_worker
    if _is_worker:
        return os.getpid()
    _is_worker = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(libc, "prctl"):
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    crash.kill_parent_too()
    return os.getpid()
