"""The directory sink, its root on a real second filesystem (a tmpfs the test mounts),
so every delivery is a copy across filesystems as in production."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import Mount
from inotify_simple import INotify
from inotify_simple import flags as IN

from service.delivery.base import Item, Receipt, SinkError
from service.delivery.directory import DirectoryDelivery
from service.settings.sinks import DirectorySink

JOB = "20250102T030405006Z-0a1b2c3d"


def directory_sink(root: Path, **options: Any) -> DirectoryDelivery:
    settings = DirectorySink.model_validate(
        {"kind": "directory", "name": "vol", "path": str(root), **options}
    )
    return DirectoryDelivery(settings)


def make_item(tmp_path: Path, content: bytes, target: str = "a.bin", job: str = JOB) -> Item:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    path = src / hashlib.sha256(content + job.encode()).hexdigest()[:12]
    path.write_bytes(content)
    sha = hashlib.sha256(content).hexdigest()
    return Item(path=path, target=target, size=len(content), sha256=sha, job_id=job, sink="vol")


async def refused(sink: DirectoryDelivery, item: Item) -> SinkError:
    with pytest.raises(SinkError) as caught:
        await sink.deliver(item)
    return caught.value


def umask() -> int:
    """The process's umask, read without changing it."""
    status = Path("/proc/self/status").read_text()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("Umask:")), 8)


