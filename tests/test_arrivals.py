"""Arrival expectations: the schedule's deadlines through daylight-saving changes, and
each window judged once, on a real ledger (both backends), with the clock injected:
`Judge.due(now)` is one pass at `now`."""

from __future__ import annotations

import doctest
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import date, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

import service.arrivals.schedule
from service.arrivals import Judge, deadlines
from service.face.metrics import Metrics
from service.ledger import JobRecord, Ledger, ledger_for_url
from service.notify.events import Outbox
from service.settings import Expectation, Settings

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str) -> float:
    """A local Berlin time as Unix seconds; `fold=1` picks the repeated hour's second pass."""
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN).timestamp()


def local(ts: float) -> str:
    return datetime.fromtimestamp(ts, BERLIN).isoformat()


def first(n: int, moments: Iterator[float]) -> list[str]:
    return [local(ts) for ts in islice(moments, n)]


def settings(tmp_path: Path, **expectation: Any) -> Settings:
    expect = {"name": "orders-daily", "schedule": "0 6 * * 1-5", "timezone": "Europe/Berlin"}
    expect.update(expectation)
    return Settings(
        root=tmp_path,
        routes=[
            {
                "name": "orders",
                "match": "**",
                "importer": "none",
                "expect": [expect],
            }
        ],
        notify=[
            {
                "name": "ops",
                "kind": "webhook",
                "url": "http://127.0.0.1:9/hooks",
                "secret": {"env": "NEVER_READ_HERE"},
            }
        ],
    )


