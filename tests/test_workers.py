"""The import workers in-process: a claimed job in a lane, imported, and handed on by its
verdict to the archiver, to wait for a retry, or to be set aside."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import anyio
import pytest
from stages import Flaky, Rig, rig

from service.pipeline import retries
from service.pipeline.job import Job


async def _claimed(r: Rig, name: str, content: bytes) -> Job:
    return await r.held(r.job_in_proc(name, content, "20261207T000000000Z-0000000" + name[0]))


async def _work(r: Rig, job: Job) -> None:
    """Run the lane's worker and the archiver until the job has left the pipeline."""
    lane = r.pipeline.lanes.get("main")
    assert lane is not None
    async with anyio.create_task_group() as tg:
        tg.start_soon(r.pipeline.workers.run, lane)
        tg.start_soon(r.pipeline.archiver.run)
        await r.pipeline.lanes.enqueue(lane, job)
        with anyio.fail_after(20):
            await r.pipeline.in_flight.wait_idle()
        tg.cancel_scope.cancel()


async def test_an_import_that_succeeds_is_archived(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await r.pipeline.writer.start()
        job = await _claimed(r, "a.csv", b"x,y\n")
        await _work(r, job)
        row = await r.row(job.id)
        assert (row.state, row.outcome, row.attempts) == ("done", "imported", 1)
        manifest = json.loads((Path(row.archive_path or "") / "manifest.json").read_text())
        assert manifest["importer"]["bytes"] == 4  # the facts the importer returned
        assert not (r.folder("proc") / job.id).exists()
        assert r.kinds(job.id) == ["importing", "archiving", "done"]


async def test_a_rejected_import_is_set_aside(tmp_path: Path) -> None:
    async with rig(tmp_path, importer="stages:reject") as r:
        job = await _claimed(r, "b.csv", b"bad\n")
        await _work(r, job)
        row = await r.row(job.id)
        assert (row.state, row.outcome, row.error) == ("failed", "rejected", "not for us")
        error = json.loads((r.folder("failed") / job.id / "error.json").read_text())
        assert error["error_class"] == "rejected"
        assert r.kinds(job.id) == ["importing", "failed"]


async def test_a_retry_waits_in_the_ledger(tmp_path: Path) -> None:
    async with rig(tmp_path, importer="stages:retry") as r:
        job = await _claimed(r, "c.csv", b"later\n")
        await _work(r, job)  # an unordered lane lets a waiting job go
        row = await r.row(job.id)
        assert (row.state, row.error_class) == ("waiting", "retry")
        assert row.next_attempt_at is not None and row.next_attempt_at > time.time() + 20
        assert (r.folder("proc") / job.id / "c.csv").exists()
        assert r.kinds(job.id) == ["importing", "retry"]


async def test_an_attempt_the_ledger_did_not_count_is_not_charged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `importing` write fails: nothing runs, the job is set back as it was, and its
    first real attempt is attempt 1."""
    monkeypatch.setattr(retries, "_DEFER_S", 0.05)
    async with rig(tmp_path) as r:
        await r.pipeline.writer.start()
        job = await _claimed(r, "d.csv", b"x,y\n")
        r.pipeline.transitions.ledger = Flaky(r.ledger).fail("update_many")  # type: ignore[assignment]
        lane = r.pipeline.lanes.get("main")
        assert lane is not None
        async with anyio.create_task_group() as tg:
            for task in (partial(r.pipeline.workers.run, lane), r.pipeline.archiver.run):
                tg.start_soon(task)
            tg.start_soon(r.pipeline.later.run)
            await r.pipeline.lanes.enqueue(lane, job)
            with anyio.fail_after(20):
                while (await r.row(job.id)).state != "done":
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
        row = await r.row(job.id)
        assert row.attempts == 1
        assert [h["n"] for h in row.history if "n" in h] == [1]
        assert r.metrics.ledger_errors._value.get() == 1
