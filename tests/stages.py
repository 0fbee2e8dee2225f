"""In-process stage tests' rig: a real Settings, a real SQLite ledger and real folders in
tmp_path, the real pipeline wiring; a test drives the one stage it is about.

Importers for these tests are below (`stages:ok`, `stages:reject`, `stages:retry`): each
reads the claimed file, as a real importer does.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from service.discovery.intake import Intake
from service.discovery.readiness import Readiness
from service.errors import Reject, Retry
from service.face.metrics import Metrics
from service.importers import ImportJob
from service.ledger import JobRecord
from service.ledger.sqlite import SqliteLedger
from service.pipeline import Pipeline, Transition
from service.pipeline.job import Job
from service.settings import Settings
from service.upkeep.replicas import this_instance


async def ok(job: ImportJob) -> dict[str, Any]:
    return {"bytes": len(job.path.read_bytes())}


async def reject(job: ImportJob) -> None:
    job.path.read_bytes()
    raise Reject("not for us")


async def retry(job: ImportJob) -> None:
    raise Retry("the database is busy", defer_s=30)


async def two_outputs(job: ImportJob) -> None:
    """Writes two files to `out/`, as a converting importer does."""
    data = job.path.read_bytes()
    (job.out_dir / "parts").mkdir(parents=True)
    (job.out_dir / "upper.txt").write_bytes(data.upper())
    (job.out_dir / "parts" / "len.txt").write_bytes(str(len(data)).encode())


class Flaky:
    """A ledger whose named operations fail their next calls, as a ledger gone away does;
    with `after`, each is done first and its answer lost (as with a connection cut
    after the commit). Every other attribute is the real ledger's."""

    def __init__(self, ledger: SqliteLedger) -> None:
        self._ledger = ledger
        self._failing: dict[str, tuple[int, bool]] = {}

    def fail(self, name: str, times: int = 1, *, after: bool = False) -> Flaky:
        self._failing[name] = (times, after)
        return self

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._ledger, name)
        if name not in self._failing:
            return real

        async def flaky(*args: Any, **kwargs: Any) -> Any:
            times, after = self._failing[name]
            if times <= 0:
                return await real(*args, **kwargs)
            self._failing[name] = (times - 1, after)
            if after:
                await real(*args, **kwargs)
            error = sqlite3.OperationalError("disk I/O error")
            self._ledger.reach.failed(error)
            raise error

        return flaky


@dataclass
class Rig:
    settings: Settings
    ledger: SqliteLedger
    metrics: Metrics
    intake: Intake
    readiness: Readiness
    pipeline: Pipeline
    events: list[Transition]

    def folder(self, name: str) -> Path:
        return self.settings.folder(name)

    def drop(self, name: str, content: bytes) -> Path:
        path = self.folder("transfer") / name
        tmp = path.with_name("." + name + ".tmp")
        tmp.write_bytes(content)
        os.rename(tmp, path)
        return path

    def job_in_proc(
        self, name: str, content: bytes, job_id: str, *, relative_path: str | None = None
    ) -> Job:
        """A job whose file lies claimed in `proc/<id>/` (no ledger row yet), with the
        size, mtime and SHA-256 its claim would have recorded."""
        folder = self.folder("proc") / job_id
        folder.mkdir()
        (folder / name).write_bytes(content)
        st = (folder / name).stat()
        now = time.time()
        record = JobRecord(
            id=job_id,
            route="main",
            name=name.encode(),
            relative_path=(relative_path or name).encode(),
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            sha256=hashlib.sha256(content).hexdigest(),
            detected_at=now,
            created_at=now,
            updated_at=now,
        )
        return Job(record)

    async def held(self, job: Job) -> Job:
        """Its row inserted (`claimed`) and the job held in flight, as after its claim."""
        await self.pipeline.transitions.insert([job.record])
        self.pipeline.in_flight.hold(job)
        return job

    def kinds(self, job_id: str) -> list[str]:
        return [e.kind for e in self.events if e.job.id == job_id]

    async def row(self, job_id: str) -> JobRecord:
        record = await self.ledger.get(job_id)
        assert record is not None, f"no ledger row for {job_id}"
        return record


@asynccontextmanager
async def rig(tmp_path: Path, importer: str = "stages:ok", **route: Any) -> AsyncIterator[Rig]:
    settings = Settings(
        root=tmp_path / "data",
        http={"enabled": False},
        batch_max_delay_ms=0,
        routes=[
            {
                "name": "main",
                "match": "**",
                "importer": (
                    "none" if importer == "none" else {"kind": "python", "callable": importer}
                ),
                "max_attempts": 3,
                "backoff_s": 0,
                "max_backoff_s": 0,
                **route,
            }
        ],
    )
    for name in ("transfer", "proc", "archive", "failed", "temp", "state"):
        settings.folder(name).mkdir(parents=True, exist_ok=True)
    ledger = SqliteLedger(settings.folder("state") / "ledger.sqlite3")
    await ledger.open()
    metrics = Metrics(CollectorRegistry())
    intake = Intake(["main"], 16, metrics)
    readiness = Readiness(settings.folder("transfer"))
    replica = this_instance(settings.replica_id)
    pipeline = Pipeline(settings, ledger, metrics, intake, readiness, replica)
    events: list[Transition] = []
    pipeline.transitions.subscribe(events.append)
    try:
        yield Rig(settings, ledger, metrics, intake, readiness, pipeline, events)
    finally:
        intake.close()
        pipeline.close()
        await ledger.close()
