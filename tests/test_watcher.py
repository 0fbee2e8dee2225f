"""Discovery modes: events, polling, scanning only, and `auto`'s choice by filesystem."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FiledockTree

from service.fsutil import filesystem_type
from service.watcher import detect_watch_mode


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
    assert detect_watch_mode(Path("/mnt/share/transfer"), "auto", mounts=m) == "scan"
    assert detect_watch_mode(Path("/mnt/smb/in"), "auto", mounts=m) == "scan"
    assert detect_watch_mode(Path("/mnt/fuse/in"), "auto", mounts=m) == "scan"
    assert detect_watch_mode(Path("/mnt/share/local/in"), "auto", mounts=m) == "events"
    assert detect_watch_mode(Path("/srv/data"), "auto", mounts=m) == "events"
    assert detect_watch_mode(Path("/mnt/share/transfer"), "poll", mounts=m) == "poll"
