"""The claimer stage in-process: ready files from the intake, claimed into proc/<id>/ with
their ledger rows, handed on to the lane; on real files and a real SQLite ledger."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anyio
from stages import Flaky, rig

from service.pipeline.job import Job


async def test_ready_files_are_claimed_and_handed_to_the_lane(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        contents = {f"f{i}.csv": f"{i}\n".encode() for i in range(3)}
        for name, content in contents.items():
            r.drop(name, content)
        lane = r.pipeline.lanes.get("main")
        assert lane is not None
        jobs: list[Job] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.pipeline.claimer.run, lane)
            for name in contents:
                await r.intake.offer("main", name.encode())
            with anyio.fail_after(10):
                while len(jobs) < len(contents):
                    jobs.append(await lane.receive.receive())
            tg.cancel_scope.cancel()
        assert not list(r.folder("transfer").iterdir())
        for job in jobs:
            content = contents[job.record.name.decode()]
            assert job.vetted and job.rejected is None
            assert job.record.sha256 == hashlib.sha256(content).hexdigest()
            assert (r.folder("proc") / job.id / job.record.name.decode()).read_bytes() == content
            assert (await r.row(job.id)).state == "claimed"
            assert job.id in r.pipeline.in_flight
            assert r.kinds(job.id) == ["claimed"]
        assert r.intake.pending() == 0


async def test_a_file_gone_or_still_written_leaves_no_row(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        lane = r.pipeline.lanes.get("main")
        assert lane is not None
        r.drop("busy.csv", b"half")
        async with anyio.create_task_group() as tg:
            with open(r.folder("transfer") / "busy.csv", "ab") as writer:
                writer.write(b" and more")
                writer.flush()
                tg.start_soon(r.pipeline.claimer.run, lane)
                await r.intake.offer("main", b"busy.csv")
                await r.intake.offer("main", b"gone.csv")  # taken back by the upstream
                with anyio.fail_after(10):
                    await r.pipeline.in_flight.wait_idle()
            tg.cancel_scope.cancel()
        assert (r.folder("transfer") / "busy.csv").exists()
        assert not list(r.folder("proc").iterdir())
        assert await r.ledger.counts() == {}
        assert r.readiness.why_not_ready(lane.route, b"busy.csv", None) is not None
        put_off = r.metrics.registry.get_sample_value(
            "filedock_claims_put_off_total", {"route": "main"}
        )
        assert put_off == 1


async def test_an_insert_whose_answer_was_lost_leaves_one_row_per_file(tmp_path: Path) -> None:
    """The insert commits, its answer is lost: the files stay in transfer/, and their
    rows go before the next insert claims them under new ids."""
    async with rig(tmp_path) as r:
        flaky = Flaky(r.ledger).fail("insert", after=True)
        r.pipeline.transitions.ledger = flaky  # type: ignore[assignment]
        names = [f"f{i}.csv" for i in range(3)]
        for name in names:
            r.drop(name, name.encode())
        lane = r.pipeline.lanes.get("main")
        assert lane is not None
        jobs: list[Job] = []
        for name in names:  # one batch
            await r.intake.offer("main", name.encode())
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.pipeline.claimer.run, lane)
            with anyio.fail_after(10):
                while r.metrics.ledger_errors._value.get() < 1 or r.intake.pending():
                    await anyio.sleep(0.01)
            assert sorted(p.name for p in r.folder("transfer").iterdir()) == names
            assert await r.ledger.counts() == {"claimed": 3}  # committed, answer lost
            for name in names:  # as the next scan does
                await r.intake.offer("main", name.encode())
            with anyio.fail_after(10):
                while len(jobs) < len(names):
                    jobs.append(await lane.receive.receive())
            tg.cancel_scope.cancel()
        rows = await r.ledger.query(limit=None)
        assert sorted(row.id for row in rows) == sorted(job.id for job in jobs)
        assert sorted(bytes(row.relative_path) for row in rows) == [n.encode() for n in names]
