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
from collections.abc import Iterable
from pathlib import Path

from service.errors import StartupError

__all__ = [
    "Barrier",
    "copy_tree_durable",
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
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: str | bytes | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
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


class Barrier:
    """Collects paths whose writes must be durable, then makes them so in one step.

    With `syncfs` available, one call per filesystem covers every file and
    directory in the batch (ext4 commits them in one journal transaction);
    otherwise each file and directory is fsynced on its own.
    """

    def __init__(self, *, use_syncfs: bool = True) -> None:
        self._files: list[str | bytes] = []
        self._dirs: set[str | bytes] = set()
        self._use_syncfs = use_syncfs and _syncfs is not None

    def file(self, path: str | bytes | os.PathLike[str]) -> None:
        self._files.append(os.fspath(path))

    def dir(self, path: str | bytes | os.PathLike[str]) -> None:
        self._dirs.add(os.fspath(path))

    def flush(self) -> None:
        if not self._files and not self._dirs:
            return
        if self._use_syncfs:
            seen: set[int] = set()
            for d in self._dirs | {os.path.dirname(f) for f in self._files}:
                dev = os.stat(d).st_dev
                if dev not in seen:
                    seen.add(dev)
                    syncfs(d)
        else:
            for f in self._files:
                fsync_path(f)
            for d in self._dirs:
                fsync_dir(d)
        self._files.clear()
        self._dirs.clear()


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
