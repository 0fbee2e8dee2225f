"""The sinks at run time: each one built from its settings, with its concurrency limit
and circuit breaker, and the items a job sends to it."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import anyio

from service.delivery.base import Item, Sink
from service.delivery.template import Target, render
from service.ledger import JobRecord
from service.settings.sinks import SinkSettings, template_of
from service.storage.claim import stored_name

__all__ = ["Breaker", "SinkRuntime", "build_sink", "items_for"]


def build_sink(settings: SinkSettings) -> Sink:
    """The sink of a kind; each kind's client library is imported only when used."""
    if settings.kind == "s3":
        from service.delivery.s3 import S3Delivery

        return S3Delivery(settings)
    if settings.kind == "http":
        from service.delivery.http import HttpDelivery

        return HttpDelivery(settings)
    if settings.kind == "directory":
        from service.delivery.directory import DirectoryDelivery

        return DirectoryDelivery(settings)
    if settings.kind == "sftp":
        from service.delivery.sftp import SftpDelivery

        return SftpDelivery(settings)
    if settings.kind == "ftp":
        from service.delivery.ftp import FtpDelivery

        return FtpDelivery(settings)
    raise AssertionError(f"unknown sink kind {settings!r}")


class Breaker:
    """After `failures` retryable failures in a row, the sink pauses for `pause_s`:
    its deliveries wait (no attempt is charged) instead of hammering a server that is
    down. After the pause, the next failure pauses it again; a success closes it."""

    def __init__(self, failures: int, pause_s: float) -> None:
        self._limit = failures
        self._pause_s = pause_s
        self._failures = 0
        self.paused_until = 0.0

    def paused_for(self, now: float | None = None) -> float:
        """Seconds left of the pause (0: deliveries may go)."""
        return max(0.0, self.paused_until - (time.time() if now is None else now))

    def failed(self) -> bool:
        """Count a retryable failure; True when it pauses the sink."""
        self._failures += 1
        if self._failures >= self._limit:
            self.paused_until = time.time() + self._pause_s
            return True
        return False

    def succeeded(self) -> None:
        self._failures = 0
        self.paused_until = 0.0


class SinkRuntime:
    """One sink of one route: its settings, its client, its limit and its breaker."""

    def __init__(self, route: str, settings: SinkSettings) -> None:
        self.route = route
        self.settings = settings
        self.sink = build_sink(settings)
        self.limiter = anyio.CapacityLimiter(settings.concurrency)
        self.breaker = Breaker(settings.breaker_failures, settings.breaker_pause_s)

    @property
    def name(self) -> str:
        return self.settings.name


def items_for(
    job: JobRecord, settings: SinkSettings, proc: Path, skip_outputs: frozenset[str]
) -> list[Item]:
    """What `job` sends to a sink: its source file as received, or each file its
    importer wrote to `out/` (sorted; `skip_outputs`: a partial import's pending
    records). The source needs no file read; the outputs are listed and hashed, so
    for those it blocks: run it in a thread."""
    folder = proc / job.id
    if settings.send == "source":
        path = Path(os.fsdecode(os.fsencode(folder) + b"/" + stored_name(job.name)))
        target = _target(job, os.fsdecode(job.name), os.fsdecode(job.relative_path))
        return [_item(job, settings, path, target, job.size or 0, job.sha256 or "")]
    items = []
    out = folder / "out"
    for path in sorted(_files(out)):
        rel = path.relative_to(out).as_posix()
        if rel in skip_outputs:
            continue
        size, digest = _hash(path)
        target = _target(job, path.name, rel, sha256=digest)
        items.append(_item(job, settings, path, target, size, digest))
    return items


def _item(
    job: JobRecord, settings: SinkSettings, path: Path, target: Target, size: int, sha: str
) -> Item:
    return Item(
        path=path,
        target=render(template_of(settings), target),
        size=size,
        sha256=sha,
        job_id=job.id,
        sink=settings.name,
    )


def _target(job: JobRecord, name: str, relative_path: str, *, sha256: str = "") -> Target:
    return Target(
        name=name,
        relative_path=relative_path,
        route=job.route,
        job_id=job.id,
        sha256=sha256 or job.sha256 or "",
        claimed_at=job.created_at,
    )


def _files(root: Path) -> list[Path]:
    """Regular files under `root` (symbolic links are never followed nor sent)."""
    found: list[Path] = []
    if not root.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                found.append(path)
    return found


def _hash(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()
