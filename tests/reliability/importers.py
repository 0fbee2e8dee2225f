"""Python importers for the reliability suite (loaded by the service as `reliability.importers`).

Each records its runs to $FILEDOCK_TEST_RECORD like tests/fake_importer.py does, so the
tests can count re-imports. They do their work in-process: a command importer costs
a Python start-up per file, which the soaks cannot afford.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from service.errors import Reject
from service.importers import ImportJob, Result

_lock = threading.Lock()


def _record(job: ImportJob, **fields: Any) -> None:
    path = os.environ.get("FILEDOCK_TEST_RECORD")
    if not path:
        return
    line = json.dumps({"job_id": job.id, "attempt": job.attempt, "pid": os.getpid(), **fields})
    with _lock, open(path, "a") as f:
        f.write(line + "\n")


def _first_line(job: ImportJob) -> bytes:
    with open(job.path, "rb") as f:
        return f.read(64).split(b"\n", 1)[0]


def quick(job: ImportJob) -> Result:
    """Read the file and record the run. Its first line may say `REJECT` (rejected at
    once), `FAIL` (raises: retried until the attempts are used up) or `SLEEP <s>`."""
    with open(job.path, "rb") as f:
        data = f.read()
    _record(job, event="run", size=len(data))
    words = data[:64].split(b"\n", 1)[0].split()
    if words[:1] == [b"REJECT"]:
        raise Reject("the file asked to be rejected")
    if words[:1] == [b"FAIL"]:
        raise RuntimeError("this file always fails")
    if words[:1] == [b"SLEEP"]:
        time.sleep(float(words[1]))
    _record(job, event="end", ok=True)
    return Result(detail={"bytes": len(data)})


def odd_detail(job: ImportJob) -> dict[str, Any]:
    """Facts that JSON cannot hold, or the fast encoder of manifests refuses, as an
    importer may well return them."""
    return {
        "amount": Decimal("1.50"),
        "loaded_at": datetime(2026, 11, 24, tzinfo=UTC),
        "checksum": 2**70,  # beyond 64 bits
        "label": os.fsdecode(b"r\xe9sum\xe9"),  # a lone surrogate
        "city": "Zürich",
    }


def kill_service(job: ImportJob) -> Result:
    """A file whose first line is `KILL` makes the service SIGKILL itself mid-import;
    `SLEEP <s>` sleeps (an innocent file, in flight alongside)."""
    _record(job, event="run")
    words = _first_line(job).split()
    if words[:1] == [b"KILL"]:
        os.kill(os.getpid(), signal.SIGKILL)
    if words[:1] == [b"SLEEP"]:
        time.sleep(float(words[1]))
    _record(job, event="end", ok=True)
    return Result()


def append_during_import(job: ImportJob) -> Result:
    """Append to the claimed file while it is being imported (an upstream still writing)."""
    _record(job, event="run")
    with open(job.path, "ab") as f:
        f.write(b"APPENDED-AFTER-CLAIM\n")
    return Result()


def rewrite_in_place(job: ImportJob) -> Result:
    """Change the claimed file's content in place, keeping its size and mtime: only the
    content hash can tell (an upstream that rewrites a file it already handed over)."""
    _record(job, event="run")
    st = os.stat(job.path)
    with open(job.path, "r+b") as f:
        head = f.read(1)
        f.seek(0)
        f.write(b"Y" if head != b"Y" else b"Z")
    os.utime(job.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return Result()
