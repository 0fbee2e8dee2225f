"""The SFTP sink: each item is uploaded to a temp name beside its final one, checked,
and renamed into place, over the sink's one SSH connection (`sftp_connection.py`).

The bytes are hashed as they are read and checked against `Item.sha256` before the
temp is published. With `exists: fail` nothing is ever replaced on purpose: a hard
link (`hardlink@openssh.com`) refuses a taken name, and so does OpenSSH's plain
rename. rclone's server offers the link but refuses it, and its rename replaces: there
the final name is looked at just before the rename, and a file that appears within
that window is replaced. `exists: replace` uses `posix-rename@openssh.com` (atomic);
a server without it gets the old file moved aside, the new one renamed in, and the old
one removed, so the final name is briefly missing (never half-written) in between.

Neither OpenSSH nor rclone offers a checksum extension (`check-file`): bytes found at
the final name are judged by reading them back, a published file by its size.
"""

from __future__ import annotations

import asyncio
import hashlib
import posixpath
import stat
import warnings
from collections.abc import Awaitable
from contextlib import suppress
from typing import Any, Literal, cast

import aiofiles
import anyio
from cryptography.utils import CryptographyDeprecationWarning

from service.crash import crash_point
from service.delivery.base import Item, Receipt, Sink, SinkError, modified, read_checked, unreadable
from service.delivery.sftp_connection import Connection
from service.settings.sinks import SftpSink

with warnings.catch_warnings():
    warnings.simplefilter("ignore", CryptographyDeprecationWarning)  # as in sftp_connection
    import asyncssh

__all__ = ["SftpDelivery"]

_CHUNK = 1 << 20
_NAME_MAX = 255
_TEMP, _ASIDE = b".filedock-tmp", b".filedock-old"
_CLEANUP_S = 10.0
_KNOWN_FOLDERS = 4096  # folders remembered to exist; forgotten all at once beyond
_SFTP_CLASSES = {
    asyncssh.FX_PERMISSION_DENIED: ("permission", False),
    asyncssh.FX_WRITE_PROTECT: ("permission", False),
    asyncssh.FX_NO_SPACE_ON_FILESYSTEM: ("disk_full", True),
    asyncssh.FX_QUOTA_EXCEEDED: ("disk_full", True),
    asyncssh.FX_NO_CONNECTION: ("sink_unreachable", True),
    asyncssh.FX_CONNECTION_LOST: ("sink_unreachable", True),
    asyncssh.FX_OP_UNSUPPORTED: ("sink_rejected", False),
    asyncssh.FX_BAD_MESSAGE: ("bad_target", False),  # OpenSSH's ENAMETOOLONG, EINVAL
    asyncssh.FX_INVALID_FILENAME: ("bad_target", False),
    asyncssh.FX_FILE_IS_A_DIRECTORY: ("bad_target", False),
    asyncssh.FX_NOT_A_DIRECTORY: ("bad_target", False),
    asyncssh.FX_LINK_LOOP: ("bad_target", False),
}

# rclone's server answers FX_FAILURE with the error's text (OpenSSH just "Failure").
_FAILURE_REASONS = (
    ("permission denied", "permission", False),
    ("read only file system", "permission", False),
    ("read-only file system", "permission", False),
    ("no space left", "disk_full", True),
    ("quota exceeded", "disk_full", True),
)


