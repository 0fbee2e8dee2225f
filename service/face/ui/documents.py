"""A job's documents and timeline for its page: `manifest.json` and `error.json` read
from where the ledger says the job went, and what happened to it, in order.

No path from a request reaches the filesystem: a document is read only from the
`archive_path` or `failed_path` the ledger recorded, and only when that folder lies
inside the configured `archive/` or `failed/` (a row that says otherwise is not
followed). The file itself is opened without following a link, must be a regular
file, and is read up to `_MAX_BYTES`. An archive folder compressed in place
(`manifest.json.gz`) is read as well.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from service.ledger import DeliveryRecord, JobRecord

__all__ = ["Document", "Step", "read_document", "timeline"]

_MAX_BYTES: Final = 1 << 20


@dataclass(frozen=True)
class Document:
    """A job's JSON document: where it is, and what it says (or why it cannot be read)."""

    title: str
    path: str
    doc: dict[str, Any] | None
    problem: str | None = None


def _inside(path: str, root: Path) -> str | None:
    """`path` with its links resolved, when it lies within `root`; else None."""
    real = os.path.realpath(path)
    top = os.path.realpath(root)
    return real if os.path.commonpath([real, top]) == top and real != top else None


def _read_capped(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(_MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_BYTES:
        raise OSError(errno.EFBIG, f"larger than {_MAX_BYTES} bytes")
    return data


def _load(path: str) -> bytes:
    """The file's bytes, or those of its gzipped form beside it."""
    try:
        return _read_capped(path)
    except FileNotFoundError:
        packed = _read_capped(path + ".gz")
    with gzip.GzipFile(fileobj=io.BytesIO(packed)) as gz:
        data = gz.read(_MAX_BYTES + 1)
    if len(data) > _MAX_BYTES:
        raise OSError(errno.EFBIG, f"larger than {_MAX_BYTES} bytes")
    return data


def read_document(recorded: str | None, root: Path, filename: str) -> Document | None:
    """The document `filename` of the job folder the ledger recorded, if any. Blocking."""
    if not recorded:
        return None
    folder = _inside(recorded, root)
    if folder is None:
        return Document(filename, recorded, None, f"not inside {root}: not read")
    path = os.path.join(folder, filename)
    try:
        doc = json.loads(_load(path))
    except FileNotFoundError:
        return Document(filename, path, None, "not there (reaped?)")
    except (OSError, ValueError, EOFError) as e:
        return Document(filename, path, None, f"cannot be read: {e}")
    if not isinstance(doc, dict):
        return Document(filename, path, None, "not a JSON object")
    return Document(filename, path, doc)


@dataclass(frozen=True)
class Step:
    """One moment of a job's life: when, what, and what there is to say about it."""

    at: str | float | None
    what: str
    kind: str = "info"  # info, ok, warn, bad
    detail: str | None = None
    log_tail: str | None = None
    facts: dict[str, Any] | None = None


_RESULT_KIND: Final = {"ok": "ok", "running": "info", "interrupted": "warn", "retry": "warn"}


def timeline(job: JobRecord, deliveries: list[DeliveryRecord]) -> list[Step]:
    """Detected, claimed, each attempt and event of its history, its sinks, its end."""
    steps = [
        Step(job.detected_at or None, "detected in transfer/"),
        Step(job.created_at or None, "claimed: moved to proc/"),
    ]
    for h in job.history:
        if "n" in h:
            result = str(h.get("result", "?"))
            took = (
                f" in {h['elapsed_s']:g} s" if isinstance(h.get("elapsed_s"), int | float) else ""
            )
            steps.append(
                Step(
                    h.get("started_at"),
                    f"attempt {h['n']}: {result}{took}",
                    _RESULT_KIND.get(result, "bad"),
                    "ran alone (a crash suspect)" if h.get("isolated") else None,
                    h.get("log_tail"),
                    h.get("detail") or None,
                )
            )
        elif h.get("event") == "delivering":
            steps.append(Step(h.get("at"), f"imported ({h.get('outcome')}): to its sinks"))
        elif h.get("event") == "manual_retry":
            was = f"{h.get('previous_error_class')}: {h.get('previous_error') or ''}"
            steps.append(Step(h.get("at"), "retried by hand", "warn", f"it had failed {was}"))
        else:
            steps.append(Step(h.get("at"), str(h.get("event", "event")), detail=json.dumps(h)))
    for d in deliveries:
        kind = {"delivered": "ok", "failed": "bad"}.get(d.state, "info")
        said = f"{d.error_class}: {d.error}" if d.error_class else None
        steps.append(Step(d.updated_at, f"sink {d.sink}: {d.state}", kind, said))
    if job.state == "done":
        steps.append(Step(job.updated_at, f"archived ({job.outcome})", "ok"))
    elif job.state == "failed":
        said = f"{job.error_class}: {job.error}" if job.error_class else job.error
        steps.append(Step(job.updated_at, f"set aside in failed/ ({job.outcome})", "bad", said))
    elif job.state == "waiting":
        said = f"{job.error_class}: {job.error}" if job.error_class else None
        steps.append(Step(job.next_attempt_at, "next attempt due", "warn", said))
    return steps
