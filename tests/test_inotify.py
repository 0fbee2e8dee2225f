"""The inotify reader on real folders: what it reports, folder watches, overflow.

The watch limit is tested end to end in tests/reliability/test_watcher.py, in a user
namespace with a lowered limit.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from service.discovery.inotify import TreeWatch, WatchEvent


async def collect(tree: TreeWatch, want: int) -> list[WatchEvent]:
    """Events until `want` are in hand (a deadline, not a sleep)."""
    got: list[WatchEvent] = []
    with anyio.fail_after(5):
        while len(got) < want:
            got += await tree.events()
    return got


def drop(folder: Path, name: str) -> None:
    tmp = folder / f".{name}.part"
    tmp.write_bytes(b"x")
    tmp.rename(folder / name)


async def test_renames_and_closes_are_reported_with_their_relative_path(tmp_path: Path) -> None:
    with TreeWatch(os.fsencode(tmp_path)) as tree:
        drop(tmp_path, "a.csv")
        (tmp_path / "b.csv").write_bytes(b"written in place")
        got = await collect(tree, 3)
    # The temp name's close, the rename, and the in-place write's close; creations of
    # files and the temp name's move away are not reported.
    assert [(e.rel, e.is_dir) for e in got] == [
        (b".a.csv.part", False),
        (b"a.csv", False),
        (b"b.csv", False),
    ]


async def test_names_stay_bytes_even_when_not_utf8(tmp_path: Path) -> None:
    with TreeWatch(os.fsencode(tmp_path)) as tree:
        with open(os.fsencode(tmp_path) + b"/\xff\xfe.csv", "wb") as f:
            f.write(b"x")
        got = await collect(tree, 1)
    assert got[0].rel == b"\xff\xfe.csv"


async def test_a_subfolder_is_announced_and_watched_once_added(tmp_path: Path) -> None:
    with TreeWatch(os.fsencode(tmp_path)) as tree:
        (tmp_path / "in").mkdir()
        assert [(e.rel, e.is_dir) for e in await collect(tree, 1)] == [(b"in", True)]
        tree.add(b"in")
        (tmp_path / "in" / "deep").mkdir()
        tree.add(b"in/deep")
        drop(tmp_path / "in" / "deep", "x.csv")
        rels = [e.rel for e in await collect(tree, 3)]
        assert rels == [b"in/deep", b"in/deep/.x.csv.part", b"in/deep/x.csv"]
        assert tree.watched == 3


async def test_a_folder_moved_within_the_tree_reports_its_new_path(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    with TreeWatch(os.fsencode(tmp_path)) as tree:
        tree.add(b"old")
        (tmp_path / "old").rename(tmp_path / "new")
        assert [e.rel for e in await collect(tree, 1)] == [b"new"]
        tree.add(b"new")  # what Discovery does for a folder event
        drop(tmp_path / "new", "x.csv")
        assert [e.rel for e in await collect(tree, 2)] == [b"new/.x.csv.part", b"new/x.csv"]
        assert tree.watched == 2


async def test_a_folder_moved_out_of_the_tree_is_forgotten(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    (root / "sub").mkdir()
    with TreeWatch(os.fsencode(root)) as tree:
        tree.add(b"sub")
        (root / "sub").rename(outside)
        drop(outside, "not-ours.csv")
        drop(root, "ours.csv")
        assert [e.rel for e in await collect(tree, 2)] == [b".ours.csv.part", b"ours.csv"]
        assert tree.watched == 1


async def test_a_folder_gone_before_its_watch_is_not_an_error(tmp_path: Path) -> None:
    with TreeWatch(os.fsencode(tmp_path)) as tree:
        tree.add(b"never-existed")
        (tmp_path / "file").write_bytes(b"")
        tree.add(b"file")  # replaced by a file
        assert tree.watched == 1


async def test_a_queue_overflow_is_reported(tmp_path: Path) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    with TreeWatch(os.fsencode(tmp_path)) as tree:
        for i in range(limit // 2 + 10):  # four events each in the kernel's queue
            drop(tmp_path, f"{i}.csv")
        with anyio.fail_after(10):
            while not any(e.overflow for e in await tree.events()):
                pass
