"""The ledger at start (`upkeep/startup.py`): a service waits while its ledger is
unavailable, saying why, and starts once it answers; `run --once` refuses to start;
any other error ends the start at once."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

from service.errors import LedgerUnavailable, StartupError
from service.face.metrics import Metrics
from service.ledger.sqlite import SqliteLedger
from service.upkeep import startup
from service.upkeep.startup import LedgerWait


class Closed:
    """A SQLite ledger that refuses to open its first `refusals` times."""

    def __init__(self, path: Path, refusals: int, error: Exception | None = None) -> None:
        self.ledger = SqliteLedger(path)
        self.refusals = refusals
        self.error = error or LedgerUnavailable("OperationalError: database is locked")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ledger, name)

    async def open(self) -> None:
        if self.refusals:
            self.refusals -= 1
            raise self.error
        await self.ledger.open()


@pytest.fixture(autouse=True)
def quick_tries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(startup, "_FIRST_S", 0.01)


def _wait(ledger: Closed, *, once: bool = False, stop: anyio.Event | None = None) -> LedgerWait:
    metrics = Metrics(CollectorRegistry())
    return LedgerWait(ledger, metrics, stop or anyio.Event(), once=once, shown_url="sqlite:///x")  # type: ignore[arg-type]


async def test_a_service_waits_for_its_ledger_then_registers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Closed(tmp_path / "ledger.sqlite3", refusals=3)
    wait = _wait(ledger)
    with caplog.at_level(logging.ERROR, "filedock.app"), anyio.fail_after(10):
        me = await wait.register("pod-a", 30)
    try:
        assert me is not None and me.name == "pod-a"
        assert wait.metrics.ledger_errors._value.get() == 3
        (line,) = [r for r in caplog.records if "waiting for it" in r.getMessage()]
        assert line.error == "OperationalError: database is locked"  # type: ignore[attr-defined]
    finally:
        await ledger.ledger.close()


async def test_run_once_refuses_to_start(tmp_path: Path) -> None:
    wait = _wait(Closed(tmp_path / "ledger.sqlite3", refusals=1), once=True)
    with pytest.raises(StartupError, match="the ledger at sqlite:///x is unavailable: Opera"):
        await wait.register("pod-a", 30)


async def test_a_stop_ends_the_wait(tmp_path: Path) -> None:
    stop = anyio.Event()
    wait = _wait(Closed(tmp_path / "ledger.sqlite3", refusals=10**6), stop=stop)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: anyio.sleep(0.1))
        stop.set()
        with anyio.fail_after(5):
            assert await wait.register("pod-a", 30) is None


async def test_any_other_error_ends_the_start(tmp_path: Path) -> None:
    wait = _wait(Closed(tmp_path / "ledger.sqlite3", 1, RuntimeError("schema 9 is newer")))
    with pytest.raises(RuntimeError, match="newer"):
        await wait.register("pod-a", 30)
