"""Discovery modes: events, polling, scanning only, and `auto`'s choice by filesystem;
what a periodic scan lists again."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FiledockTree, command_route, wait_for
from prometheus_client import CollectorRegistry

from service.discovery.intake import Intake
from service.discovery.readiness import Readiness
from service.discovery.routes import Router
from service.discovery.walk import SETTLED_S
from service.discovery.watcher import Discovery, detect_watch_mode
from service.face.metrics import Metrics
from service.settings import Settings
from service.storage.fsutil import filesystem_type


@pytest.mark.parametrize("mode", ["events", "poll", "scan"])
def test_each_mode_finds_files_and_says_which_it_uses(tree: FiledockTree, mode: str) -> None:
    tree.configure(watch_mode=mode, scan_interval_s=0.5)
    service = tree.start()
    tree.drop("in/a.csv", b"a")
    tree.drop("b.csv", b"b")
    tree.wait_final(2, timeout=30)
    started = next(line for line in service.log_lines() if line["msg"] == "discovery started")
    assert started["mode"] == mode
    metrics = service.get("/metrics")[1].decode()
    assert f'filedock_watcher_mode{{mode="{mode}"}} 1.0' in metrics
    service.stop()


def test_events_find_files_in_new_folders_without_waiting_for_a_periodic_scan(
    tree: FiledockTree,
) -> None:
    tree.configure(watch_mode="events", scan_interval_s=300)
    service = tree.start()
    tree.drop("new/deeper/still/a.csv", b"a")  # folders made a moment before the file
    staged = tree.root / "staged"
    (staged / "inner").mkdir(parents=True)
    (staged / "inner" / "b.csv").write_bytes(b"b")
    (staged / "c.csv").write_bytes(b"c")
    staged.rename(tree.transfer / "moved-in")  # a whole folder renamed in, files and all
    tree.drop("new/deeper/d.csv", b"d")  # into a folder the watcher found itself
    tree.wait_final(4, timeout=30)
    names = sorted(bytes(r["relative_path"]) for r in tree.rows())
    assert names == [
        b"moved-in/c.csv",
        b"moved-in/inner/b.csv",
        b"new/deeper/d.csv",
        b"new/deeper/still/a.csv",
    ]
    assert b"\nfiledock_watcher_restarts_total 0.0\n" in service.get("/metrics")[1]
    service.stop()


def test_auto_scans_on_network_filesystems(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        "server:/export /mnt/share nfs4 rw,vers=4.1 0 0\n"
        "//nas/drop /mnt/smb cifs rw 0 0\n"
        "sshfs#me@host: /mnt/fuse fuse.sshfs rw 0 0\n"
        "tmpfs /mnt/share/local tmpfs rw 0 0\n"
    )
    m = str(mounts)
    assert filesystem_type(Path("/mnt/share/x/transfer"), mounts=m) == "nfs4"

    def mode(path: str, configured: str) -> str:
        return detect_watch_mode(filesystem_type(Path(path), mounts=m), configured)

    assert mode("/mnt/share/transfer", "auto") == "scan"
    assert mode("/mnt/smb/in", "auto") == "scan"
    assert mode("/mnt/fuse/in", "auto") == "scan"
    assert mode("/mnt/share/local/in", "auto") == "events"
    assert mode("/srv/data", "auto") == "events"
    assert mode("/mnt/share/transfer", "poll") == "poll"


class _Scans:
    """A real Discovery (no watcher running, so nothing but its scans finds a file),
    with the folders each scan listed: `os.scandir` is wrapped, not replaced."""

    def __init__(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, match: str, network_fs: bool
    ) -> None:
        self.transfer = tmp_path / "transfer"
        self.transfer.mkdir()
        s = Settings(root=tmp_path, routes=[command_route(match=match)])
        self.metrics = Metrics(CollectorRegistry())
        self.intake = Intake([r.name for r in s.routes], 1000, self.metrics)
        self.discovery = Discovery(
            s,
            Router(list(s.routes)),
            Readiness(self.transfer),
            self.intake,
            self.metrics,
            mode="events",
            network_fs=network_fs,
        )
        self.listed: list[str] = []
        scandir = os.scandir

        def listing(path: Any) -> Any:
            self.listed.append(os.fsdecode(path)[len(str(self.transfer)) :].lstrip("/"))
            return scandir(path)

        monkeypatch.setattr(os, "scandir", listing)

    async def scan(self, *, periodic: bool) -> list[str]:
        self.listed.clear()
        await self.discovery.scan(periodic=periodic)
        return sorted(self.listed)

    def close(self) -> None:
        self.intake.close()
        for receive in self.intake.receive.values():
            receive.close()

    def unrouted(self) -> float | None:
        return self.metrics.registry.get_sample_value("filedock_unrouted_files")

    def settle(self, *folders: Path) -> None:
        """Wait until no folder changed within the last `SETTLED_S` seconds."""
        wait_for(
            lambda: all(time.time() - f.stat().st_ctime > SETTLED_S + 0.1 for f in folders),
            what=f"the folders to be {SETTLED_S} s old",
        )


@pytest.fixture
def scans_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., _Scans]]:
    made: list[_Scans] = []

    def make(match: str, *, network_fs: bool = False) -> _Scans:
        made.append(_Scans(tmp_path, monkeypatch, match, network_fs))
        return made[-1]

    yield make
    for scans in made:
        scans.close()


async def test_a_periodic_scan_lists_only_the_folders_that_changed(
    tmp_path: Path, scans_of: Callable[..., _Scans]
) -> None:
    scans = scans_of("in/*.csv")
    junk, inbox = scans.transfer / "junk", scans.transfer / "in"
    junk.mkdir()
    inbox.mkdir()
    for i in range(50):
        (junk / f"{i}.dat").write_bytes(b"x")
    scans.settle(scans.transfer, junk, inbox)

    assert await scans.scan(periodic=False) == ["", "in", "junk"]
    assert scans.unrouted() == 50
    # Nothing changed: nothing is listed, and the 50 unrouted files are still counted.
    assert await scans.scan(periodic=True) == []
    assert scans.unrouted() == 50

    # A file arrives that no watcher reported: its folder's mtime tells, and the
    # periodic scan lists that folder (only) and queues the file.
    (tmp_path / "a.csv").write_bytes(b"a")
    os.rename(tmp_path / "a.csv", inbox / "a.csv")
    assert await scans.scan(periodic=True) == ["in"]
    assert b"in/a.csv" in scans.intake
    assert await scans.scan(periodic=True) == ["in"]  # it waits there: listed each time

    # An unrouted file removed, one put back with its folder's mtime set back: each
    # change of an entry shows in mtime or ctime, and the count follows.
    (junk / "0.dat").unlink()
    assert "junk" in await scans.scan(periodic=True)
    assert scans.unrouted() == 49
    scans.settle(junk)
    assert "junk" in await scans.scan(periodic=True)  # recorded now it has settled
    before = junk.stat()
    (junk / "0.dat").write_bytes(b"x")
    os.utime(junk, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert "junk" in await scans.scan(periodic=True)
    assert scans.unrouted() == 50

    # A new subfolder shows in its parent; a scan after a restart or an overflow
    # (not periodic) lists everything.
    (junk / "deeper").mkdir()
    assert await scans.scan(periodic=True) == ["in", "junk", "junk/deeper"]
    assert await scans.scan(periodic=False) == ["", "in", "junk", "junk/deeper"]


async def test_on_a_network_filesystem_every_scan_lists_every_folder(
    scans_of: Callable[..., _Scans],
) -> None:
    # Another node's writes may reach this one's mtime and ctime late, or not at all.
    scans = scans_of("in/*.csv", network_fs=True)
    (scans.transfer / "junk").mkdir()
    (scans.transfer / "junk" / "old.dat").write_bytes(b"x")
    scans.settle(scans.transfer, scans.transfer / "junk")
    for periodic in (False, True, True):
        assert await scans.scan(periodic=periodic) == ["", "junk"]
        assert scans.unrouted() == 1


async def test_folders_holding_uploads_in_progress_are_listed_by_every_scan(
    scans_of: Callable[..., _Scans],
) -> None:
    scans = scans_of("**")
    (scans.transfer / "upload.csv.part").write_bytes(b"half")  # stalls are judged by age
    scans.settle(scans.transfer)
    for periodic in (False, True, True):
        assert await scans.scan(periodic=periodic) == [""]
