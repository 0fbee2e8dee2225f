"""The retention reaper on real folders in tmp_path and a real ledger (both backends).

Time is an injected clock: folders and rows are made "old" by their job ids and
`updated_at`, never by waiting.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from service.errors import ConfigError
from service.face.metrics import Metrics
from service.ledger import JobRecord, Ledger
from service.settings import Retention, Settings
from service.upkeep.reaper import REAPER_LOCK, Reaper, ReapReport, job_id_time

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC).timestamp()
DAY = 86400.0


# -- fixtures: the same two backends as tests/test_ledger.py ----------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "data"


def make_settings(root: Path, **retention: Any) -> Settings:
    values: dict[str, Any] = {"archive_days": 30, "failed_days": 20, "ledger_days": 40}
    values.update(retention)
    return Settings(root=root, retention=Retention(**values))


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def reaped(metrics: Metrics, kind: str) -> float:
    value = metrics.registry.get_sample_value("filedock_reaped_total", {"kind": kind})
    return value or 0.0


# -- building a tree --------------------------------------------------------------------

_serial = iter(range(1, 1 << 30))


def job_id(age_days: float) -> str:
    """A job id created `age_days` before NOW (with a unique, sortable random part)."""
    stamp = datetime.fromtimestamp(NOW - age_days * DAY, UTC)
    return f"{stamp:%Y%m%dT%H%M%S}{stamp.microsecond // 1000:03d}Z-{next(_serial):08x}"


def archive_dir(root: Path, jid: str) -> Path:
    created = job_id_time(jid)
    assert created is not None
    stamp = datetime.fromtimestamp(created, UTC)
    path = root / "archive" / f"{stamp:%Y/%m/%d}" / jid
    (path / "out").mkdir(parents=True)
    (path / "orders.csv.gz").write_bytes(b"\x1f\x8b data")
    (path / "manifest.json").write_text("{}")
    (path / "out" / "result.txt").write_text("ok")
    return path


def failed_dir(root: Path, jid: str) -> Path:
    path = root / "failed" / jid
    path.mkdir(parents=True)
    (path / "orders.csv").write_bytes(b"id\n1\n")
    (path / "error.json").write_text("{}")
    return path


def row(jid: str, state: str, updated_days_ago: float) -> JobRecord:
    created = job_id_time(jid)
    assert created is not None
    return JobRecord(
        id=jid,
        route="orders",
        name=b"orders.csv",
        relative_path=b"orders.csv",
        state=state,  # type: ignore[arg-type]
        detected_at=created,
        created_at=created,
        updated_at=NOW - updated_days_ago * DAY,
    )


def listing(root: Path) -> list[str]:
    """Every path under `root`, for before/after comparisons."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


async def all_ids(ledger: Ledger) -> list[str]:
    return sorted(r.id for r in await ledger.query(limit=None))