class SftpDelivery(Sink):
    """A folder on an SFTP server (`root`); an item goes to `root/item.target`."""

    def __init__(self, settings: SftpSink) -> None:
        self.settings = settings
        self.name = settings.name
        self._server = Connection(settings)
        self._root: bytes | None = None  # `root` made absolute by the server
        self._no_link = False  # the server offers hardlink@openssh.com but refuses it
        self._known: set[bytes] = set()  # target folders seen to exist on the server
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self._url = f"sftp://{settings.username}@{host}:{settings.port}"

    async def open(self) -> None:
        await self._server.configure()

    async def close(self) -> None:
        await self._server.close()

    def location(self, item: Item) -> str:
        if self._root is not None:
            return self._shown(posixpath.join(self._root, _encoded(item)))
        # Not yet resolved by the server: a relative root is shown from the login
        # folder as `/~/`, the way SFTP URLs say it.
        path = posixpath.join(self.settings.root.encode("utf-8", "surrogateescape"), _encoded(item))
        return self._shown(posixpath.normpath(path if path.startswith(b"/") else b"/~/" + path))

    async def deliver(self, item: Item) -> Receipt:
        parts = _parts(item, self.location(item))
        try:
            async with self._server.session() as sftp:
                return await self._deliver(sftp, item, await self._resolved(sftp), parts)
        except (asyncssh.Error, OSError) as e:  # the network's: local reads are caught apart
            raise _classify(e, self.location(item)) from None

    async def _deliver(
        self, sftp: asyncssh.SFTPClient, item: Item, root: bytes, parts: list[bytes]
    ) -> Receipt:
        """Independent requests go together (`_together`): under load each round trip
        waits for the event loop's turn, which costs more than the request."""
        final = posixpath.join(root, *parts)
        temp, aside = _beside(final, item, _TEMP), _beside(final, item, _ASIDE)
        folder = posixpath.dirname(final)
        known = folder in self._known
        await self._folders(sftp, root, parts[:-1])
        stale = [_remove(sftp, temp)]  # a crashed attempt's, never reused
        if self.settings.exists == "replace":
            stale.append(_remove(sftp, aside))
        there = (await _together(*stale, _lstat(sftp, final)))[-1]
        if there is not None and (found := await self._existing(sftp, item, final, there)):
            return found
        published = False
        try:
            try:
                await self._upload(sftp, item, temp)
            except asyncssh.SFTPNoSuchFile:
                if not known:
                    raise
                # The folder was removed on the server since it was seen: made again.
                self._known.discard(folder)
                await self._folders(sftp, root, parts[:-1])
                await self._upload(sftp, item, temp)
            if self.settings.exists == "replace":
                await self._replace(sftp, temp, final, aside)
                how = "renamed"
            elif (how := await self._publish(sftp, temp, final)) == "taken":
                there = await _lstat(sftp, final)
                if there is None or not (found := await self._existing(sftp, item, final, there)):
                    what = f"{self._shown(final)} changed as we wrote it"
                    raise SinkError("sink_error", what, retryable=True)
                return found
            published = True
        finally:
            if not published:  # best effort: on a dead connection the next attempt does it
                with (
                    anyio.move_on_after(_CLEANUP_S, shield=True),
                    suppress(asyncssh.Error, OSError),
                ):
                    await _remove(sftp, temp)
        # A linked temp is removed as the final name is checked.
        linked = [_remove(sftp, temp)] if how == "linked" else []
        return self._published(item, final, (await _together(*linked, sftp.stat(final)))[-1])

    async def _resolved(self, sftp: asyncssh.SFTPClient) -> bytes:
        """`root`, made absolute by the server (relative to the login folder) once."""
        if self._root is None:
            root = self.settings.root.encode("utf-8", "surrogateescape")
            try:
                self._root = await sftp.realpath(root)
            except asyncssh.SFTPNoSuchFile:
                what = f"{self._url}: root {self.settings.root} is not a folder on the server"
                raise SinkError("sink_rejected", what, retryable=False) from None
        return self._root

    async def _folders(self, sftp: asyncssh.SFTPClient, root: bytes, parents: list[bytes]) -> None:
        """Make the target's missing folders (`dir_mode`); the root must exist. A folder
        seen to exist is remembered and not asked about again (one request a file fewer);
        `_deliver` makes it again should it vanish."""
        target = posixpath.join(root, *parents)
        if target in self._known:
            return
        if _is_dir(await _stat(sftp, target)):
            self._remember(target)
            return
        if not _is_dir(await _stat(sftp, root)):
            what = f"{self._shown(root)} is not a folder on the server"
            raise SinkError("sink_rejected", what, retryable=False)
        folder = root
        for part in parents:
            folder = posixpath.join(folder, part)
            there = await _stat(sftp, folder)
            if there is None:
                with suppress(asyncssh.SFTPFailure):  # made meanwhile by another delivery
                    await sftp.mkdir(folder, asyncssh.SFTPAttrs(permissions=self.settings.dir_mode))
                there = await _stat(sftp, folder)
            if not _is_dir(there):
                what = f"{self._shown(folder)} is not a folder on the server"
                raise SinkError("bad_target", what, retryable=False)
        self._remember(target)

    def _remember(self, folder: bytes) -> None:
        if len(self._known) >= _KNOWN_FOLDERS:
            self._known.clear()
        self._known.add(folder)

    async def _existing(
        self, sftp: asyncssh.SFTPClient, item: Item, final: bytes, there: asyncssh.SFTPAttrs
    ) -> Receipt | None:
        """The final name is taken: our bytes (found), or `remote_exists` unless the sink
        replaces (then None: go on and write)."""
        shown = self._shown(final)
        if _is_dir(there):
            raise SinkError("bad_target", f"{shown} is a folder", retryable=False)
        if _is_file(there) and there.size == item.size:
            if await _sha256_of(sftp, final) == item.sha256:
                return Receipt(shown, item.size, item.sha256, _remote(final, there), found=True)
        if self.settings.exists == "replace":
            return None
        what = f"{shown} holds other bytes ({there.size} bytes); the sink says exists: fail"
        raise SinkError("remote_exists", what, retryable=False)

    async def _upload(self, sftp: asyncssh.SFTPClient, item: Item, temp: bytes) -> None:
        """Write the source into `temp`, mode `file_mode`, flushed to the server's disk
        where it offers `fsync@openssh.com`. A file of up to `_CHUNK` is read and checked
        in one thread call and written in one request, beside its mode; a larger one is
        streamed, hashed as it is read, and checked before its mode is set."""
        if item.size <= _CHUNK:
            data = await anyio.to_thread.run_sync(read_checked, item)
            async with sftp.open(temp, "wb", encoding=None) as dst:
                await _together(dst.write(data, 0), self._mode(dst))
                item.sent(item.size)
                crash_point("mid_delivery")  # the temp is written, not published
                await _flush(dst)
            return
        h = hashlib.sha256()
        total = 0
        try:
            src = await aiofiles.open(item.path, "rb")
        except OSError as e:
            raise unreadable(item, e) from None
        try:
            async with sftp.open(temp, "wb", encoding=None) as dst:
                while total <= item.size:
                    try:
                        chunk = await src.read(_CHUNK)
                    except OSError as e:
                        raise unreadable(item, e) from None
                    if not chunk:
                        break
                    h.update(chunk)
                    await dst.write(chunk, total)
                    total += len(chunk)
                    item.sent(len(chunk))
                    if total == len(chunk):  # the temp is begun, not published
                        crash_point("mid_delivery")
                if total != item.size or h.hexdigest() != item.sha256:
                    raise modified(item, f"{total} bytes, sha256 {h.hexdigest()}")
                await self._mode(dst)
                await _flush(dst)
        finally:
            with anyio.CancelScope(shield=True):
                await src.close()

    async def _mode(self, dst: asyncssh.SFTPClientFile) -> None:
        # Modes are advice: rclone ignores them, some servers refuse to set them.
        with suppress(asyncssh.SFTPOpUnsupported, asyncssh.SFTPPermissionDenied):
            await dst.chmod(self.settings.file_mode)

    async def _publish(
        self, sftp: asyncssh.SFTPClient, temp: bytes, final: bytes
    ) -> Literal["linked", "renamed", "taken"]:
        """Give `temp` the final name unless it is taken (`taken`, `temp` left); a hard
        link leaves `temp` beside it (`linked`), for the caller to remove."""
        if not self._no_link:
            try:
                await sftp.link(temp, final)
            except asyncssh.SFTPOpUnsupported:
                self._no_link = True
            except (asyncssh.SFTPFailure, asyncssh.SFTPPermissionDenied):
                # Taken, or a filesystem without hard links (EPERM): the rename decides.
                if await _lstat(sftp, final) is not None:
                    return "taken"
            else:
                return "linked"
        # SFTP v3's rename must refuse a taken name, as OpenSSH's does; rclone's
        # replaces, so look first.
        if await _lstat(sftp, final) is not None:
            return "taken"
        try:
            await sftp.rename(temp, final)
        except asyncssh.SFTPFailure:
            if await _lstat(sftp, final) is not None:
                return "taken"
            raise
        return "renamed"

    async def _replace(
        self, sftp: asyncssh.SFTPClient, temp: bytes, final: bytes, aside: bytes
    ) -> None:
        try:
            await sftp.posix_rename(temp, final)
            return
        except asyncssh.SFTPOpUnsupported:
            pass
        # The old file is moved aside before the new one takes its name and removed
        # after, never before the new one is whole.
        try:
            await sftp.rename(final, aside)
        except asyncssh.SFTPNoSuchFile:
            pass
        try:
            await sftp.rename(temp, final)
        except asyncssh.SFTPError:
            with suppress(asyncssh.SFTPError):
                await sftp.rename(aside, final)
            raise
        await _remove(sftp, aside)

    def _published(self, item: Item, final: bytes, there: asyncssh.SFTPAttrs) -> Receipt:
        """What the server now holds under the final name, checked by its size."""
        shown = self._shown(final)
        if there.size != item.size:
            what = f"{shown} has {there.size} bytes after the upload, not {item.size}"
            raise SinkError("checksum_mismatch", what, retryable=True)
        return Receipt(shown, item.size, item.sha256, _remote(final, there))

    def _shown(self, path: bytes) -> str:
        return self._url + path.decode("utf-8", "backslashreplace")


