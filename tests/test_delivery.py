"""The delivery stage in-process: each imported job goes to every sink of its route (a
folder on a second filesystem, a real HTTP receiver), then to the archive with its
receipts; a failing sink is retried alone, a sink that fails for good sets the job
aside, and `filedock retry` sends it only where it has not arrived."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from conftest import Mount, free_port
from http_receiver import Receiver
from stages import Rig, rig

from service.face.retry import retry_job
from service.pipeline.job import Job

JOB = "20261207T101500000Z-0000000"


def share(root: Path, **options: Any) -> dict[str, Any]:
    return {"name": "share", "kind": "directory", "path": str(root), **options}


def web(url: str, **options: Any) -> dict[str, Any]:
    return {"name": "web", "kind": "http", "url": f"{url}/in/{{name}}", "backoff_s": 0, **options}


@asynccontextmanager
async def running(r: Rig) -> AsyncIterator[None]:
    """The stages a claimed job passes through, until the block ends."""
    await r.pipeline.open()
    await r.pipeline.writer.start()
    lane = r.pipeline.lanes.get("main")
    assert lane is not None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.pipeline.workers.run, lane)
            tg.start_soon(r.pipeline.delivery.run)
            tg.start_soon(r.pipeline.archiver.run)
            tg.start_soon(r.pipeline.later.run)
            yield
            tg.cancel_scope.cancel()
    finally:
        await r.pipeline.aclose()


async def claimed(r: Rig, n: int, content: bytes, name: str = "") -> Job:
    """A job claimed into proc/ and queued in its lane, as the claimer leaves it."""
    job = await r.held(r.job_in_proc(name or f"f{n}.csv", content, f"{JOB}{n}"))
    lane = r.pipeline.lanes.get("main")
    assert lane is not None
    await r.pipeline.lanes.enqueue(lane, job)
    return job


async def idle(r: Rig) -> None:
    with anyio.fail_after(30):
        await r.pipeline.in_flight.wait_idle(include_intake=False)


async def sinks(r: Rig, job: Job) -> dict[str, Any]:
    return {d.sink: d for d in await r.ledger.deliveries(job.id)}


def manifest(row_archive_path: str | None) -> dict[str, Any]:
    return dict(json.loads((Path(row_archive_path or "") / "manifest.json").read_text()))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_a_job_goes_to_every_sink_then_to_the_archive_with_its_receipts(
    tmp_path: Path, mount: Mount, receiver: Receiver
) -> None:
    root = mount()
    body = b"id,amount\n1,10\n"
    async with rig(tmp_path, deliver=[share(root), web(receiver.url)]) as r:
        async with running(r):
            job = await claimed(r, 1, body)
            await idle(r)
        row = await r.row(job.id)
        assert (row.state, row.outcome) == ("done", "imported")
        assert (root / "f1.csv").read_bytes() == body
        assert receiver.stored == {"/in/f1.csv": body} and receiver.writes == ["/in/f1.csv"]
        rows = await sinks(r, job)
        assert {k: (v.state, v.attempts) for k, v in rows.items()} == {
            "share": ("delivered", 1),
            "web": ("delivered", 1),
        }
        assert rows["share"].receipts[0]["location"] == str(root / "f1.csv")
        assert rows["web"].receipts[0]["remote"]["status"] == 201
        doc = manifest(row.archive_path)
        assert [(d["sink"], d["state"]) for d in doc["deliveries"]] == [
            ("share", "delivered"),
            ("web", "delivered"),
        ]
        assert all(d["receipts"][0]["sha256"] == sha(body) for d in doc["deliveries"])
        kinds = r.kinds(job.id)
        assert kinds.index("delivering") < kinds.index("archiving") < kinds.index("done")
        assert kinds.count("delivery") == 2
        delivered = r.metrics.deliveries.labels("main", "web", "delivered")._value.get()
        assert delivered == 1
        assert r.metrics.delivery_bytes.labels("main", "share")._value.get() == len(body)
        assert not list(r.folder("proc").iterdir())


async def test_a_failing_sink_is_retried_alone(
    tmp_path: Path, mount: Mount, receiver: Receiver
) -> None:
    root = mount()
    receiver.fail(503)
    async with rig(tmp_path, deliver=[share(root), web(receiver.url)]) as r:
        async with running(r):
            job = await claimed(r, 1, b"payload\n")
            await idle(r)  # released to wait for the web sink's retry
            assert (await r.row(job.id)).state == "delivering"
            rows = await sinks(r, job)
            assert (rows["share"].state, rows["web"].state) == ("delivered", "waiting")
            assert rows["web"].error_class == "sink_error"
            assert await r.pipeline.dispatch_due() == 1  # backoff_s 0: due at once
            await idle(r)
        assert (await r.row(job.id)).state == "done"
        rows = await sinks(r, job)
        assert (rows["share"].attempts, rows["web"].attempts) == (1, 2)  # share: never again
        assert receiver.writes == ["/in/f1.csv"]
        outcomes = [e.outcome for e in r.events if e.kind == "delivery"]
        assert sorted(o or "" for o in outcomes) == ["delivered", "delivered", "retry"]


async def test_a_lost_acknowledgement_is_recognised_and_nothing_is_sent_twice(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.drop()  # stores the body, then cuts the answer short
    async with rig(tmp_path, importer="none", deliver=[web(receiver.url)]) as r:
        async with running(r):
            job = await claimed(r, 1, b"once only\n")
            await idle(r)
            assert await r.pipeline.dispatch_due() == 1
            await idle(r)
        assert (await r.row(job.id)).state == "done"
        web_row = (await sinks(r, job))["web"]
        assert (web_row.state, web_row.attempts) == ("delivered", 2)
        assert receiver.writes == ["/in/f1.csv"]  # the retry was answered from its key
        keys = {s.headers["idempotency-key"] for s in receiver.seen}
        assert len(keys) == 1 and len(receiver.seen) == 2


async def test_a_sink_that_fails_for_good_sets_the_job_aside_and_retry_goes_only_there(
    tmp_path: Path, mount: Mount, receiver: Receiver
) -> None:
    root = mount()
    receiver.fail(400, body="no such customer")
    async with rig(tmp_path, deliver=[share(root), web(receiver.url)]) as r:
        async with running(r):
            job = await claimed(r, 1, b"data\n")
            await idle(r)
            row = await r.row(job.id)
            assert (row.state, row.error_class) == ("failed", "delivery_failed")
            assert "web: sink_rejected" in (row.error or "")
            error = json.loads((r.folder("failed") / job.id / "error.json").read_text())
            by_sink = {d["sink"]: d for d in error["deliveries"]}
            assert by_sink["share"]["state"] == "delivered"
            assert by_sink["share"]["receipts"][0]["location"] == str(root / "f1.csv")
            assert (by_sink["web"]["state"], by_sink["web"]["error_class"]) == (
                "failed",
                "sink_rejected",
            )
            assert "--sink" in error["how_to_retry"]
            assert receiver.writes == []

            assert await retry_job(r.settings, r.ledger, row, sink="nope") is not None
            assert await retry_job(r.settings, r.ledger, row, sink="web") is None
            assert (await r.row(job.id)).state == "delivering"
            assert await r.pipeline.dispatch_due() == 1
            await idle(r)
        row = await r.row(job.id)
        assert (row.state, row.outcome) == ("done", "imported")
        rows = await sinks(r, job)
        assert (rows["share"].attempts, rows["web"].attempts) == (1, 1)  # web started afresh
        assert receiver.writes == ["/in/f1.csv"]
        assert (root / "f1.csv").read_bytes() == b"data\n"


async def test_without_an_importer_a_file_is_received_delivered_and_archived(
    tmp_path: Path, mount: Mount
) -> None:
    root = mount()
    async with rig(tmp_path, importer="none", deliver=[share(root, target="{route}/{name}")]) as r:
        async with running(r):
            job = await claimed(r, 1, b"as received\n")
            await idle(r)
        row = await r.row(job.id)
        assert (row.state, row.outcome, row.attempts) == ("done", "imported", 0)
        assert "importing" not in r.kinds(job.id)
        assert (root / "main" / "f1.csv").read_bytes() == b"as received\n"


async def test_outputs_are_sent_each_under_its_own_name(tmp_path: Path, mount: Mount) -> None:
    root = mount()
    sink = share(root, send="outputs", target="{job_id}/{relative_path}")
    async with rig(tmp_path, importer="stages:two_outputs", deliver=[sink]) as r:
        async with running(r):
            job = await claimed(r, 1, b"abc")
            await idle(r)
        assert (await r.row(job.id)).state == "done"
        assert (root / job.id / "upper.txt").read_bytes() == b"ABC"
        assert (root / job.id / "parts" / "len.txt").read_bytes() == b"3"
        receipts = (await sinks(r, job))["share"].receipts
        assert [Path(x["location"]).name for x in receipts] == ["len.txt", "upper.txt"]
        assert receipts[1]["sha256"] == sha(b"ABC")


async def test_other_bytes_under_the_name_fail_the_sink_at_once(
    tmp_path: Path, mount: Mount
) -> None:
    root = mount()
    (root / "f1.csv").write_bytes(b"someone else's\n")
    async with rig(tmp_path, deliver=[share(root, backoff_s=0)]) as r:
        async with running(r):
            job = await claimed(r, 1, b"ours\n")
            await idle(r)
        row = await r.row(job.id)
        assert (row.state, row.error_class) == ("failed", "delivery_failed")
        share_row = (await sinks(r, job))["share"]
        assert (share_row.state, share_row.error_class, share_row.attempts) == (
            "failed",
            "remote_exists",
            1,
        )
        assert (root / "f1.csv").read_bytes() == b"someone else's\n"


async def test_a_sink_that_keeps_failing_pauses_without_using_up_attempts(
    tmp_path: Path,
) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sink = web(down, breaker_failures=2, breaker_pause_s=600, max_attempts=3, concurrency=1)
    async with rig(tmp_path, importer="none", deliver=[sink]) as r:
        async with running(r):
            jobs = [await claimed(r, n, b"x") for n in (1, 2, 3)]
            await idle(r)
        rows = [(await sinks(r, job))["web"] for job in jobs]
        assert all(row.state == "waiting" for row in rows)
        assert all(row.error_class == "sink_unreachable" for row in rows[:2])
        assert sorted(row.attempts for row in rows) == [0, 1, 1]  # the third one paused
        paused = [e for e in r.events if e.kind == "delivery" and e.outcome == "paused"]
        assert len(paused) == 1
        later = [row for row in rows if (row.next_attempt_at or 0) > paused[0].at + 500]
        assert len(later) == 2  # the failure that paused it and the paused one
        r.pipeline.delivery.show_paused()
        assert r.metrics.sink_paused.labels("main", "web")._value.get() == 1
