"""Claim: one rename out of `transfer/` into `proc/<job-id>/`, then vet what was moved.

The entry is renamed first, whatever it is, and vetted afterwards inside
`proc/`, where no upstream can swap it: the classic race between looking at a
file and opening it (a regular file replaced by a symlink to a secret) cannot
happen. Renaming a symlink moves the link itself; its target is never opened.
A FIFO is never opened for reading (`lstat` says what it is first).

These functions block; the pipeline runs them in worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from service.crash import crash_point
from service.errors import JobError
from service.storage.fsutil import Barrier, BarrierMode
from service.storage.writers import LeaseCheck, open_and_check, still_idle, writer_check_fd

if TYPE_CHECKING:  # the archive worker process imports this module: no pydantic there
    from service.settings import Route

__all__ = [
    "ClaimResult",
    "Vetted",
    "claim_batch",
    "companion_suffixes",
    "no_writer",
    "payload_name",
    "read_sidecar",
    "stored_name",
    "vet",
]

# Names the service writes into a job folder; a payload with one of them is stored as `_<name>`.
RESERVED = frozenset({b"out", b"error.json", b"manifest.json", b"importer.log"})
_CHUNK = 1 << 20


def stored_name(name: bytes) -> bytes:
    """The payload's name inside its job folder (the ledger keeps the original)."""
    return b"_" + name if name.lstrip(b"_") in RESERVED else name


def payload_name(stored: bytes) -> bytes:
    """The original name from a stored one (inverse of `stored_name`)."""
    if stored.startswith(b"_") and stored.lstrip(b"_") in RESERVED:
        return stored[1:]
    return stored


@dataclass(frozen=True)
class ClaimResult:
    rel: bytes
    job_id: str
    status: Literal["claimed", "gone", "busy", "error"]
    error: str | None = None
    vetted: Vetted | None = None
    rejected: JobError | None = None  # claimed, but not a file to import (set it aside)


def claim_batch(
    transfer: Path,
    proc: Path,
    items: list[tuple[bytes, str]],
    *,
    companions: tuple[bytes, ...] = (),
    max_size: int | None = None,
    temp: Path | None = None,
    barrier_mode: BarrierMode = "syncfs",
) -> list[ClaimResult]:
    """Rename each `transfer/<rel>` to `proc/<id>/<name>`; one barrier for the batch.

    `companions` are suffixes of files that travel with their file (a marker
    `<name>.done`, a checksum `<name>.sha256`): each that exists is moved into the
    same job folder after the file itself.

    A file that is gone (another replica claimed it, or the upstream took it back)
    is reported as `gone`: normal, and quiet.

    After the barrier each claimed entry is vetted where it now lies (see `vet`),
    and its importer folders (`out/`, `temp/<id>/`) are made: all in this one
    call, so a batch costs one trip to a worker thread.
    """
    tb, pb = os.fsencode(transfer), os.fsencode(proc)
    barrier = Barrier(barrier_mode)
    results: list[ClaimResult] = []
    for rel, job_id in items:
        src = tb + b"/" + rel
        # A file some process still has open for writing stays where it is. The lease
        # is held through the rename: a writer opening it meanwhile waits, and then
        # has the claimed file open, which the vet before the import sees.
        fd, writers = open_and_check(src)
        if writers is LeaseCheck.WRITING:
            results.append(ClaimResult(rel, job_id, "busy"))
            continue
        job_dir = pb + b"/" + job_id.encode()
        try:
            result = _claim_one(src, job_dir, rel, job_id, companions)
        finally:
            if fd is not None:
                os.close(fd)  # releases the lease
        results.append(result)
        if result.status == "claimed":
            # The upstream's bytes may not be on disk yet: a per-file barrier syncs them.
            # Only a regular file's (opening a FIFO would wait for a writer; a symlink,
            # socket or folder is set aside by the vet and has no bytes of its own).
            claimed = job_dir + b"/" + stored_name(rel.rsplit(b"/", 1)[-1])
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(claimed).st_mode):
                    barrier.file(claimed, best_effort=True)
            barrier.dir(Path(os.fsdecode(src)).parent)
            barrier.dir(Path(os.fsdecode(job_dir)))
    if any(r.status == "claimed" for r in results):
        barrier.dir(proc)
        barrier.flush()
    return [_vet_claimed(r, pb, max_size, temp) if r.status == "claimed" else r for r in results]


def _claim_one(
    src: bytes, job_dir: bytes, rel: bytes, job_id: str, companions: tuple[bytes, ...]
) -> ClaimResult:
    name = rel.rsplit(b"/", 1)[-1]
    try:
        os.mkdir(job_dir)
    except OSError as e:
        return ClaimResult(rel, job_id, "error", f"mkdir in proc/: {e.strerror}")
    crash_point("mid_claim")
    try:
        os.rename(src, job_dir + b"/" + stored_name(name))
    except OSError as e:
        os.rmdir(job_dir)
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return ClaimResult(rel, job_id, "gone")
        return ClaimResult(rel, job_id, "error", f"rename: {e.strerror}")
    for suffix in companions:
        try:
            os.rename(src + suffix, job_dir + b"/" + stored_name(name + suffix))
        except FileNotFoundError:
            pass
    return ClaimResult(rel, job_id, "claimed")


