"""The checks before an import, in-process: each ends in a verdict, and changes no state."""

from __future__ import annotations

from pathlib import Path

from stages import rig

from service.errors import JobError
from service.pipeline.checks import Duplicate, Import, SetAside, WaitRetry


async def test_verdicts(tmp_path: Path) -> None:
    async with rig(tmp_path, duplicates="skip") as r:
        lane = r.pipeline.lanes.get("main")
        assert lane is not None
        route = lane.route
        checks = r.pipeline.workers.checks
        fresh = r.job_in_proc("a.csv", b"a\n", "20261207T000000000Z-0000000a")
        fresh.record.sha256 = None  # as claimed, before it was hashed
        assert isinstance(await checks.verdict(route, fresh), Import)
        assert fresh.record.sha256 is not None  # vetted and hashed

        rejected = r.job_in_proc("b.csv", b"b\n", "20261207T000000000Z-0000000b")
        rejected.rejected = JobError("symlink", "a symbolic link")
        verdict = await checks.verdict(route, rejected)
        assert isinstance(verdict, SetAside) and verdict.outcome == "set_aside"

        original = r.job_in_proc("c.csv", b"same\n", "20261207T000000000Z-0000000c")
        original.record.state = "done"
        await r.ledger.insert([original.record])
        again = r.job_in_proc("d.csv", b"same\n", "20261207T000000000Z-0000000d")
        verdict = await checks.verdict(route, again)
        assert verdict == Duplicate(original.id)

        used_up = r.job_in_proc("e.csv", b"e\n", "20261207T000000000Z-0000000e")
        used_up.record.history = [{"n": n, "result": "timeout"} for n in (1, 2, 3)]
        verdict = await checks.verdict(route, used_up)
        assert isinstance(verdict, SetAside) and verdict.outcome == "exhausted"

        written = r.job_in_proc("f.csv", b"f\n", "20261207T000000000Z-0000000f")
        with open(r.folder("proc") / written.id / "f.csv", "ab"):
            verdict = await checks.verdict(route, written)
        assert isinstance(verdict, WaitRetry)
        assert verdict.error.error_class == "modified_during_processing"
        assert r.events == []  # the checks change no state