def names(folder: Path) -> list[str]:
    """Everything below `folder`, relative: temp names would show here."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


async def test_delivers_across_filesystems(tmp_path: Path, mount: Mount) -> None:
    root = mount()
    content = os.urandom(3 << 20)
    sent: list[int] = []
    item = dataclasses.replace(make_item(tmp_path, content), progress=sent.append)
    assert os.stat(item.path).st_dev != os.stat(root).st_dev

    receipt = await directory_sink(root).deliver(item)
    assert sum(sent) == len(content) and len(sent) > 1  # told as it went

    final = root / "a.bin"
    assert final.read_bytes() == content
    assert receipt == Receipt(
        location=str(final),
        bytes=len(content),
        sha256=item.sha256,
        remote={"path": str(final), "mtime_ns": final.stat().st_mtime_ns},
        found=False,
    )
    assert names(root) == ["a.bin"]


async def test_a_nested_target_creates_its_folders(tmp_path: Path, mount: Mount) -> None:
    root = mount()
    item = make_item(tmp_path, b"nested", target="main/2025/01/02/a.csv")
    receipt = await directory_sink(root).deliver(item)
    assert (root / "main/2025/01/02/a.csv").read_bytes() == b"nested"
    assert receipt.location == str(root / "main/2025/01/02/a.csv")
    folders = ["main", "main/2025", "main/2025/01", "main/2025/01/02"]
    assert names(root) == [*folders, "main/2025/01/02/a.csv"]
    mode = 0o755 & ~umask()
    assert all((root / f).stat().st_mode & 0o7777 == mode for f in folders)


async def test_the_same_item_twice_is_found(tmp_path: Path, mount: Mount) -> None:
    root = mount()
    item = make_item(tmp_path, b"once")
    sink = directory_sink(root)
    first = await sink.deliver(item)
    before = os.stat(root / "a.bin")
    again = await sink.deliver(item)
    assert (first.found, again.found) == (False, True)
    assert (again.bytes, again.sha256, again.location) == (4, item.sha256, first.location)
    after = os.stat(root / "a.bin")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


async def test_other_bytes_there_are_remote_exists_unless_replaced(
    tmp_path: Path, mount: Mount
) -> None:
    root = mount()
    (root / "a.bin").write_bytes(b"theirs")
    item = make_item(tmp_path, b"ours!!")  # the same size, other bytes
    error = await refused(directory_sink(root), item)
    assert (error.error_class, error.retryable) == ("remote_exists", False)
    assert (root / "a.bin").read_bytes() == b"theirs"
    assert names(root) == ["a.bin"]

    receipt = await directory_sink(root, exists="replace").deliver(item)
    assert (root / "a.bin").read_bytes() == b"ours!!" and not receipt.found
    assert names(root) == ["a.bin"]


async def test_a_crashed_attempts_temp_is_removed(tmp_path: Path, mount: Mount) -> None:
    root = mount()
    item = make_item(tmp_path, b"good bytes", target="d/a.bin")
    sink = directory_sink(root)
    temp = sink.temp_path(item)
    assert temp.parent == root / "d" and temp.name.startswith(".a.bin.")
    temp.parent.mkdir()
    temp.write_bytes(b"junk from a crashed attempt")
    await sink.deliver(item)
    assert (root / "d/a.bin").read_bytes() == b"good bytes"
    assert names(root) == ["d", "d/a.bin"]


async def test_a_crash_between_link_and_unlink_is_found(tmp_path: Path, mount: Mount) -> None:
    """The temp left then is the final file itself (a second link): never truncated."""
    root = mount()
    item = make_item(tmp_path, b"published")
    sink = directory_sink(root)
    (root / "a.bin").write_bytes(b"published")
    os.link(root / "a.bin", sink.temp_path(item))
    receipt = await sink.deliver(item)
    assert receipt.found
    assert (root / "a.bin").read_bytes() == b"published"
    assert names(root) == ["a.bin"]


async def test_the_final_name_appears_only_whole(tmp_path: Path, mount: Mount) -> None:
    """Watched with inotify: the final name is never created or written, only renamed
    into place; the temp name is gone at the end."""
    root = mount()
    item = make_item(tmp_path, os.urandom(3 << 20))
    with INotify() as watch:
        watch.add_watch(root, IN.CREATE | IN.MODIFY | IN.MOVED_TO | IN.MOVED_FROM | IN.DELETE)
        await directory_sink(root).deliver(item)
        events = [(e.name, IN.from_mask(e.mask)) for e in watch.read(timeout=0)]
    final_events = [flags for name, flags in events if name == "a.bin"]
    assert final_events == [[IN.MOVED_TO]]
    temp_events = {name for name, _ in events if name != "a.bin"}
    assert len(temp_events) == 1 and temp_events.pop().endswith(".filedock-tmp")
    assert names(root) == ["a.bin"]


@pytest.mark.parametrize("size", [10, 3 << 20])
async def test_a_modified_file_is_not_delivered(tmp_path: Path, mount: Mount, size: int) -> None:
    root = mount()
    item = make_item(tmp_path, b"a" * size, target="d/a.bin")
    item.path.write_bytes(b"a" * (size - 1) + b"b")
    error = await refused(directory_sink(root), item)
    assert (error.error_class, error.retryable) == ("modified_during_processing", False)
    assert names(root) == ["d"]


async def test_disk_full_is_retryable_and_leaves_nothing(tmp_path: Path, mount: Mount) -> None:
    root = mount("1m")
    item = make_item(tmp_path, os.urandom(2 << 20))
    error = await refused(directory_sink(root), item)
    assert (error.error_class, error.retryable) == ("disk_full", True)
    assert names(root) == []


async def test_a_missing_root_is_unreachable(tmp_path: Path, mount: Mount) -> None:
    root = mount() / "not-mounted"
    error = await refused(directory_sink(root), make_item(tmp_path, b"x", target="d/a.bin"))
    assert (error.error_class, error.retryable) == ("sink_unreachable", True)
    assert not root.exists()


async def test_a_symlinked_parent_may_not_leave_the_root(tmp_path: Path, mount: Mount) -> None:
    root = mount()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    item = make_item(tmp_path, b"x", target="escape/sub/a.bin")
    error = await refused(directory_sink(root), item)
    assert (error.error_class, error.retryable) == ("bad_target", False)
    assert list(outside.iterdir()) == []

    (root / "real").mkdir()
    (root / "alias").symlink_to(root / "real")  # a link that stays inside is fine
    await directory_sink(root).deliver(make_item(tmp_path, b"y", target="alias/a.bin"))
    assert (root / "real/a.bin").read_bytes() == b"y"


async def test_a_cancelled_delivery_leaves_no_temp(tmp_path: Path, mount: Mount) -> None:
    root = mount()
    item = make_item(tmp_path, os.urandom(40 << 20))
    sink = directory_sink(root)
    temp = sink.temp_path(item)

    async def cancel_mid_copy(scope: anyio.CancelScope) -> None:
        with anyio.fail_after(30):
            while not (temp.exists() and temp.stat().st_size >= 1 << 20):
                await anyio.sleep(0.001)
        scope.cancel()

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            tg.start_soon(cancel_mid_copy, scope)
            await sink.deliver(item)
    assert scope.cancelled_caught
    assert names(root) == []
