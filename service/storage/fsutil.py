"""Durable file operations: fsync of files and directories, barriers, safe moves.

The rules (docs/architecture.md, "Durability protocol"): a file is fsynced before it is
renamed into place and the directory after; a batch of such operations may share one
barrier (`syncfs()` of the filesystem) instead of one fsync each, as long as the order
holds: data durable before the ledger says so, the archive durable before the source is
removed. Never `shutil.move`: a cross-device move is an explicit copy, fsync, rename and
unlink, and only where the design allows it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from service.errors import StartupError

__all__ = [
    "COSTS",
    "Barrier",
    "BarrierMode",
    "Costs",
    "copy_tree_durable",
    "dirty_bytes",
    "fdatasync_path",
    "fsync_dir",
    "fsync_path",
    "libc",
    "move_tree",
    "probe_same_filesystem",
    "write_durable",
]

# The C library, loaded once: `syncfs` here; `prctl` in the archive worker, `mallopt` at start.
libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_syncfs = getattr(libc, "syncfs", None)


def fsync_dir(path: str | bytes | os.PathLike[str]) -> None:
    """Make a directory's entries (creations, renames, removals) durable."""
    _synced(path, os.O_RDONLY | os.O_DIRECTORY, os.fsync)


def fsync_path(path: str | bytes | os.PathLike[str]) -> None:
    _synced(path, os.O_RDONLY | os.O_NOFOLLOW, os.fsync)


def fdatasync_path(path: str | bytes | os.PathLike[str]) -> None:
    """Make a file's data (and the size that reads it) durable."""
    _synced(path, os.O_RDONLY | os.O_NOFOLLOW, os.fdatasync)


def _try_fdatasync(path: str | bytes | os.PathLike[str]) -> None:
    with contextlib.suppress(OSError):  # not ours to read: its folder is synced all the same
        fdatasync_path(path)


def _synced(path: str | bytes | os.PathLike[str], flags: int, sync: Callable[[int], None]) -> None:
    fd = os.open(path, flags)
    try:
        sync(fd)
    finally:
        os.close(fd)


def syncfs(path: str | bytes | os.PathLike[str]) -> None:
    """Flush every dirty page and inode of the filesystem holding `path` (one barrier).

    Falls back to `sync()` where the C library has no `syncfs`.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs is None:
            os.sync()
            return
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fsdecode(path))
    finally:
        os.close(fd)


BarrierMode = Literal["auto", "syncfs", "fsync"]
_FSYNC_THREADS = 16
_fsyncs: ThreadPoolExecutor | None = None


def dirty_bytes() -> int:
    """The machine's dirty and writeback page cache, from /proc/meminfo (0 if unknown)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    total = 0
    for line in data.split(b"\n"):
        if line.startswith((b"Dirty:", b"Writeback:")):
            total += int(line.split()[1]) * 1024
    return total


class Barrier:
    """Collects paths whose writes must be durable, then makes them so in one step.

    `syncfs`: one call per filesystem covers every file and directory in the batch
    (ext4 commits them in one journal transaction), and whatever else is dirty on it.
    `fsync`: each file is fdatasynced and each folder fsynced, on threads at once, so
    that the journal commits them together and nobody else's data is waited for.
    `auto`: whichever `Costs` expects to be cheaper now: a syncfs() waits for every
    dirty byte of the machine's page cache to be written (an upload still being
    written included), the fsyncs for each path of the batch.
    """

    def __init__(self, mode: BarrierMode = "syncfs") -> None:
        self._files: list[str | bytes] = []
        self._dirs: set[str | bytes] = set()
        self._best_effort: set[str | bytes] = set()
        self.mode = mode

    def file(self, path: str | bytes | os.PathLike[str], *, best_effort: bool = False) -> None:
        """A file whose data must be durable; `best_effort`: a file this process may
        not be able to open (an upstream's), synced when it can be, never failing."""
        self._files.append(os.fspath(path))
        if best_effort:
            self._best_effort.add(os.fspath(path))

    def dir(self, path: str | bytes | os.PathLike[str]) -> None:
        self._dirs.add(os.fspath(path))

    def flush(self) -> None:
        if not self._files and not self._dirs:
            return
        paths = len(self._files) + len(self._dirs)
        dirty = dirty_bytes() if self.mode == "auto" else 0
        use_syncfs = _syncfs is not None and (
            self.mode == "syncfs" or (self.mode == "auto" and COSTS.prefers_syncfs(dirty, paths))
        )
        t0 = time.perf_counter()
        if use_syncfs:
            seen: set[int] = set()
            for d in self._dirs | {os.path.dirname(f) for f in self._files}:
                dev = os.stat(d).st_dev
                if dev not in seen:
                    seen.add(dev)
                    syncfs(d)
        else:
            files = [
                (f, _try_fdatasync if f in self._best_effort else fdatasync_path)
                for f in self._files
            ]
            _fsync_each(files + [(d, fsync_dir) for d in self._dirs])
        if self.mode == "auto":
            COSTS.learn(use_syncfs, time.perf_counter() - t0, dirty, paths)
        self._files.clear()
        self._dirs.clear()
        self._best_effort.clear()