def _encoded(item: Item) -> bytes:
    return item.target.encode("utf-8", "surrogateescape")


def _parts(item: Item, where: str) -> list[bytes]:
    """The target's folders and name; `bad_target` for one that could leave the root."""
    parts = _encoded(item).split(b"/")
    if any(p in (b"", b".", b"..") for p in parts):
        raise SinkError("bad_target", f"{where}: an empty, . or .. part", retryable=False)
    return parts


def _beside(final: bytes, item: Item, suffix: bytes) -> bytes:
    """Our name beside `final`: hidden, the same for every attempt of the item."""
    folder, name = posixpath.split(final)
    ours = f".{item.job_id}.{item.sink}".encode() + suffix
    if len(name) + len(ours) + 1 > _NAME_MAX:
        name = hashlib.sha256(name).hexdigest()[:16].encode()
    return posixpath.join(folder, b"." + name + ours)


async def _together(*requests: Awaitable[Any]) -> list[Any]:
    """Independent requests sent at once, their answers in order: one round trip for
    all. The first failure is raised once every one has answered."""
    answers = await asyncio.gather(*requests, return_exceptions=True)
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return answers


async def _flush(dst: asyncssh.SFTPClientFile) -> None:
    with suppress(asyncssh.SFTPOpUnsupported):
        await dst.fsync()