class Scene:
    """A tree and ledger with something on every side of each cutoff (30/20/40 days)."""

    def __init__(self, root: Path, tmp_path: Path) -> None:
        self.rows: list[JobRecord] = []
        self.gone: list[Path] = []
        self.kept: list[Path] = []
        self.rows_gone: list[str] = []
        a, f = root / "archive", root / "failed"

        def archived(age: float, state: str | None, updated: float, goes: bool) -> Path:
            jid = job_id(age)
            path = archive_dir(root, jid)
            (self.gone if goes else self.kept).append(path)
            if state is not None:
                self.rows.append(row(jid, state, updated))
            return path

        def failed(age: float, state: str | None, updated: float, goes: bool) -> Path:
            jid = job_id(age)
            path = failed_dir(root, jid)
            (self.gone if goes else self.kept).append(path)
            if state is not None:
                self.rows.append(row(jid, state, updated))
            return path

        # archive/ (30 days); rows older than 40 days go as well.
        self.oldest = archived(330, None, 0, goes=True)  # its day, month and year empty out
        old = archived(45, "done", 44, goes=True)
        self.rows_gone.append(old.name)
        archived(35, "done", 33, goes=True)  # folder goes, row (33 < 40 days) stays
        self.young_row = archived(35, "done", 25, goes=False)  # row younger: folder stays
        archived(50, "archiving", 50, goes=False)  # unfinished: never reaped
        rowless = archived(31, None, 0, goes=True)  # no row: aged by its id
        # Date folders left empty: the oldest job's day, month and year; two more days.
        day = self.oldest.parent
        self.emptied = [day, day.parent, day.parent.parent, old.parent, rowless.parent]
        archived(29, None, 0, goes=False)
        archived(5, "done", 5, goes=False)
        # Not job folders: left alone whatever their age.
        tmp = a / "2026/09/01" / (job_id(83) + ".tmp")
        tmp.mkdir(parents=True)
        self.kept.append(tmp)
        stray = a / "2026/09/01" / job_id(83)
        stray.write_text("a file named like a job id")
        self.kept.append(stray)
        # A symlink named like a job folder, and a symlinked year: never followed.
        self.secret = tmp_path / "outside" / "secret"
        self.secret.mkdir(parents=True)
        (self.secret / "keep.txt").write_text("not ours")
        link = a / "2026/09/01" / job_id(83)
        link.symlink_to(self.secret, target_is_directory=True)
        self.kept.append(link)
        self.outside_job = tmp_path / "outside" / "01" / "01" / job_id(700)
        self.outside_job.mkdir(parents=True)
        (a / "2024").symlink_to(tmp_path / "outside", target_is_directory=True)
        self.kept.append(a / "2024")

        # failed/ (20 days).
        failed(25, "failed", 24, goes=True)
        failed(25, "failed", 15, goes=False)
        failed(21, None, 0, goes=True)
        failed(19, None, 0, goes=False)
        failed(60, "waiting", 60, goes=False)  # being retried
        failed_tmp = f / (job_id(90) + ".tmp")
        failed_tmp.mkdir()
        self.kept.append(failed_tmp)

        # Rows without folders.
        lone = row(job_id(41), "failed", 41)
        self.rows.append(lone)
        self.rows_gone.append(lone.id)
        self.rows.append(row(job_id(100), "waiting", 100))
        self.rows.append(row(job_id(39), "done", 39))


@pytest.fixture
async def scene(root: Path, tmp_path: Path, ledger: Ledger) -> Scene:
    s = Scene(root, tmp_path)
    await ledger.insert(s.rows)
    return s


# -- tests ----------------------------------------------------------------------------


async def test_old_folders_and_rows_go_young_ones_stay(
    root: Path, ledger: Ledger, scene: Scene
) -> None:
    metrics = Metrics(CollectorRegistry())
    reaper = Reaper(make_settings(root), ledger, metrics, clock=Clock())

    report = await reaper.reap_once(dry_run=False)

    assert not report.errors and report.skipped is None and not report.more
    assert sorted(report.archive + report.failed) == sorted(scene.gone)
    assert sorted(report.ledger) == sorted(scene.rows_gone)
    for path in scene.gone:
        assert not path.exists(), path
    for path in scene.kept:
        assert path.is_symlink() or path.exists(), path
    assert (scene.secret / "keep.txt").read_text() == "not ours"
    assert scene.outside_job.is_dir()
    assert scene.young_row.parent.is_dir()
    ids = await all_ids(ledger)
    assert ids == sorted({r.id for r in scene.rows} - set(scene.rows_gone))

    # Date folders left empty went; those with something in them stayed.
    assert sorted(report.pruned) == sorted(scene.emptied)
    assert not any(p.exists() for p in scene.emptied)
    assert sorted(p.name for p in (root / "archive").iterdir()) == ["2024", "2026"]

    assert reaped(metrics, "archive") == len(report.archive) == 4
    assert reaped(metrics, "failed") == len(report.failed) == 2
    assert reaped(metrics, "ledger") == 2

    # A second pass at the same moment finds nothing more.
    again = await reaper.reap_once(dry_run=False)
    assert again.counts() == {"archive": 0, "failed": 0, "ledger": 0} and not again.pruned


