"""The heartbeat: it writes this instance's row and renews its jobs' leases, and says
why it is not current when it cannot (what `/readyz` reports)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from service.face.http import Health
from service.face.metrics import Metrics
from service.ledger import JobRecord
from service.ledger.sqlite import SqliteLedger
from service.pipeline.heartbeat import Heartbeat
from service.settings import Settings
from service.upkeep.replicas import this_instance

NOW = 1_800_000_000.0


class Unwritable:
    """A ledger that answers but cannot write the heartbeat (say, a table gone)."""

    def __init__(self, ledger: SqliteLedger) -> None:
        self._ledger = ledger

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)

    async def replica_heartbeat(self, replica: Any) -> None:
        raise OSError("no room")


async def test_a_beat_writes_the_row_and_the_leases(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    try:
        settings = Settings(root=tmp_path, lease_s=30)
        me = this_instance("pod-a", now=NOW)
        assert await ledger.register_replica(me)
        job = JobRecord(
            "20270115T000000001Z-00000001",
            "main",
            b"a",
            b"a",
            state="importing",
            owner=me.instance,
            lease_expires_at=NOW + 30,
        )
        await ledger.insert([job])
        beat = Heartbeat(settings, ledger, Metrics(CollectorRegistry()), me)
        await beat.beat(NOW + 10)
        (row,) = await ledger.replicas()
        assert (row.heartbeat_at, row.jobs) == (NOW + 10, 1)
        assert (await ledger.get(job.id)).lease_expires_at == NOW + 40  # type: ignore[union-attr]
        assert beat.problem(NOW + 40) is None  # written lease_s ago: still current
        assert beat.problem(NOW + 41) == "last written 31 s ago, over lease_s (30 s)"
    finally:
        await ledger.close()


async def test_readyz_says_why_the_heartbeat_is_not_written(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    try:
        metrics = Metrics(CollectorRegistry())
        me = this_instance("pod-a", now=NOW)
        beat = Heartbeat(Settings(root=tmp_path, lease_s=30), Unwritable(ledger), metrics, me)  # type: ignore[arg-type]
        health = Health(ledger, metrics, {"state": tmp_path}, 0, recovery_done=True)
        health.heartbeat = lambda: beat.problem(NOW + 12)
        assert await health.ready() == (True, {})
        await beat.beat(NOW + 10)
        ok, reasons = await health.ready()
        assert not ok
        assert reasons == {"heartbeat": "last written 12 s ago, error OSError('no room')"}
        assert metrics.ledger_errors._value.get() == 1
    finally:
        await ledger.close()


async def test_steady_only_after_lease_s_of_beats_written_in_time(tmp_path: Path) -> None:
    """Whether this process may judge the others by their silence: not for `lease_s`
    after its start, nor after a beat that failed or came late."""
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    try:
        me = this_instance("pod-a", now=NOW)
        assert await ledger.register_replica(me)
        settings = Settings(root=tmp_path, lease_s=30)
        beat = Heartbeat(settings, ledger, Metrics(CollectorRegistry()), me)
        for t in range(10, 31, 10):
            await beat.beat(NOW + t)
        assert not beat.steady(NOW + 29) and beat.steady(NOW + 30)
        away = Heartbeat(settings, Unwritable(ledger), beat.metrics, me)  # type: ignore[arg-type]
        away.steady_since, away.written_at = beat.steady_since, beat.written_at
        await away.beat(NOW + 40)
        assert not away.steady(NOW + 40)
        beat.steady_since, beat.written_at = None, NOW + 30
        await beat.beat(NOW + 50)  # the ledger answers again
        assert not beat.steady(NOW + 79) and beat.steady(NOW + 81)
        await beat.beat(NOW + 80)  # 30 s after the last one: more than 1.5 beats apart
        assert not beat.steady(NOW + 100) and beat.steady(NOW + 111)
    finally:
        await ledger.close()


async def test_readyz_names_the_ledger_and_how_long_it_has_failed(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    metrics = Metrics(CollectorRegistry())
    health = Health(ledger, metrics, {"state": tmp_path}, 0, recovery_done=True)
    try:
        ledger.reach.failed(OSError("database is locked"))
        ledger.reach.down_since = (ledger.reach.down_since or 0) - 12
        await ledger.close()  # the ping cannot be answered
        ok, reasons = await health.ready()
        assert not ok
        assert reasons == {"ledger": "not writable since 12 s: OSError: database is locked"}
        assert metrics.ledger_errors._value.get() == 1  # the ping counts
    finally:
        await ledger.close()
