"""Setting a job aside in-process: its folder to failed/<id>/ with error.json, then
`failed`."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from stages import Flaky, rig

from service.errors import JobError
from service.pipeline import set_aside


async def test_a_job_set_aside_is_complete_in_failed(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        job_id = "20261207T000000000Z-00000001"
        job = r.job_in_proc("big.csv", b"x" * 100, job_id, relative_path="in/big.csv")
        (r.folder("temp") / job_id).mkdir()
        await r.held(job)
        await r.pipeline.set_aside.fail(job, JobError("too_large", "over max_size_bytes"))
        folder = r.folder("failed") / job_id
        assert (folder / "big.csv").read_bytes() == b"x" * 100
        error = json.loads((folder / "error.json").read_text())
        assert (error["error_class"], error["relative_path"]) == ("too_large", "in/big.csv")
        assert error["how_to_retry"] == f"filedock retry {job_id}"
        assert not (r.folder("proc") / job_id).exists()
        assert not (r.folder("temp") / job_id).exists()
        row = await r.row(job_id)
        assert (row.state, row.outcome, row.failed_path) == ("failed", "set_aside", str(folder))
        assert job_id not in r.pipeline.in_flight
        assert r.kinds(job_id) == ["failed"]


async def test_a_set_aside_the_ledger_did_not_take_is_recorded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(set_aside, "_RECORD_AGAIN_S", 0.05)
    async with rig(tmp_path) as r:
        job_id = "20261207T000000000Z-00000002"
        job = await r.held(r.job_in_proc("big.csv", b"x" * 100, job_id))
        r.pipeline.transitions.ledger = Flaky(r.ledger).fail("update")  # type: ignore[assignment]
        await r.pipeline.set_aside.fail(job, JobError("too_large", "over max_size_bytes"))
        assert (r.folder("failed") / job_id / "error.json").exists()
        assert (await r.row(job_id)).state == "claimed"
        assert job_id in r.pipeline.in_flight  # held until the ledger says so
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.pipeline.later.run)
            with anyio.fail_after(10):
                await r.pipeline.in_flight.wait_idle()
            tg.cancel_scope.cancel()
        row = await r.row(job_id)
        assert (row.state, row.outcome) == ("failed", "set_aside")
        assert r.metrics.ledger_errors._value.get() == 1