async def test_instances_silent_for_a_week_are_pruned(root: Path, ledger: Ledger) -> None:
    from service.upkeep.replicas import this_instance

    old, recent = (
        this_instance("pod-a", now=NOW - 8 * DAY),
        this_instance("pod-a", now=NOW - 6 * DAY),
    )
    for r in (old, recent):
        assert await ledger.register_replica(r)
    metrics = Metrics(CollectorRegistry())
    reaper = Reaper(make_settings(root), ledger, metrics, clock=Clock())
    await reaper.reap_once(dry_run=True)
    assert len(await ledger.replicas()) == 2
    await reaper.reap_once(dry_run=False)
    assert [r.instance for r in await ledger.replicas()] == [recent.instance]
    assert reaped(metrics, "replicas") == 1


async def test_dry_run_deletes_nothing_and_lists_what_a_real_run_deletes(
    root: Path, ledger: Ledger, scene: Scene
) -> None:
    metrics = Metrics(CollectorRegistry())
    reaper = Reaper(make_settings(root), ledger, metrics, clock=Clock())
    before, rows_before = listing(root), await all_ids(ledger)

    dry = await reaper.reap_once(dry_run=True)

    assert dry.dry_run
    assert listing(root) == before and await all_ids(ledger) == rows_before
    assert all(reaped(metrics, k) == 0 for k in ("archive", "failed", "ledger"))
    assert dry.counts() == {"archive": 4, "failed": 2, "ledger": 2}
    text = dry.render()
    assert text.startswith("would delete 4 archive folder(s), 2 failed folder(s), 2 ledger row(s)")
    assert all(str(p) in text for p in dry.archive + dry.failed + dry.pruned)
    assert json.loads(json.dumps(dry.to_json()))["counts"] == dry.counts()

    real = await reaper.reap_once(dry_run=False)

    assert (real.archive, real.failed, real.ledger, real.pruned) == (
        dry.archive,
        dry.failed,
        dry.ledger,
        dry.pruned,
    )
    gone = set(before) - set(listing(root))
    listed = {str(p.relative_to(root)) for p in dry.archive + dry.failed + dry.pruned}
    assert listed <= gone
    assert all(any(g.startswith(p + "/") or g == p for p in listed) for g in gone)


async def test_batches_are_bounded_and_more_says_when_to_go_on(root: Path, ledger: Ledger) -> None:
    old_archives = [archive_dir(root, job_id(40 - n / 100)) for n in range(7)]
    old_failed = [failed_dir(root, job_id(40 - n / 100)) for n in range(5)]
    old_rows = [row(job_id(50 + n), "done", 50 + n) for n in range(8)]
    await ledger.insert(old_rows)
    young = archive_dir(root, job_id(1))
    metrics = Metrics(CollectorRegistry())
    reaper = Reaper(make_settings(root, batch_size=3), ledger, metrics, clock=Clock())

    first = await reaper.reap_once(dry_run=True)
    assert first.counts() == {"archive": 3, "failed": 3, "ledger": 3} and first.more
    # Oldest first, by job id / updated_at.
    assert first.archive == old_archives[:3]
    assert first.ledger == [r.id for r in old_rows[::-1][:3]]

    reports: list[ReapReport] = []
    while not reports or reports[-1].more:
        reports.append(await reaper.reap_once(dry_run=False))
        assert len(reports) < 10, "the reaper does not converge"

    for report in reports:
        assert all(n <= 3 for n in report.counts().values())
    assert reports[0].archive == first.archive and reports[0].ledger == first.ledger
    assert [p for r in reports for p in r.archive] == old_archives
    assert sorted(p for r in reports for p in r.failed) == old_failed
    assert sum(len(r.ledger) for r in reports) == 8
    assert len(reports) == 3  # 3 + 3 + 2 rows: the third batch is not full
    assert young.is_dir() and await ledger.query() == []
    assert reaped(metrics, "archive") == 7 and reaped(metrics, "ledger") == 8


