"""The durability barrier's modes: one syncfs(), an fsync per path on threads, or the
cheaper of the two by what each has cost (`auto`). Durability itself needs a power
cut to prove; what is checked here is that each mode syncs every path it was given
(an error on one fails the flush) and that `auto` chooses by the costs it learns."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.storage.fsutil import Barrier, BarrierMode, Costs


def batch(tmp_path: Path, mode: BarrierMode, n: int = 20) -> Barrier:
    barrier = Barrier(mode)
    for i in range(n):
        job = tmp_path / f"job{i}"
        job.mkdir()
        (job / "f.csv").write_bytes(b"x" * 100)
        barrier.file(job / "f.csv")
        barrier.dir(job)
    barrier.dir(tmp_path)
    return barrier


@pytest.mark.parametrize("mode", ["syncfs", "fsync", "auto"])
def test_each_mode_flushes_a_batch(tmp_path: Path, mode: BarrierMode) -> None:
    barrier = batch(tmp_path, mode)
    barrier.flush()
    barrier.flush()  # emptied: nothing more to do


def test_a_path_that_cannot_be_synced_fails_the_fsync_flush(tmp_path: Path) -> None:
    barrier = batch(tmp_path, "fsync")
    barrier.file(tmp_path / "gone.csv")
    with pytest.raises(FileNotFoundError):
        barrier.flush()


def test_auto_prefers_syncfs_on_a_clean_filesystem_and_fsyncs_beside_dirty_data() -> None:
    costs = Costs()
    assert costs.prefers_syncfs(dirty=0, paths=40)
    assert not costs.prefers_syncfs(dirty=100 << 20, paths=40)
    assert costs.prefers_syncfs(dirty=100 << 20, paths=600)  # a big batch: one syncfs


def test_auto_learns_what_each_mode_costs_here() -> None:
    costs = Costs()
    for _ in range(30):  # a disk whose writeback is ten times slower than assumed
        costs.learn(True, 0.002 + (100 << 20) * 3e-9, 100 << 20, 600)
    assert costs.syncfs_s_per_byte == pytest.approx(3e-9, rel=0.05)
    assert not costs.prefers_syncfs(dirty=100 << 20, paths=600)
    for _ in range(30):  # and fsyncs that are slow too
        costs.learn(False, 600 * 2e-3, 0, 600)
    assert costs.fsync_s_per_path == pytest.approx(2e-3, rel=0.05)
    assert costs.prefers_syncfs(dirty=100 << 20, paths=600)


def test_auto_tries_the_other_way_now_and_then() -> None:
    costs = Costs()
    choices = [costs.prefers_syncfs(dirty=0, paths=40) for _ in range(100)]
    assert choices.count(False) == 2  # one flush in 50