def _vet_claimed(
    r: ClaimResult, proc: bytes, max_size: int | None, temp: Path | None
) -> ClaimResult:
    job_dir = proc + b"/" + r.job_id.encode()
    name = r.rel.rsplit(b"/", 1)[-1]
    try:
        vetted = vet(job_dir + b"/" + stored_name(name), max_size=max_size, want_hash=True)
    except JobError as e:
        if e.retryable and e.error_class == "modified_during_processing":
            # Still written: vetted again before its import, which waits for the writer.
            return ClaimResult(r.rel, r.job_id, "claimed")
        return ClaimResult(r.rel, r.job_id, "claimed", rejected=e)
    crash_point("after_vet")
    if temp is not None:  # the importer's folders, when it needs them made for it
        os.mkdir(job_dir + b"/out")
        os.makedirs(temp / r.job_id, exist_ok=True)
    return ClaimResult(r.rel, r.job_id, "claimed", vetted=vetted)


@dataclass(frozen=True)
class Vetted:
    size: int
    mtime_ns: int
    sha256: str | None


@contextmanager
def no_writer(fd: int) -> Iterator[None]:
    """While the block reads the claimed file at `fd`, no process has it open for
    writing, before or meanwhile (the lease is held until `fd` closes).

    Raises:
        JobError: (retryable) `modified_during_processing` when a writer has the file
            open: it opened it as the claim renamed it, or it writes into `proc/`. The
            job waits, and its import and archive get the complete content.
    """
    writers = writer_check_fd(fd)
    if writers is LeaseCheck.WRITING:
        raise _still_written()
    yield
    if writers is LeaseCheck.IDLE and not still_idle(fd):
        raise _still_written()


def _still_written() -> JobError:
    return JobError(
        "modified_during_processing",
        "a process still has the file open for writing; it is imported once it is closed",
        retryable=True,
    )


def vet(path: bytes, *, max_size: int | None, want_hash: bool) -> Vetted:
    """Check that a claimed entry is a regular file with one link, within the size limit,
    that no process has open for writing.

    The size limit is checked on `st_size` before a byte is read (a 20 GB sparse
    file is refused at once). With `want_hash`, the content's SHA-256 is computed
    from the same open descriptor that was checked.

    Raises:
        JobError: `symlink`, `not_regular_file`, `hard_link`, `too_large`,
            `permission`, `io_error`, or (retryable) `modified_during_processing`.
    """
    try:
        st = os.lstat(path)
    except OSError as e:
        raise _os_error(e, "stat") from e
    _check_type(st)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise JobError("symlink", "the entry became a symbolic link") from e
        raise _os_error(e, "open") from e
    try:
        fst = os.fstat(fd)
        _check_type(fst)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise JobError("not_regular_file", "the entry changed while it was being checked")
        if fst.st_nlink > 1:
            raise JobError(
                "hard_link",
                f"the file has {fst.st_nlink} hard links: another name shares its content",
            )
        if max_size is not None and fst.st_size > max_size:
            raise JobError(
                "too_large", f"the file has {fst.st_size} bytes, over max_size_bytes={max_size}"
            )
        with no_writer(fd):
            digest = _sha256_fd(fd, fst.st_size) if want_hash else None
        return Vetted(fst.st_size, fst.st_mtime_ns, digest)
    finally:
        os.close(fd)


def companion_suffixes(route: Route) -> tuple[bytes, ...]:
    """The files that travel with a file of this route: its marker, its checksum."""
    out: list[bytes] = []
    if route.readiness == "marker":
        out.append(route.marker_suffix.encode())
    if route.checksum_sidecar:
        out.append(b".sha256")
    return tuple(out)


def read_sidecar(job_dir: bytes, name: bytes) -> str | None:
    """The SHA-256 a `<name>.sha256` file announces (`sha256sum` format), if present."""
    try:
        with open(job_dir + b"/" + stored_name(name + b".sha256"), "rb") as f:
            first = f.read(4096).split(None, 1)
    except FileNotFoundError:
        return None
    if not first or len(first[0]) != 64:
        raise JobError("checksum_mismatch", "the .sha256 file does not hold a SHA-256")
    return first[0].decode("ascii", "replace").lower()


def _check_type(st: os.stat_result) -> None:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return
    if stat.S_ISLNK(mode):
        raise JobError("symlink", "a symbolic link: moved aside, its target never read")
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO (named pipe)",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    what = next((desc for test, desc in kinds.items() if test(mode)), "not a regular file")
    raise JobError("not_regular_file", f"{what}, not a regular file: never opened")


def _sha256_fd(fd: int, size: int) -> str:
    """The file's SHA-256, read through one buffer no larger than the file (`size`
    bytes, one more to see its end): `os.read` would allocate `_CHUNK` for every read,
    a 1 KiB file's too."""
    h = hashlib.sha256()
    buffer = bytearray(min(_CHUNK, size + 1))
    view = memoryview(buffer)
    while n := os.readv(fd, [buffer]):
        h.update(view[:n])
    return h.hexdigest()


def _os_error(e: OSError, what: str) -> JobError:
    if e.errno in (errno.EACCES, errno.EPERM):
        return JobError("permission", f"{what}: permission denied", retryable=True)
    if e.errno == errno.ENXIO:
        return JobError("not_regular_file", "a socket or device, not a regular file")
    return JobError("io_error", f"{what}: {e.strerror}", retryable=True)
