"""The FTP sink: each item goes to a folder on an FTP or FTPS server, uploaded under a
temp name beside the final one and renamed into place with RNFR/RNTO.

ftplib runs in worker threads (at most `concurrency` at once), on a small pool of
logged-in sessions (`ftp_session`) reused across deliveries; a session that fails is
dropped and the next delivery logs in afresh. A delivery cut short by its timeout
shuts its session's connections down under the thread, so that no retry of the item
overlaps with it.

FTP has no rename that refuses to replace, and servers differ on RNTO onto an
existing name (vsftpd and pyftpdlib replace it, others refuse). With `exists: fail`
the final name is looked at just before the rename; a file that appears in the
moment between that SIZE and the RNTO is replaced: a window of one round trip that
only a server-side rename without replace would close. With `exists: replace` the
old file stays until the new one is whole: RNTO over it, or, where the server
refuses, the old renamed aside, the new one in, the old one deleted.

The bytes are checked twice: hashed as they are read (against `Item.sha256`), and
after the rename by SIZE and, where FEAT offers one, the server's own SHA-256 (`HASH`
or `XSHA256`). Whether the final name already holds our bytes is asked the same way,
or by reading them back (RETR) where the server computes no hash.
"""

from __future__ import annotations

import ftplib
import functools
import hashlib
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import quote

import anyio

from service.crash import crash_point
from service.delivery.base import Item, Receipt, Sink, SinkError, modified, unreadable
from service.delivery.ftp_session import (
    BLOCK,
    FTP_ERRORS,
    NOT_MADE,
    NOT_THERE,
    PlainFtp,
    Session,
    TlsFtp,
    classify,
    ignoring,
    login,
    server_sha256,
    sha256_of,
    size_of,
    tls_context,
)
from service.settings.sinks import FtpSink

__all__ = ["FtpDelivery"]

_NAME_MAX = 255
_TEMP_SUFFIX = ".filedock-tmp"
_ASIDE_SUFFIX = ".filedock-old"


@dataclass(frozen=True)
class _Paths:
    """An item's names on the server; `folders`: the target's parents below the root."""

    final: str
    temp: str
    aside: str
    folders: tuple[str, ...]


class FtpDelivery(Sink):
    """One folder (`settings.root`) on one server; an item goes to `root/item.target`."""

    def __init__(self, settings: FtpSink) -> None:
        self.settings = settings
        self.name = settings.name
        self.port = settings.port or (990 if settings.tls == "implicit" else 21)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        scheme = "ftp" if settings.tls == "none" else "ftps"
        self._base = f"{scheme}://{quote(settings.username, safe='')}@{host}:{self.port}"
        self._limiter = anyio.CapacityLimiter(settings.concurrency)
        self._lock = threading.Lock()
        self._idle: list[Session] = []
        self._password: str | None = None
        self._context: ssl.SSLContext | None = None

    async def open(self) -> None:
        s = self.settings
        try:
            self._password = s.password.read() if s.password is not None else ""
        except ValueError as e:
            raise SinkError(
                "sink_config", f"sink {s.name}: password: {e}", retryable=False
            ) from None
        if s.tls != "none":
            self._context = tls_context(s)

    async def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        self._password = None
        for session in idle:
            await anyio.to_thread.run_sync(functools.partial(session.close, polite=True))

    def paths(self, item: Item) -> _Paths:
        root = self.settings.root
        parts = item.target.split("/")
        folders = tuple(_join(root, "/".join(parts[: i + 1])) for i in range(len(parts) - 1))
        final = _join(root, item.target)
        folder = final[: -len(parts[-1])]
        stem = parts[-1]
        if len(f".{stem}.{item.job_id}.{item.sink}{_TEMP_SUFFIX}".encode()) > _NAME_MAX:
            stem = hashlib.sha256(stem.encode()).hexdigest()[:16]
        own = f"{folder}.{stem}.{item.job_id}.{item.sink}"
        return _Paths(final, own + _TEMP_SUFFIX, own + _ASIDE_SUFFIX, folders)

    def location(self, item: Item) -> str:
        return self._url(_join(self.settings.root, item.target))

    def _url(self, path: str) -> str:
        shown = quote(path, safe="/~", errors="surrogateescape")
        return self._base + ("" if path.startswith("/") else "/") + shown

    async def deliver(self, item: Item) -> Receipt:
        if self._password is None:
            raise RuntimeError(f"sink {self.name} is not open")
        _check_target(item, self.location(item))
        attempt = _Attempt(self, item)
        try:
            return await anyio.to_thread.run_sync(
                attempt.run, limiter=self._limiter, abandon_on_cancel=True
            )
        except anyio.get_cancelled_exc_class():
            # A timeout: the thread is blocked on the server; cut it loose and let it end,
            # so that no retry of the item overlaps with it.
            if attempt.cancel():
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(attempt.ended.wait, 10.0)
            raise

    # -- the session pool, used from worker threads -----------------------------------

    def take(self) -> Session:
        """An idle session that still answers, or a new one."""
        while True:
            with self._lock:
                if not self._idle:
                    break
                session = self._idle.pop()
            try:
                session.ftp.voidcmd("NOOP")
                return session
            except FTP_ERRORS:
                session.close()
        return login(self.settings, self.port, self._context, self._password or "")

    def give_back(self, session: Session) -> None:
        with self._lock:
            if self._password is not None and len(self._idle) < self.settings.concurrency:
                self._idle.append(session)
                return
        session.close(polite=True)


