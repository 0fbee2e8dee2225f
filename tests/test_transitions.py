"""Transitions: each writes its ledger columns, then tells the subscribers; on a real
SQLite ledger."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from stages import rig

from service.errors import JobError
from service.ledger import JobRecord
from service.pipeline.job import Job


def _record(job_id: str = "20261207T000000000Z-00000001") -> JobRecord:
    now = time.time()
    return JobRecord(
        id=job_id,
        route="main",
        name=b"a.csv",
        relative_path=b"a.csv",
        detected_at=now,
        created_at=now,
        updated_at=now,
    )


async def test_a_job_through_its_transitions(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        t = r.pipeline.transitions
        job = Job(_record())
        await t.insert([job.record])
        t.claimed(job)
        assert (await r.row(job.id)).state == "claimed"
        job.record.attempts = 1
        job.record.history.append({"n": 1, "result": "running"})
        await t.importing([job])
        row = await r.row(job.id)
        assert (row.state, row.attempts, row.history) == ("importing", 1, job.record.history)
        await t.retry(job, "timeout", "no result within 5s", 30.0)
        row = await r.row(job.id)
        assert (row.state, row.error_class) == ("waiting", "timeout")
        assert row.next_attempt_at is not None and row.next_attempt_at > time.time() + 25
        t.bound_for_archive(job, "imported", None, r.folder("archive"))
        await t.archiving([job])
        assert job.recorded and (await r.row(job.id)).state == "archiving"
        await t.done([job])
        t.report_done(job)
        t.report_done(job)  # once only
        row = await r.row(job.id)
        assert (row.state, row.outcome) == ("done", "imported")
        assert row.archive_path is not None and job.id in row.archive_path
        assert r.kinds(job.id) == ["claimed", "importing", "retry", "archiving", "done"]
        assert r.pipeline.tally.done == 1 and r.pipeline.tally.retried == 1


async def test_failed_writes_its_columns_and_counts(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        t = r.pipeline.transitions
        job = Job(_record())
        await t.insert([job.record])
        failed_dir = r.folder("failed") / job.id
        await t.failed(job, JobError("rejected", "bad header"), "rejected", failed_dir)
        row = await r.row(job.id)
        assert (row.state, row.outcome, row.error_class, row.error) == (
            "failed",
            "rejected",
            "rejected",
            "bad header",
        )
        assert row.failed_path == str(failed_dir)
        assert r.kinds(job.id) == ["failed"]
        assert r.pipeline.tally.failed == 1
        sample = r.metrics.registry.get_sample_value(
            "filedock_job_failures_total", {"route": "main", "error_class": "rejected"}
        )
        assert sample == 1


async def test_done_that_cannot_be_written_stays_archiving(tmp_path: Path) -> None:
    """A `done` the ledger refuses leaves the job `archiving` in memory (the archiver
    tries again) and tells no subscriber."""
    async with rig(tmp_path) as r:
        t = r.pipeline.transitions
        job = Job(_record())
        await t.insert([job.record])
        t.bound_for_archive(job, "imported", None, r.folder("archive"))
        await r.ledger.close()  # the ledger goes away
        with pytest.raises(RuntimeError):
            await t.done([job])
        assert job.record.state == "archiving"
        assert "done" not in r.kinds(job.id)
        await r.ledger.open()