async def _sha256_of(sftp: asyncssh.SFTPClient, path: bytes) -> str:
    h = hashlib.sha256()
    async with sftp.open(path, "rb", encoding=None) as f:
        while chunk := cast(bytes, await f.read(_CHUNK)):  # bytes: no encoding
            h.update(chunk)
    return h.hexdigest()


async def _stat(sftp: asyncssh.SFTPClient, path: bytes) -> asyncssh.SFTPAttrs | None:
    try:
        return await sftp.stat(path)
    except asyncssh.SFTPNoSuchFile:
        return None


async def _lstat(sftp: asyncssh.SFTPClient, path: bytes) -> asyncssh.SFTPAttrs | None:
    try:
        return await sftp.lstat(path)
    except asyncssh.SFTPNoSuchFile:
        return None


async def _remove(sftp: asyncssh.SFTPClient, path: bytes) -> None:
    with suppress(asyncssh.SFTPNoSuchFile):
        await sftp.remove(path)


def _is_dir(attrs: asyncssh.SFTPAttrs | None) -> bool:
    return attrs is not None and attrs.permissions is not None and stat.S_ISDIR(attrs.permissions)


def _is_file(attrs: asyncssh.SFTPAttrs) -> bool:
    return attrs.permissions is None or stat.S_ISREG(attrs.permissions)


def _remote(final: bytes, attrs: asyncssh.SFTPAttrs) -> dict[str, Any]:
    path = final.decode("utf-8", "backslashreplace")
    return {"path": path, "size": attrs.size, "mtime": attrs.mtime}


def _classify(e: asyncssh.Error | OSError, where: str) -> SinkError:
    """The server's or the network's answer as an error class."""
    if isinstance(e, asyncssh.SFTPError):
        error_class, retryable = _sftp_class(e)
        text = f"{where}: {e.reason or 'SFTP error'} (SFTP status {e.code})"
        return SinkError(error_class, text, retryable=retryable)
    if isinstance(e, asyncssh.PermissionDenied):
        text = f"{where}: the server refused our credentials"
        return SinkError("sink_denied", text, retryable=False)
    if isinstance(e, OSError):  # refused, reset, DNS, no answer to connect
        why = e.strerror or str(e) or "no answer in time"
        return SinkError("sink_unreachable", f"{where}: {why}", retryable=True)
    if isinstance(e, asyncssh.DisconnectError | asyncssh.ChannelOpenError):
        return SinkError("sink_unreachable", f"{where}: {e.reason}", retryable=True)
    return SinkError("sink_error", f"{where}: {e.reason}", retryable=True)


def _sftp_class(e: asyncssh.SFTPError) -> tuple[str, bool]:
    if e.code == asyncssh.FX_FAILURE:  # SFTP v3 has no code for these; rclone says them
        reason = e.reason.lower()
        for words, error_class, retryable in _FAILURE_REASONS:
            if words in reason:
                return error_class, retryable
    return _SFTP_CLASSES.get(e.code, ("sink_error", True))
