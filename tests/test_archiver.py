"""The archiver in-process: imported jobs to archive/…/<id>/, `done`, sources removed; a
job whose file a writer still holds open is not archived until the writer has closed it."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import anyio
from stages import Rig, rig

from service.pipeline.job import Job


async def _imported(r: Rig, name: str, content: bytes) -> Job:
    job = await r.held(r.job_in_proc(name, content, "20261207T000000000Z-0000000" + name[0]))
    return r.pipeline.transitions.bound_for_archive(job, "imported", None, r.folder("archive"))


async def test_imported_jobs_are_archived_and_leave_proc(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await r.pipeline.writer.start()
        route = r.settings.routes[0]
        jobs = [await _imported(r, f"{c}.csv", c.encode() * 10) for c in "abc"]
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.pipeline.archiver.run)
            await r.pipeline.archiver.submit(route, jobs)
            with anyio.fail_after(20):
                await r.pipeline.in_flight.wait_idle()
            tg.cancel_scope.cancel()
        for job in jobs:
            row = await r.row(job.id)
            assert row.state == "done"
            folder = Path(row.archive_path or "")
            manifest = json.loads((folder / "manifest.json").read_text())
            data = gzip.decompress((folder / manifest["files"][0]["name"]).read_bytes())
            assert hashlib.sha256(data).hexdigest() == row.sha256
            assert r.kinds(job.id) == ["archiving", "done"]
        assert not list(r.folder("proc").iterdir())


async def test_a_file_open_for_writing_is_archived_only_once_closed(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await r.pipeline.writer.start()
        route = r.settings.routes[0]
        job = await _imported(r, "d.csv", b"complete\n")
        path = r.folder("proc") / job.id / "d.csv"
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.pipeline.archiver.run)
            tg.start_soon(r.pipeline.later.run)
            with open(path, "rb+"):  # a writer holds it open, writing nothing
                await r.pipeline.archiver.submit(route, [job])
                with anyio.fail_after(10):
                    while job.archive_tries == 0:
                        await anyio.sleep(0.01)
                assert (await r.row(job.id)).state == "archiving"
                assert not (Path(job.record.archive_path or "")).exists()
            with anyio.fail_after(20):  # closed: the retry (after 1 s) archives it
                await r.pipeline.in_flight.wait_idle()
            tg.cancel_scope.cancel()
        assert (await r.row(job.id)).state == "done"