class _Attempt:
    """One delivery of one item, run in a worker thread on one session."""

    def __init__(self, sink: FtpDelivery, item: Item) -> None:
        self.sink, self.item = sink, item
        self.exists = sink.settings.exists
        self.paths = sink.paths(item)
        self.step = "log in"
        self.session: Session | None = None
        self.ended = threading.Event()
        self._lock = threading.Lock()
        self._started = self._cancelled = False

    def cancel(self) -> bool:
        """Stop the attempt from another thread: its session's connections are shut
        down under it. True if its thread had started (then wait on `ended`)."""
        with self._lock:
            self._cancelled = True
            if self.session is not None:
                self.session.sever()
            return self._started

    def run(self) -> Receipt:
        with self._lock:
            if self._cancelled:  # its caller is gone: this result goes nowhere
                raise SinkError("timeout", "cancelled before it began", retryable=True)
            self._started = True
        try:
            session = self.sink.take()
            with self._lock:
                self.session = session
                if self._cancelled:
                    session.sever()
            receipt = self._deliver(session)
        except SinkError:
            if self.session is not None:
                self.sink.give_back(self.session)  # it ended its commands cleanly
            raise
        except BaseException as e:
            if self.session is not None:
                self.session.close()
            if isinstance(e, FTP_ERRORS):
                where = f"{self.sink.location(self.item)}: {self.step}"
                raise classify(e, where, handshake=self.step == "log in") from None
            raise
        finally:
            self.ended.set()
        self.sink.give_back(session)
        return receipt

    def _deliver(self, session: Session) -> Receipt:
        ftp, p = session.ftp, self.paths
        self.step = "make folders"
        for folder in p.folders:
            ignoring(NOT_MADE, ftp.mkd, folder)
        self.step = "remove an earlier attempt's temp file"
        ignoring(NOT_THERE, ftp.delete, p.temp)
        if self.exists == "replace":
            self._restore_aside(ftp)
        self.step = "look at the final name"
        size = size_of(ftp, p.final)
        if size is not None and (found := self._existing(session, size)):
            return found
        self.step = "upload"
        self._upload(ftp)
        self.step = "publish"
        if (found := self._publish(session)) is not None:
            return found
        self.step = "verify"
        return self._verify(session)

    def _existing(self, session: Session, size: int) -> Receipt | None:
        """The final name is taken: our bytes (found), or `remote_exists` unless the sink
        replaces (then None: go on)."""
        if size == self.item.size and sha256_of(session, self.paths.final) == self.item.sha256:
            return self._receipt(session, size, found=True)
        if self.exists == "replace":
            return None
        what = f"{self.sink.location(self.item)} holds other bytes ({size} bytes)"
        raise SinkError("remote_exists", what, retryable=False)

    def _upload(self, ftp: PlainFtp | TlsFtp) -> None:
        """STOR the source into the temp name, hashing as it is read."""
        item = self.item
        try:
            f = open(item.path, "rb")
        except OSError as e:
            raise unreadable(item, e) from None
        with f:
            source = _Reading(f, item.size, item.sent)
            blocks = 0

            def sent(_block: bytes) -> None:
                nonlocal blocks
                blocks += 1
                if blocks == 1:
                    crash_point("mid_delivery")  # part of the temp sent, not yet renamed

            ftp.storbinary(f"STOR {self.paths.temp}", source, BLOCK, sent)
        if blocks == 0:
            crash_point("mid_delivery")
        if source.error is not None or source.total != item.size or source.digest() != item.sha256:
            self.step = "remove the temp file"
            ignoring(NOT_THERE, ftp.delete, self.paths.temp)
            if source.error is not None:
                raise unreadable(item, source.error)
            raise modified(item, f"{source.total} bytes, sha256 {source.digest()}")

    def _publish(self, session: Session) -> Receipt | None:
        ftp, p = session.ftp, self.paths
        if self.exists == "fail":
            size = size_of(ftp, p.final)  # appeared while we uploaded?
            if size is not None:
                try:
                    return self._existing(session, size)
                finally:
                    ignoring(NOT_THERE, ftp.delete, p.temp)
            ftp.rename(p.temp, p.final)
            return None
        try:
            ftp.rename(p.temp, p.final)
        except ftplib.error_perm:
            if size_of(ftp, p.final) is None:
                raise
            # This server refuses to rename onto a file: the old one aside, then gone.
            self.step = "publish (the old file aside)"
            ftp.rename(p.final, p.aside)
            try:
                ftp.rename(p.temp, p.final)
            except BaseException:
                ignoring(("5",), ftp.rename, p.aside, p.final)
                raise
            ignoring(NOT_THERE, ftp.delete, p.aside)
        return None

    def _restore_aside(self, ftp: PlainFtp | TlsFtp) -> None:
        """An attempt killed between its two renames left the old file aside: it goes
        back under the final name if that is empty, or away if the new one is there."""
        p = self.paths
        if size_of(ftp, p.aside) is None:
            return
        if size_of(ftp, p.final) is None:
            ftp.rename(p.aside, p.final)
        else:
            ftp.delete(p.aside)

    def _verify(self, session: Session) -> Receipt:
        size = size_of(session.ftp, self.paths.final)
        digest = self.item.sha256
        if size == self.item.size and session.hash_command is not None:
            digest = server_sha256(session, self.paths.final)
        if size != self.item.size or digest != self.item.sha256:
            # Ours, just renamed: removed, so that the retry sends it again.
            ignoring(NOT_THERE, session.ftp.delete, self.paths.final)
            what = (
                f"{self.sink.location(self.item)} holds {size} bytes, sha256 {digest} after"
                f" the upload; sent {self.item.size} bytes, sha256 {self.item.sha256}"
            )
            raise SinkError("checksum_mismatch", what, retryable=True)
        return self._receipt(session, size)

    def _receipt(self, session: Session, size: int, *, found: bool = False) -> Receipt:
        remote: dict[str, Any] = {
            "path": self.paths.final,
            "size": size,
            "tls": self.sink.settings.tls,
        }
        if session.tls_version is not None:
            remote["tls_version"] = session.tls_version
        if session.hash_command is not None:
            remote["sha256_by"] = session.hash_command
        location = self.sink.location(self.item)
        return Receipt(location, self.item.size, self.item.sha256, remote, found=found)