class Costs:
    """What each barrier has cost in this process, to choose the cheaper (`auto`).

    A syncfs() costs a journal commit (`syncfs_base_s`, learned while little is dirty)
    plus the time to write the dirty page cache (`syncfs_s_per_byte`, learned while
    much is); the fsyncs cost about their number (`fsync_s_per_path`: they run on
    threads at once, and the journal commits them together). Each is a moving
    average; one flush in `_EXPLORE` takes the other way, so that its cost is not
    left stale.
    """

    _MUCH_DIRTY = 16 << 20
    _EXPLORE = 50
    _WEIGHT = 0.2

    def __init__(self) -> None:
        # Seen on the machine of docs/benchmarks.md: 0.7-6 ms clean, 33 ms with 100 MiB
        # dirty, and 40 ms for the fsyncs of 256 claims (about 520 paths).
        self.syncfs_base_s = 2e-3
        self.syncfs_s_per_byte = 0.3e-9
        self.fsync_s_per_path = 80e-6
        self._flushes = 0

    def prefers_syncfs(self, dirty: int, paths: int) -> bool:
        self._flushes += 1
        syncfs_s = self.syncfs_base_s + dirty * self.syncfs_s_per_byte
        cheaper = syncfs_s <= paths * self.fsync_s_per_path
        return not cheaper if self._flushes % self._EXPLORE == 0 else cheaper

    def learn(self, used_syncfs: bool, seconds: float, dirty: int, paths: int) -> None:
        w = self._WEIGHT
        if not used_syncfs:
            self.fsync_s_per_path += w * (seconds / paths - self.fsync_s_per_path)
        elif dirty < self._MUCH_DIRTY:
            self.syncfs_base_s += w * (seconds - self.syncfs_base_s)
        else:
            seen = max(0.0, seconds - self.syncfs_base_s) / dirty
            self.syncfs_s_per_byte += w * (seen - self.syncfs_s_per_byte)


COSTS = Costs()


_Sync = Callable[[str | bytes | os.PathLike[str]], None]


def _fsync_each(work: Sequence[tuple[str | bytes, _Sync]]) -> None:
    global _fsyncs
    if len(work) <= 2:
        for path, sync in work:
            sync(path)
        return
    if _fsyncs is None:
        _fsyncs = ThreadPoolExecutor(_FSYNC_THREADS, thread_name_prefix="filedock-fsync")
    for _ in _fsyncs.map(lambda item: item[1](item[0]), work):  # raises the first error
        pass


def write_durable(path: Path, data: bytes) -> None:
    """Write a small file atomically: temp name, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


def copy_tree_durable(src: Path, dst: Path) -> None:
    """Copy a job folder to another filesystem: every file fsynced, then the folders.

    Symlinks are copied as links (never followed); other special files are skipped
    with nothing read from them.
    """
    os.mkdir(dst)
    for entry in os.scandir(src):
        s, d = Path(entry.path), dst / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(s), d)
        elif entry.is_dir(follow_symlinks=False):
            copy_tree_durable(s, d)
        elif entry.is_file(follow_symlinks=False):
            shutil.copyfile(s, d, follow_symlinks=False)
            fsync_path(d)
    fsync_dir(dst)


def move_tree(src: Path, dst: Path) -> None:
    """Move a job folder: one rename, or (across filesystems) copy, fsync, rename, remove.

    "Source gone, target present" after a failed rename counts as success
    (an NFS retransmission can report an error for a rename that happened).
    """
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno == errno.ENOENT and dst.exists() and not src.exists():
            return
        if e.errno != errno.EXDEV:
            raise
        tmp = dst.with_name(dst.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        copy_tree_durable(src, tmp)
        os.rename(tmp, dst)
        fsync_dir(dst.parent)
        shutil.rmtree(src)
    fsync_dir(dst.parent)
    fsync_dir(src.parent)


def probe_same_filesystem(a: Path, b: Path) -> None:
    """Refuse to start unless a rename from `a` to `b` works (the claim is one rename).

    Two mounts of one volume (a Kubernetes `subPath` per folder) look alike but
    make `rename` fail with EXDEV, so the probe renames for real.
    """
    probe = a / f".filedock-probe-{os.getpid()}"
    target = b / probe.name
    probe.write_bytes(b"")
    try:
        os.rename(probe, target)
    except OSError as e:
        probe.unlink(missing_ok=True)
        if e.errno == errno.EXDEV:
            raise StartupError(
                f"{a} and {b} are on different filesystems (rename fails with EXDEV): "
                "claiming a file must be one rename. Mount one volume and put the "
                "folders inside it (no subPath per folder)."
            ) from e
        raise StartupError(f"cannot rename from {a} to {b}: {e.strerror}") from e
    target.unlink()


def remove_tree(path: Path) -> None:
    """Remove a job folder of our own (no links to follow): plain unlink/rmdir, bottom up.

    Cheaper than `shutil.rmtree`'s descriptor-based walk for the few entries a job
    folder holds; a missing folder is fine.
    """
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    except NotADirectoryError:
        os.unlink(path)
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            remove_tree(Path(entry.path))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def tree_entries(root: Path) -> Iterable[os.DirEntry[str]]:
    """Every entry below `root`, depth first, without following symlinks."""
    stack = [root]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for entry in it:
                yield entry
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))


NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "gpfs", "afs"}
)


def is_network_filesystem(fstype: str) -> bool:
    """Shared with other nodes (or FUSE): no inotify for their writes, no SQLite locks."""
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse")


def filesystem_type(path: Path, *, mounts: str = "/proc/self/mounts") -> str:
    """The type of the mount holding `path`, from the mount table ("" when unknown)."""
    target = os.path.realpath(path)
    best, best_type = "", ""
    try:
        with open(mounts, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, best_type = mount, parts[2]
    except OSError:
        return ""
    return best_type
