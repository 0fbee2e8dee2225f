"""The directory sink: each item is copied into a folder, usually on another filesystem
(another volume, a mounted share), and appears there under its final name whole.

The source and the sink are on different filesystems in production, so a delivery is
always a copy, never a rename across (EXDEV): the bytes are streamed with aiofiles (a
file of up to a MiB read and written in one thread call) into a temp name beside the
final one, hashed as they are read and checked against `Item.sha256`, fsynced, and
only then renamed into place. The temp name derives from the job id and the sink, so
the next attempt of the same item finds and removes what a crashed attempt left. With
`exists: fail` the rename refuses to replace (`renameat2(RENAME_NOREPLACE)`, or a hard
link where the filesystem lacks it), so a file that appeared meanwhile is judged by
its bytes, never overwritten.

aiofiles rather than a kernel copy: `copy_file_range` refuses to cross filesystems
(EXDEV), and `sendfile` hashes nothing, so the temp would be read a second time.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import aiofiles
import anyio

from service.crash import crash_point
from service.delivery.base import Item, Receipt, Sink, SinkError, modified, read_checked, unreadable
from service.settings.sinks import DirectorySink
from service.storage.fsutil import fsync_dir, libc

__all__ = ["DirectoryDelivery"]

_CHUNK = 1 << 20
_NAME_MAX = 255
_TEMP_SUFFIX = ".filedock-tmp"
# A mounted share that went away answers with these rather than ENOENT.
_UNREACHABLE = frozenset({errno.ENOTCONN, errno.ESTALE, errno.EHOSTDOWN, errno.EHOSTUNREACH})
_NO_NOREPLACE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_renameat2 = getattr(libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]


class DirectoryDelivery(Sink):
    """One folder (`settings.path`); an item goes to `path / item.target`."""

    def __init__(self, settings: DirectorySink) -> None:
        self.settings = settings
        self.name = settings.name
        self.root = settings.path

    def final_path(self, item: Item) -> Path:
        return self.root / item.target

    def temp_path(self, item: Item) -> Path:
        """Beside the final name, hidden, the same for every attempt of the item."""
        final = self.final_path(item)
        name = f".{final.name}.{item.job_id}.{item.sink}{_TEMP_SUFFIX}"
        if len(os.fsencode(name)) > _NAME_MAX:
            short = hashlib.sha256(os.fsencode(final.name)).hexdigest()[:16]
            name = f".{short}.{item.job_id}.{item.sink}{_TEMP_SUFFIX}"
        return final.with_name(name)

    def location(self, item: Item) -> str:
        return _shown(self.final_path(item))

    async def deliver(self, item: Item) -> Receipt:
        final = self.final_path(item)
        try:
            return await self._deliver(item, final, self.temp_path(item))
        except OSError as e:
            raise await self._classify(e, final) from None

    async def _deliver(self, item: Item, final: Path, temp: Path) -> Receipt:
        there = await anyio.to_thread.run_sync(self._prepare, item, final, temp)
        if there is not None and (found := await self._existing(item, final, there)):
            return found
        try:
            await self._copy(item, temp)
            crash_point("mid_delivery")  # the temp written, not yet renamed
            if self.settings.exists == "replace":
                await anyio.to_thread.run_sync(os.replace, temp, final)
            elif not await anyio.to_thread.run_sync(_publish_noreplace, temp, final):
                there = await anyio.to_thread.run_sync(_lstat, final)
                if there is None or not (found := await self._existing(item, final, there)):
                    raise SinkError(
                        "io_error", f"{_shown(final)} changed as we wrote it", retryable=True
                    )
                return found
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_remove, temp)
        return await anyio.to_thread.run_sync(self._published, item, final)

    def _prepare(self, item: Item, final: Path, temp: Path) -> os.stat_result | None:
        """Check the root, make the missing parents inside it (never through a symlink
        that leaves it), remove a crashed attempt's temp, and look at the final name."""
        try:
            if not stat.S_ISDIR(os.stat(self.root).st_mode):
                raise SinkError("sink_unreachable", f"{self.root} is not a folder", retryable=True)
        except FileNotFoundError:
            what = f"{self.root} does not exist (a share that is not mounted?)"
            raise SinkError("sink_unreachable", what, retryable=True) from None
        real_root = os.path.realpath(self.root)
        folder, made_in = self.root, list[Path]()
        for part in item.target.split("/")[:-1]:
            folder = folder / part
            try:
                os.mkdir(folder, 0o755)
                made_in.append(folder.parent)
            except FileExistsError:
                pass
            real = os.path.realpath(folder)
            if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
                what = f"{_shown(final)}: {_shown(folder)} leads outside {self.root} (to {real})"
                raise SinkError("bad_target", what, retryable=False)
        if self.settings.fsync:
            for parent in made_in:
                fsync_dir(parent)  # the new folders' entries survive a crash
        # Removed, never reused: after a crash between link and unlink it is the final file.
        _remove(temp)
        return _lstat(final)

    async def _existing(self, item: Item, final: Path, there: os.stat_result) -> Receipt | None:
        """The final name is taken: our bytes (found), or `remote_exists` unless the sink
        replaces (then None: go on and write)."""
        if stat.S_ISREG(there.st_mode) and there.st_size == item.size:
            if await _sha256_of(final) == item.sha256:
                return Receipt(
                    _shown(final), item.size, item.sha256, _remote(final, there), found=True
                )
        if self.settings.exists == "replace":
            return None
        what = f"{_shown(final)} holds other bytes ({there.st_size} bytes)"
        raise SinkError("remote_exists", what, retryable=False)

    async def _copy(self, item: Item, temp: Path) -> None:
        """Stream the source into `temp`, hashing; fsync it when the sink asks. A file of
        up to `_CHUNK` is read, checked and written in one thread call."""
        if item.size <= _CHUNK:
            await anyio.to_thread.run_sync(self._write_whole, item, temp)
            item.sent(item.size)
            return
        h = hashlib.sha256()
        total = 0
        try:
            src = await aiofiles.open(item.path, "rb")
        except OSError as e:
            raise unreadable(item, e) from None
        try:
            dst = await aiofiles.open(temp, "xb")
            try:
                while total <= item.size:
                    try:
                        chunk = await src.read(_CHUNK)
                    except OSError as e:
                        raise unreadable(item, e) from None
                    if not chunk:
                        break
                    h.update(chunk)
                    total += len(chunk)
                    await dst.write(chunk)
                    item.sent(len(chunk))
                if total != item.size or h.hexdigest() != item.sha256:
                    raise modified(item, f"{total} bytes, sha256 {h.hexdigest()}")
                await dst.flush()
                if self.settings.fsync:
                    await anyio.to_thread.run_sync(os.fsync, dst.fileno())
            finally:
                with anyio.CancelScope(shield=True):
                    await dst.close()
        finally:
            with anyio.CancelScope(shield=True):
                await src.close()

    def _write_whole(self, item: Item, temp: Path) -> None:
        data = read_checked(item)
        with open(temp, "xb") as dst:
            dst.write(data)
            dst.flush()
            if self.settings.fsync:
                os.fsync(dst.fileno())

    def _published(self, item: Item, final: Path) -> Receipt:
        if self.settings.fsync:
            fsync_dir(final.parent)  # the rename (and the temp's removal) survive a crash
        return Receipt(_shown(final), item.size, item.sha256, _remote(final, os.stat(final)))

    async def _classify(self, e: OSError, final: Path) -> SinkError:
        text = f"{_shown(final)}: {e.strerror or e}"
        code = e.errno
        if code in (errno.ENOSPC, errno.EDQUOT):
            return SinkError("disk_full", text, retryable=True)
        if code in (errno.EACCES, errno.EPERM, errno.EROFS):
            return SinkError("permission", text, retryable=False)
        if code in (errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP):
            return SinkError("bad_target", text, retryable=False)
        if code in _UNREACHABLE or (
            code == errno.ENOENT and not await anyio.to_thread.run_sync(os.path.isdir, self.root)
        ):
            return SinkError("sink_unreachable", text, retryable=True)
        return SinkError("io_error", text, retryable=True)


def _publish_noreplace(temp: Path, final: Path) -> bool:
    """Rename `temp` to `final` unless `final` exists (then False, `temp` left alone)."""
    try:
        _rename_noreplace(temp, final)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in _NO_NOREPLACE:
            raise
    # No RENAME_NOREPLACE here (NFS, CIFS): a hard link refuses an existing name too.
    try:
        os.link(temp, final)
    except FileExistsError:
        return False
    os.unlink(temp)
    return True


def _rename_noreplace(src: Path, dst: Path) -> None:
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(dst))


async def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    async with aiofiles.open(path, "rb", opener=_nofollow) as f:
        while chunk := await f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remote(final: Path, st: os.stat_result) -> dict[str, Any]:
    return {"path": _shown(final), "mtime_ns": st.st_mtime_ns}


def _shown(path: Path) -> str:
    """A path as text that any JSON encoder takes (undecodable bytes escaped)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
