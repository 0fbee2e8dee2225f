"""Archive and set aside: where a job's folder ends, and the documents it carries.

Archive (exactly once): write `archive/YYYY/MM/DD/<id>.tmp/` (the source
compressed, the importer's outputs, `importer.log`, `manifest.json`), make it
durable, verify the compressed copy against the source's SHA-256, rename it to
`<id>/`, make that durable; only then may the ledger say `done` and the
source in `proc/` be removed.

Set aside: write `error.json` into the job folder, then move the whole folder
to `failed/<id>/` (one rename, or a durable copy across filesystems).

These functions block; the pipeline runs them in its archive worker process
(`archive_writer.py`) or in worker threads.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import orjson

from service.errors import JobError
from service.ledger.base import JobRecord
from service.storage.claim import no_writer, payload_name, stored_name
from service.storage.codec import GZIP, Codec, Kind, compress_into, expanded_sha256
from service.storage.fsutil import Barrier, fsync_dir, move_tree, write_durable
from service.storage.names import display_name, name_b64, rfc3339, safe_archive_name
from service.storage.progress import LONG_BYTES, Progress

__all__ = [
    "SCHEMA_VERSION",
    "archive_dir_for",
    "build_archive",
    "check_published",
    "compression_of",
    "error_document",
    "manifest_document",
    "publish_archive",
    "set_aside",
]

SCHEMA_VERSION = 1
HOST = socket.gethostname()
_ORJSON = orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


def archive_dir_for(archive_root: Path, job_id: str) -> Path:
    """`archive/YYYY/MM/DD/<id>`, dated by the job id (its claim, UTC).

    A pure function of the id: recovery finds a job's archive without the ledger.
    """
    y, m, d = job_id[0:4], job_id[4:6], job_id[6:8]
    return archive_root / y / m / d / job_id


def _identity(job: JobRecord) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "job_id": job.id,
        "route": job.route,
        "name": display_name(job.name),
        "name_b64": name_b64(job.name),
        "relative_path": display_name(job.relative_path),
        "size": job.size,
        "sha256": job.sha256,
        "attempts": job.history,
        "detected_at": rfc3339(job.detected_at),
        "claimed_at": rfc3339(job.created_at),
        "host": HOST,
    }


def manifest_document(
    job: JobRecord,
    *,
    outcome: str,
    files: list[dict[str, Any]],
    importer: dict[str, Any],
    archived_at: float,
    deliveries: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    doc = _identity(job)
    doc.update(
        outcome=outcome,
        archived_at=rfc3339(archived_at),
        importer=importer,
        files=files,
    )
    if deliveries:
        doc["deliveries"] = deliveries
    if job.duplicate_of:
        doc["duplicate_of"] = job.duplicate_of
    return doc


def error_document(
    job: JobRecord,
    *,
    error_class: str,
    message: str,
    outcome: str,
    failed_at: float,
    deliveries: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    doc = _identity(job)
    doc.update(
        outcome=outcome,
        error_class=error_class,
        message=display_name(message[:4000]),
        failed_at=rfc3339(failed_at),
        how_to_retry=f"filedock retry {job.id}",
    )
    if deliveries:
        doc["deliveries"] = deliveries
        doc["how_to_retry"] += " (sends to the sinks not delivered yet; --sink NAME for one)"
    return doc


def _dump(doc: dict[str, Any]) -> bytes:
    """Indented UTF-8 JSON and a newline. orjson writes it in under 1 µs; Python's own
    encoder, which an indent selects, took 17 µs a manifest on the archiver's critical
    path. What orjson refuses (an integer beyond 64 bits or a lone surrogate in an
    importer's detail) the standard encoder still writes, escaped to ASCII."""
    try:
        return orjson.dumps(doc, option=_ORJSON)
    except orjson.JSONEncodeError:
        return (json.dumps(doc, indent=2, ensure_ascii=True) + "\n").encode()


def _compress_and_hash(
    src: bytes, dst: str, job: JobRecord, codec: Codec, threads: int, progress: Path | None
) -> None:
    """Compress the source into `dst`, hashing it on the way: the source must still be
    what was claimed, and each block of the copy is checked as it is written
    (`codec.compress_into`). A large one's progress is written into `progress`."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_size != job.size or st.st_mtime_ns != job.mtime_ns:
            raise JobError(
                "modified_during_processing",
                f"the file changed after it was claimed (size {job.size} -> {st.st_size})",
            )
        # No writer may have it open while it is archived, nor open it meanwhile (the
        # lease is held until the descriptor closes): an archive is never of a prefix.
        # A writer found here makes the archiver try again later; once it has closed
        # the file, a change of content sets the job aside with the complete bytes.
        with no_writer(fd):
            report = None
            if progress is not None and st.st_size >= LONG_BYTES:
                report = Progress(progress, job.id, job.route, "archive", st.st_size)
            try:
                digest = compress_into(
                    fd, dst, codec, threads=threads, progress=report.add if report else None
                )
            finally:
                if report is not None:
                    report.close()
            _check_source(digest, job)
    finally:
        os.close(fd)


def _check_source(digest: str, job: JobRecord) -> None:
    if digest != job.sha256:
        raise JobError(
            "modified_during_processing", "the file's content changed after it was claimed"
        )


def _check_copy(digest: str, sha256: str | None) -> None:
    if digest != sha256:
        # The copy is bad (the source was checked while compressing): rebuild it.
        raise JobError("io_error", "the compressed copy does not match its source", retryable=True)


def _write_all(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _verify_copy(path: str | Path, kind: Kind, sha256: str | None) -> None:
    _check_copy(expanded_sha256(str(path), kind), sha256)


def build_archive(
    job: JobRecord,
    *,
    proc_dir: Path,
    final_dir: Path,
    outcome: str,
    importer: dict[str, Any],
    log: bytes | None,
    skip_outputs: set[str],
    barrier: Barrier,
    deliveries: list[dict[str, Any]] | None = None,
    codec: Codec = GZIP,
    threads: int = 1,
    progress: Path | None = None,
) -> dict[str, Any]:
    """Write `<final_dir>.tmp/` completely, the source compressed by `codec` on
    `threads` threads (a large one's progress written into the folder `progress`);
    the caller flushes the barrier, then publishes.

    Returns the manifest.
    """
    # Plain strings: this runs once a file on the archiver's critical path.
    tmp = f"{final_dir}.tmp"
    try:
        os.mkdir(tmp)
    except FileExistsError:  # our own unfinished copy from an interrupted attempt
        shutil.rmtree(tmp)
        os.mkdir(tmp)
    except FileNotFoundError:  # the first archive of the day
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp)
    copy_name = os.fsdecode(safe_archive_name(job.name, codec.suffix.encode()))
    proc = os.fsencode(proc_dir)
    payload = stored_name(job.name)
    try:
        source = proc + b"/" + payload
        _compress_and_hash(source, f"{tmp}/{copy_name}", job, codec, threads, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a copy of changed content
        raise
    files: list[dict[str, Any]] = [
        {"name": copy_name, "role": "source", "sha256": job.sha256, "compression": codec.kind}
    ]
    barrier.file(f"{tmp}/{copy_name}")
    stored_names = sorted(os.listdir(proc))
    for stored in stored_names:
        if stored in (payload, b"out", b"error.json"):
            continue
        safe = os.fsdecode(safe_archive_name(payload_name(stored)))
        _copy_output(Path(os.fsdecode(proc + b"/" + stored)), Path(tmp, safe), barrier)
        files.append({"name": safe, "role": "companion"})
    out_dir = proc_dir / "out"
    if b"out" in stored_names and out_dir.is_dir():
        entries = sorted(e for e in os.listdir(out_dir) if e not in skip_outputs)
        if entries:
            os.mkdir(f"{tmp}/out")
            barrier.dir(f"{tmp}/out")
        for entry in entries:
            _copy_output(out_dir / entry, Path(tmp, "out", entry), barrier)
            files.append({"name": f"out/{entry}", "role": "output"})
    if log:
        _write_all(f"{tmp}/importer.log", log)
        barrier.file(f"{tmp}/importer.log")
        files.append({"name": "importer.log", "role": "log"})
    manifest = manifest_document(
        job,
        outcome=outcome,
        files=files,
        importer=importer,
        archived_at=time.time(),
        deliveries=deliveries,
    )
    _write_all(f"{tmp}/manifest.json", _dump(manifest))
    barrier.file(f"{tmp}/manifest.json")
    barrier.dir(tmp)
    return manifest


def _copy_output(src: Path, dst: Path, barrier: Barrier) -> None:
    if src.is_symlink():
        return  # never follow a link an importer left behind
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
        barrier.dir(dst)
        return
    try:
        os.link(src, dst)  # same filesystem: no copy
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copyfile(src, dst)
    barrier.file(dst)


def check_published(final_dir: Path, job: JobRecord, barrier: Barrier) -> None:
    """An archive published by an earlier try (its ledger write failed): verify it again
    against the job's SHA-256, and include it in the barrier before it counts as done."""
    manifest = read_json(final_dir / "manifest.json") or {}
    files = manifest.get("files") or [{}]
    source = final_dir / str(files[0].get("name", ""))
    _verify_copy(source, compression_of(files[0]), job.sha256)
    for entry in final_dir.iterdir():
        if entry.is_file():
            barrier.file(entry)
    barrier.dir(final_dir)
    barrier.dir(final_dir.parent)


def compression_of(entry: dict[str, Any]) -> Kind:
    """How a manifest's source entry is compressed; one without the key is gzip."""
    kind = entry.get("compression", "gzip")
    return kind if kind in ("gzip", "zstd", "none") else "gzip"


def publish_archive(final_dir: Path) -> None:
    """Rename the durable `<id>.tmp/` to `<id>/` (the caller makes the parent durable)."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    try:
        os.rename(tmp, final_dir)
    except OSError as e:
        if e.errno == errno.ENOENT and final_dir.exists():
            return  # done already: an NFS retransmission reports the rename as failed
        raise


def set_aside(proc_dir: Path, failed_dir: Path, error: dict[str, Any]) -> None:
    """Move a job folder to `failed/<id>/` with its `error.json` already inside.

    Writing `error.json` first means a folder in `failed/` is always complete.
    """
    write_durable(proc_dir / "error.json", _dump(error))
    move_tree(proc_dir, failed_dir)


def set_aside_pending(pending: Path, failed_dir: Path, error: dict[str, Any]) -> None:
    """For a partial import: the rows that failed go to `failed/<id>/` with `error.json`."""
    tmp = failed_dir.with_name(failed_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    os.mkdir(tmp)
    shutil.copyfile(pending, tmp / pending.name)
    barrier = Barrier()
    barrier.file(tmp / pending.name)
    (tmp / "error.json").write_bytes(_dump(error))
    barrier.file(tmp / "error.json")
    barrier.dir(tmp)
    barrier.flush()
    os.rename(tmp, failed_dir)
    fsync_dir(failed_dir.parent)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
