"""Retries in-process: due jobs from the ledger back to their lane, resumed jobs, and the
calls the service makes again later itself."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import anyio
from stages import Flaky, rig

from service.ledger import JobRecord
from service.pipeline.retries import Later


async def test_later_calls_in_time_order() -> None:
    later, calls = Later(), []

    async def call(n: int) -> None:
        calls.append(n)

    async with anyio.create_task_group() as tg:
        tg.start_soon(later.run)
        later.call(0.2, lambda: call(2))
        later.call(0.05, lambda: call(1))  # sooner than the one already waiting
        with anyio.fail_after(5):
            while len(calls) < 2:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert calls == [1, 2]


async def test_due_jobs_go_back_to_their_lane_and_archiving_ones_to_the_archiver(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r:
        now = time.time()

        def record(n: int, state: str, due: float | None) -> JobRecord:
            return JobRecord(
                id=f"20261207T000000000Z-0000000{n}",
                route="main",
                name=b"x.csv",
                relative_path=b"x.csv",
                state=state,  # type: ignore[arg-type]
                next_attempt_at=due,
                detected_at=now,
                created_at=now,
                updated_at=now,
            )

        due, not_yet = record(1, "waiting", now - 1), record(2, "waiting", now + 3600)
        await r.ledger.insert([due, not_yet])
        assert await r.pipeline.dispatch_due() == 1
        lane = r.pipeline.lanes.get("main")
        assert lane is not None
        queued = lane.receive.receive_nowait()
        assert queued.id == due.id and due.id in r.pipeline.in_flight
        await r.pipeline.resume(due)  # already held: not queued twice
        assert lane.receive.statistics().current_buffer_used == 0

        archiving = record(3, "archiving", None)
        await r.pipeline.resume(archiving)
        taken = r.pipeline.archiver._receive.receive_nowait()
        assert taken.id == archiving.id and taken.outcome == "imported"


async def test_later_goes_on_after_a_call_raises() -> None:
    later, calls = Later(), []

    async def boom() -> None:
        raise RuntimeError("a bug")

    async def call() -> None:
        calls.append(1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(later.run)
        later.call(0.01, boom)
        later.call(0.05, call)
        with anyio.fail_after(5):
            while not calls:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()


async def test_the_scheduler_outlives_a_ledger_that_fails(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        now = time.time()
        job = JobRecord(
            "20261207T000000000Z-0000000a",
            "main",
            b"a.csv",
            b"a.csv",
            state="waiting",
            next_attempt_at=now - 1,
            detected_at=now,
            created_at=now,
            updated_at=now,
        )
        await r.ledger.insert([job])
        r.pipeline.retries.ledger = Flaky(r.ledger).fail("take_due", 2)  # type: ignore[assignment]
        lane = r.pipeline.lanes.get("main")
        assert lane is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(r.pipeline.retries.run, interval_s=0.01))
            with anyio.fail_after(10):
                taken = await lane.receive.receive()
            tg.cancel_scope.cancel()
        assert taken.id == job.id
        assert r.metrics.ledger_errors._value.get() == 2