class _Reading:
    """The source as `storbinary` reads it: hashed, stopped one byte past the claimed
    size (a file still growing is not sent on and on), a read error kept for after
    the transfer, so the session ends the STOR cleanly and can delete the temp."""

    def __init__(self, f: BinaryIO, size: int, sent: Callable[[int], None]) -> None:
        self._f, self._size, self._sent = f, size, sent
        self._h = hashlib.sha256()
        self.total = 0
        self.error: OSError | None = None

    def read(self, n: int = -1) -> bytes:
        if self.error is not None or self.total > self._size:
            return b""
        try:
            chunk = self._f.read(min(n, self._size + 1 - self.total) if n > 0 else -1)
        except OSError as e:
            self.error = e
            return b""
        self._h.update(chunk)
        self.total += len(chunk)
        self._sent(len(chunk))
        return chunk

    def digest(self) -> str:
        return self._h.hexdigest()


def _join(root: str, relative: str) -> str:
    if root in ("", "."):
        return relative
    return f"{root.rstrip('/')}/{relative}"


def _check_target(item: Item, location: str) -> None:
    """FTP commands are lines of UTF-8: a name must fit in one."""
    try:
        item.target.encode("utf-8")
    except UnicodeEncodeError:
        raise SinkError(
            "bad_target", f"{location}: the name is not UTF-8", retryable=False
        ) from None
    if "\r" in item.target or "\n" in item.target:
        what = f"{location}: FTP cannot name a file with a line break"
        raise SinkError("bad_target", what, retryable=False)
