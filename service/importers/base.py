"""What an importer is: an async callable from a claimed job to a result.

Raise `Retry` to try again later, `Reject` to fail at once; any other exception
is retried until the route's attempts are used up. The job id is the
importer's idempotency key: a crash mid-import re-runs the import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

__all__ = ["GroupImporter", "ImportJob", "Importer", "Outcome", "Result"]


@dataclass(frozen=True)
class ImportJob:
    """A claimed file, ready to import.

    Attributes:
        id: the job id, unique and sortable; use it as the idempotency key.
        route: the route's name.
        path: the claimed file, `proc/<id>/<name>`; read it, never move it.
        name: the original file name (exact bytes).
        relative_path: the path relative to `transfer/` it arrived under.
        out_dir: outputs written here are archived with the source.
        temp_dir: scratch space, wiped when the job ends.
        (Both exist before a `command` importer runs; an in-process importer that
        writes there creates them first: `job.out_dir.mkdir(exist_ok=True)`.)
        attempt: 1 for the first attempt.
        size: the file's size in bytes when it was claimed.
        sha256: the file's SHA-256 (hex) when it was claimed.
    """

    id: str
    route: str
    path: Path
    name: bytes
    relative_path: bytes
    out_dir: Path
    temp_dir: Path
    attempt: int
    size: int
    sha256: str


@dataclass
class Result:
    """What an import produced.

    Attributes:
        outcome: `imported`, or `partial` when some records failed.
        detail: facts for the manifest (exit code, row counts...).
        log: the importer's output, kept in the archive as `importer.log`.
        pending: for `partial`: a file (inside `out_dir`) holding what failed;
            it is set aside in `failed/<id>/` so an operator can fix and re-drop it.
        message: for `partial`: why some records failed.
    """

    outcome: Literal["imported", "partial"] = "imported"
    detail: dict[str, Any] = field(default_factory=dict)
    log: bytes | None = None
    pending: Path | None = None
    message: str | None = None


class Importer(Protocol):
    async def __call__(self, job: ImportJob) -> Result: ...


@dataclass
class Outcome:
    """How one import ended: its result, or the exception that ended it, and how long it ran."""

    result: Result | None = None
    error: BaseException | None = None
    elapsed_s: float = 0.0


class GroupImporter(Importer, Protocol):
    """An importer that can take several jobs in one go, each with its own outcome
    (in the order of `jobs`), each within `timeout_s`."""

    async def run_group(self, jobs: Sequence[ImportJob], timeout_s: float) -> list[Outcome]: ...
