"""The checks before an import, in-process: each ends in a verdict, and changes no state."""

from __future__ import annotations

import time
from pathlib import Path

from stages import Rig, rig

from service.errors import JobError
from service.ledger import JobRecord
from service.pipeline.checks import Duplicate, Import, SetAside, WaitRetry
from service.pipeline.job import Job


def _claimed(r: Rig, name: str, content: bytes, job_id: str) -> Job:
    folder = r.folder("proc") / job_id
    folder.mkdir()
    (folder / name).write_bytes(content)
    now = time.time()
    record = JobRecord(
        id=job_id,
        route="main",
        name=name.encode(),
        relative_path=name.encode(),
        detected_at=now,
        created_at=now,
        updated_at=now,
    )
    return Job(record)


async def test_verdicts(tmp_path: Path) -> None:
    async with rig(tmp_path, duplicates="skip") as r:
        lane = r.pipeline.lanes.get("main")
        assert lane is not None
        route = lane.route
        checks = r.pipeline.workers.checks
        fresh = _claimed(r, "a.csv", b"a\n", "20261207T000000000Z-0000000a")
        assert isinstance(await checks.verdict(route, fresh), Import)
        assert fresh.record.sha256 is not None  # vetted and hashed

        rejected = _claimed(r, "b.csv", b"b\n", "20261207T000000000Z-0000000b")
        rejected.rejected = JobError("symlink", "a symbolic link")
        verdict = await checks.verdict(route, rejected)
        assert isinstance(verdict, SetAside) and verdict.outcome == "set_aside"

        original = _claimed(r, "c.csv", b"same\n", "20261207T000000000Z-0000000c")
        await checks.verdict(route, original)
        original.record.state = "done"
        await r.ledger.insert([original.record])
        again = _claimed(r, "d.csv", b"same\n", "20261207T000000000Z-0000000d")
        verdict = await checks.verdict(route, again)
        assert verdict == Duplicate(original.id)

        used_up = _claimed(r, "e.csv", b"e\n", "20261207T000000000Z-0000000e")
        used_up.record.history = [{"n": n, "result": "timeout"} for n in (1, 2, 3)]
        verdict = await checks.verdict(route, used_up)
        assert isinstance(verdict, SetAside) and verdict.outcome == "exhausted"

        written = _claimed(r, "f.csv", b"f\n", "20261207T000000000Z-0000000f")
        with open(r.folder("proc") / written.id / "f.csv", "ab"):
            verdict = await checks.verdict(route, written)
        assert isinstance(verdict, WaitRetry)
        assert verdict.error.error_class == "modified_during_processing"
        assert r.events == []  # the checks change no state