class Rig:
    """A ledger, the judge of one or more replicas on it, and files that arrive."""

    def __init__(self, s: Settings, ledger: Ledger) -> None:
        self.settings, self.ledger = s, ledger
        self.metrics = Metrics(CollectorRegistry())
        self.judge = self.replica("replica-a", ledger)
        self._n = 0

    def replica(self, owner: str, ledger: Ledger) -> Judge:
        return Judge(self.settings, ledger, self.metrics, Outbox(self.settings.notify), owner)

    async def arrive(self, when: float, rel: str = "orders.csv", state: str = "done") -> None:
        self._n += 1
        await self.ledger.insert(
            [
                JobRecord(
                    id=f"job-{self._n:04d}",
                    route="orders",
                    name=rel.rpartition("/")[2].encode(),
                    relative_path=rel.encode(),
                    state=state,  # type: ignore[arg-type]
                    detected_at=when,
                    created_at=when,
                    updated_at=when,
                )
            ]
        )

    async def judgements(self) -> list[tuple[str, str]]:
        """(local deadline, judgement) of every judged window, oldest first."""
        rows = await self.ledger.windows("orders", "orders-daily", 1000)
        return [
            (local(w.deadline), w.judgement) for w in reversed(rows) if w.judgement != "watching"
        ]

    async def events(self) -> list[tuple[str, str]]:
        rows = await self.ledger.outbox_query(pending_only=False, limit=1000)
        return sorted((r.payload["data"]["deadline_local"], r.type) for r in rows)

    def gauge(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(
            f"filedock_{name}", {"route": "orders", "expectation": "orders-daily"}
        )


OpenRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig(tmp_path: Path, backend_url: str) -> AsyncIterator[OpenRig]:
    opened: list[Ledger] = []

    async def factory(**expectation: Any) -> Rig:
        ledger = ledger_for_url(backend_url)
        await ledger.open()
        opened.append(ledger)
        return Rig(settings(tmp_path, **expectation), ledger)

    yield factory
    for ledger in opened:
        await ledger.close()


# -- the schedule ----------------------------------------------------------------------


def test_the_schedule_docstring_examples_hold() -> None:
    assert doctest.testmod(service.arrivals.schedule).failed == 0


def test_weekday_deadlines_keep_their_local_time_across_both_dst_changes() -> None:
    weekdays = Expectation(name="x", schedule="0 6 * * 1-5", timezone="Europe/Berlin")
    spring = first(3, deadlines(weekdays, at("2026-03-26T12:00")))
    assert spring == [
        "2026-03-27T06:00:00+01:00",
        "2026-03-30T06:00:00+02:00",  # after the Sunday the clocks went forward
        "2026-03-31T06:00:00+02:00",
    ]
    autumn = first(3, deadlines(weekdays, at("2026-10-22T12:00")))
    assert autumn == [
        "2026-10-23T06:00:00+02:00",
        "2026-10-26T06:00:00+01:00",  # after the Sunday the clocks went back
        "2026-10-27T06:00:00+01:00",
    ]
    # The window over each DST weekend is an hour shorter, then an hour longer.
    assert at("2026-03-30T06:00") - at("2026-03-27T06:00") == timedelta(hours=71).total_seconds()
    assert at("2026-10-26T06:00") - at("2026-10-23T06:00") == timedelta(hours=73).total_seconds()


def test_a_0230_deadline_moves_past_the_spring_gap_and_is_kept_once_in_autumn() -> None:
    nightly = Expectation(name="x", schedule="30 2 * * *", timezone="Europe/Berlin")
    spring = first(2, deadlines(nightly, at("2026-03-28T12:00")))
    # 02:30 does not exist on 29 March: the deadline is the first moment after the gap.
    assert spring == ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]
    autumn = first(2, deadlines(nightly, at("2026-10-24T12:00")))
    # 02:30 happens twice on 25 October: one deadline, at the first.
    assert autumn == ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("schedule", "0 25 * * *", "invalid cron expression '0 25 * * *'"),
        ("schedule", "every day", "invalid cron expression"),
        ("timezone", "Europe/Berln", "unknown time zone 'Europe/Berln'"),
        ("min_files", 0, "greater than or equal to 1"),
        ("match", "../x", "without / or .."),
    ],
)
def test_a_bad_expectation_is_refused_with_the_reason(
    tmp_path: Path, field: str, value: Any, message: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        settings(tmp_path, **{field: value})


def test_two_expectations_of_one_name_are_refused(tmp_path: Path) -> None:
    twice = {"name": "a", "schedule": "0 6 * * *"}
    with pytest.raises(ValidationError, match="two expectations are named 'a'"):
        Settings(
            root=tmp_path,
            routes=[{"name": "r", "importer": "none", "match": "*", "expect": [twice, twice]}],
        )


# -- the judgements ---------------------------------------------------------------------


async def test_each_window_is_judged_once_on_time_or_missing(rig: OpenRig) -> None:
    r = await rig()
    assert await r.judge.due(at("2026-03-02T12:00")) == []  # first sight: nothing to judge
    await r.arrive(at("2026-03-03T05:10"))  # Tuesday's file, in time
    await r.judge.due(at("2026-03-03T06:00:05"))
    assert await r.judge.due(at("2026-03-03T06:00:10")) == []  # judged already
    # Wednesday's never comes.
    await r.judge.due(at("2026-03-04T06:00:05"))
    assert await r.judgements() == [
        ("2026-03-03T06:00:00+01:00", "on_time"),
        ("2026-03-04T06:00:00+01:00", "missing"),
    ]
    assert await r.events() == [("2026-03-04 06:00 CET", "filedock.arrival.missing")]
    assert r.gauge("expectation_missing") == 1
    assert r.gauge("expectation_next_deadline_timestamp_seconds") == at("2026-03-05T06:00")
    counted = {"route": "orders", "expectation": "orders-daily", "judgement": "missing"}
    assert r.metrics.registry.get_sample_value("filedock_arrival_windows_total", counted) == 1
    # The missing file comes after all: the gauge clears at the next pass.
    await r.arrive(at("2026-03-04T09:00"))
    await r.judge.due(at("2026-03-04T09:00:05"))
    assert r.gauge("expectation_missing") == 0


async def test_a_file_within_the_grace_is_late_and_not_counted_again(rig: OpenRig) -> None:
    r = await rig(grace_s=1800)
    await r.judge.due(at("2026-03-02T12:00"))
    await r.arrive(at("2026-03-03T06:20"))  # 20 minutes late, within the grace
    assert await r.judge.due(at("2026-03-03T06:10")) == []  # the grace is still running
    await r.judge.due(at("2026-03-04T06:31"))
    # The late file is Tuesday's: Wednesday, with no file of its own, is missing.
    assert await r.judgements() == [
        ("2026-03-03T06:00:00+01:00", "late"),
        ("2026-03-04T06:00:00+01:00", "missing"),
    ]
    assert await r.events() == [
        ("2026-03-03 06:00 CET", "filedock.arrival.late"),
        ("2026-03-04 06:00 CET", "filedock.arrival.missing"),
    ]


async def test_files_that_came_but_failed_make_a_failed_window(rig: OpenRig) -> None:
    r = await rig(min_files=2, match="orders_*.csv")
    await r.judge.due(at("2026-03-02T12:00"))
    await r.arrive(at("2026-03-03T01:00"), "orders_1.csv")
    await r.arrive(at("2026-03-03T02:00"), "orders_2.csv", state="failed")
    await r.arrive(at("2026-03-03T03:00"), "notes.txt")  # not what is expected
    await r.judge.due(at("2026-03-03T06:00:05"))
    [window] = await r.ledger.windows("orders", "orders-daily", 1)
    assert (window.judgement, window.files, window.failed) == ("failed", 2, 1)
    [event] = await r.ledger.outbox_query(pending_only=False, limit=10)
    assert event.type == "filedock.arrival.failed"
    assert event.payload["data"]["message"] == (
        "2 files matching 'orders_*.csv' arrived by 2026-03-03 06:00 CET, but 1 of them"
        " failed: fewer than 2 went through"
    )


async def test_a_skipped_holiday_has_no_deadline_and_its_window_runs_on(rig: OpenRig) -> None:
    r = await rig(skip_dates=[date(2026, 12, 25)])
    await r.judge.due(at("2026-12-23T12:00"))
    await r.arrive(at("2026-12-25T10:00"))  # one file over the holiday: for the 28th
    await r.judge.due(at("2026-12-28T06:00:05"))
    assert await r.judgements() == [
        ("2026-12-24T06:00:00+01:00", "missing"),
        ("2026-12-28T06:00:00+01:00", "on_time"),
    ]


async def test_windows_missed_while_stopped_are_judged_once_at_the_next_start(
    rig: OpenRig,
) -> None:
    first = await rig()
    await first.judge.due(at("2026-03-02T12:00"))
    await first.arrive(at("2026-03-03T05:00"))
    await first.ledger.close()
    # Stopped from Monday noon until Thursday noon; then a new process on the ledger.
    restarted = await rig()
    written = await restarted.judge.due(at("2026-03-05T12:00"))
    assert [w.judgement for w in written] == ["on_time", "missing", "missing"]
    assert await restarted.judge.due(at("2026-03-05T12:00:30")) == []
    again = await rig()  # and once more: nothing is judged twice
    assert await again.judge.due(at("2026-03-05T12:01")) == []
    assert await restarted.events() == [
        ("2026-03-04 06:00 CET", "filedock.arrival.missing"),
        ("2026-03-05 06:00 CET", "filedock.arrival.missing"),
    ]


async def test_the_repeated_autumn_hour_is_one_window(rig: OpenRig) -> None:
    r = await rig(schedule="30 2 * * *")
    await r.judge.due(at("2026-10-24T12:00"))
    # Each pass through the repeated hour: the second 02:30 is no deadline of its own.
    await r.judge.due(datetime(2026, 10, 25, 2, 31, tzinfo=BERLIN).timestamp())
    await r.judge.due(datetime(2026, 10, 25, 2, 31, fold=1, tzinfo=BERLIN).timestamp())
    await r.judge.due(at("2026-10-25T12:00"))
    assert await r.judgements() == [("2026-10-25T02:30:00+02:00", "missing")]


async def test_two_replicas_judge_each_window_once_with_one_event(
    tmp_path: Path, pg_url: str
) -> None:
    ledgers = [ledger_for_url(pg_url) for _ in range(2)]
    for ledger in ledgers:
        await ledger.open()
    try:
        r = Rig(settings(tmp_path), ledgers[0])
        judges = [r.judge, r.replica("replica-b", ledgers[1])]
        await r.judge.due(at("2026-03-02T12:00"))
        await r.arrive(at("2026-03-03T05:00"))
        written: list[list[Any]] = [[], []]

        async def judge(i: int) -> None:
            written[i] = await judges[i].due(at("2026-03-13T12:00"))

        async with anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(judge, i)
        judged = await r.judgements()
        assert len(judged) == 9  # the weekdays from the 3rd to the 13th
        assert len(written[0]) + len(written[1]) == 9
        assert len(await r.events()) == 8  # each missing window once
    finally:
        for ledger in ledgers:
            await ledger.close()