async def test_the_seven_day_floor_holds(root: Path, ledger: Ledger) -> None:
    for kind in ("archive_days", "failed_days", "ledger_days"):
        with pytest.raises(ValidationError, match=kind):
            Retention(**{kind: 6})
        # Settings built around validation still meet the reaper's own check.
        unchecked = Retention.model_construct(**{**Retention().model_dump(), kind: 6})
        settings = Settings(root=root, retention=unchecked)
        with pytest.raises(ConfigError, match=f"retention.{kind}: 6 is below the 7-day floor"):
            Reaper(settings, ledger, Metrics(CollectorRegistry()), clock=Clock())

    # Seven days is allowed: eight-day-old things go, six-day-old ones stay.
    old, young = failed_dir(root, job_id(8)), failed_dir(root, job_id(6))
    await ledger.insert([row(job_id(8), "done", 8), row(job_id(6), "done", 6)])
    settings = make_settings(root, archive_days=7, failed_days=7, ledger_days=7)
    reaper = Reaper(settings, ledger, Metrics(CollectorRegistry()), clock=Clock())
    report = await reaper.reap_once(dry_run=False)
    assert report.failed == [old] and young.is_dir() and len(report.ledger) == 1

    # Even a retention changed behind the reaper's back is refused at the next pass.
    object.__setattr__(reaper.retention, "failed_days", 1)
    with pytest.raises(ConfigError, match="failed_days"):
        await reaper.reap_once(dry_run=False)
    assert young.is_dir()


async def test_a_folder_that_cannot_be_removed_is_reported_and_does_not_spin(
    root: Path, ledger: Ledger
) -> None:
    stuck = [failed_dir(root, job_id(30 - n / 100)) for n in range(2)]
    after = failed_dir(root, job_id(29))
    reaper = Reaper(
        make_settings(root, batch_size=2), ledger, Metrics(CollectorRegistry()), clock=Clock()
    )
    with undeletable(stuck[0] / "orders.csv"), undeletable(stuck[1] / "orders.csv"):
        report = await reaper.reap_once(dry_run=False)
        # Failed attempts count against the batch; a batch of nothing but failures
        # does not ask for another pass at once.
        assert report.failed == [] and len(report.errors) == 2 and not report.more
        assert "cannot remove" in report.errors[0] and str(stuck[0]) in report.errors[0]
        assert after.is_dir()
    assert all(p.is_dir() for p in stuck)
    report = await reaper.reap_once(dry_run=False)
    assert report.failed == stuck and report.more
    assert (await reaper.reap_once(dry_run=False)).failed == [after]


async def test_run_forever_reaps_each_interval(root: Path, ledger: Ledger) -> None:
    first, second = failed_dir(root, job_id(21)), failed_dir(root, job_id(19))
    clock = Clock()
    settings = make_settings(root, interval_s=0.01)
    reaper = Reaper(settings, ledger, Metrics(CollectorRegistry()), clock=clock)

    async def until_gone(path: Path) -> None:
        with anyio.fail_after(10):
            while path.exists():
                await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(reaper.run_forever)
        await until_gone(first)
        assert second.is_dir()
        clock.now += 2 * DAY
        await until_gone(second)
        tg.cancel_scope.cancel()


async def test_postgres_one_replica_reaps_at_a_time(root: Path, pg_url: str) -> None:
    from service.ledger.postgres import PostgresLedger

    old = failed_dir(root, job_id(30))
    ledger, other = PostgresLedger(pg_url), PostgresLedger(pg_url)
    await ledger.open()
    await other.open()
    try:
        reaper = Reaper(make_settings(root), ledger, Metrics(CollectorRegistry()), clock=Clock())
        async with other.advisory_lock(REAPER_LOCK) as held:
            assert held
            busy = await reaper.reap_once(dry_run=False)
            assert busy.skipped == "another replica is reaping" and old.is_dir()
            assert busy.counts() == {"archive": 0, "failed": 0, "ledger": 0} and not busy.more
            assert (await reaper.reap_once(dry_run=True)).failed == [old]  # reading needs no lock
        assert (await reaper.reap_once(dry_run=False)).failed == [old]
        assert not old.exists()
    finally:
        await ledger.close()
        await other.close()


# -- helpers ------------------------------------------------------------------------------


@contextmanager
def undeletable(path: Path) -> Iterator[None]:
    """Make a file impossible to unlink: a read-only folder, or for root `chattr +i`."""
    if os.geteuid() != 0:
        path.parent.chmod(0o555)
        try:
            yield
        finally:
            path.parent.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", path], check=False).returncode:
        pytest.skip("running as root without a working chattr: cannot make a file stick")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", path], check=True)
