"""An S3 multipart upload of one item: what the S3 sink sends for a large file.

Leftovers of the key (a crashed attempt's unfinished uploads) are aborted first. Each
part is streamed from the file (`FileWindow`), never held in memory whole: a 1 GiB
upload costs the service a few MiB, not a part. The whole file's SHA-256 is checked
before the upload is completed, so a changed file never becomes an object:

- with `checksum: sha256` each part is read and hashed first (the file's SHA-256 and
  the part's), and the part goes with its SHA-256, which the store checks against the
  bytes it receives: what it holds is what was hashed;
- with `checksum: none` the store checks nothing, so the file's SHA-256 is taken from
  the bytes as they are sent (`FileWindow` hashes every pass over a part; the last is
  the one aiohttp sent).

Any failure aborts the upload.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from typing import IO, TYPE_CHECKING, Any, cast

import aiofiles
import anyio
from botocore.exceptions import ClientError

from service.crash import crash_point
from service.delivery.base import Item, SinkError, modified

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3 import type_defs as t
    from types_aiobotocore_s3.literals import StorageClassType

    from service.settings.sinks import S3Sink

__all__ = ["FileWindow", "Multipart", "error_code"]

_ABORT_TIMEOUT_S = 30.0
_CHUNK = 256 << 10  # what a pass over a part reads at a time (aiohttp reads as much)


class Multipart:
    """One multipart upload of an item: leftovers of the key aborted first, each part
    streamed from the file, and the upload aborted on any failure."""

    def __init__(self, settings: S3Sink, client: S3Client, key: str, item: Item) -> None:
        self.settings, self.client, self.key, self.item = settings, client, key, item
        self.bucket = settings.bucket
        self.checksum = settings.checksum == "sha256"

    async def run(self, conditional: bool) -> dict[str, Any]:
        await self.abort_leftovers()
        args: t.CreateMultipartUploadRequestTypeDef = {
            "Bucket": self.bucket,
            "Key": self.key,
            "Metadata": {"sha256": self.item.sha256},
        }
        if self.checksum:  # then SeaweedFS refuses to complete without every part's
            args["ChecksumAlgorithm"] = "SHA256"
        if self.settings.storage_class:
            args["StorageClass"] = cast("StorageClassType", self.settings.storage_class)
        upload_id = (await self.client.create_multipart_upload(**args))["UploadId"]
        try:
            done: t.CompleteMultipartUploadRequestTypeDef = {
                "Bucket": self.bucket,
                "Key": self.key,
                "UploadId": upload_id,
                "MultipartUpload": {"Parts": await self.send_parts(upload_id)},
            }
            if conditional:
                done["IfNoneMatch"] = "*"
            r = await self.client.complete_multipart_upload(**done)
        except BaseException:
            with anyio.move_on_after(_ABORT_TIMEOUT_S, shield=True):
                await self.abort(upload_id)
            raise
        return {
            "etag": r.get("ETag", "").strip('"'),
            "version_id": r.get("VersionId"),
            "checksum_sha256": r.get("ChecksumSHA256"),
            "parts": len(done["MultipartUpload"].get("Parts", [])),
        }

    async def send_parts(self, upload_id: str) -> list[t.CompletedPartTypeDef]:
        item, part_size = self.item, self.settings.part_size_bytes
        whole = hashlib.sha256()
        parts: list[t.CompletedPartTypeDef] = []
        async with aiofiles.open(item.path, "rb") as f:
            fd = f.fileno()
            for start in range(0, item.size, part_size):
                length = min(part_size, item.size - start)
                if self.checksum:
                    whole, part = await anyio.to_thread.run_sync(
                        hashed, item, FileWindow(fd, start, length, whole, hashlib.sha256())
                    )
                    body = FileWindow(fd, start, length)
                else:
                    part, body = None, FileWindow(fd, start, length, whole)
                try:
                    parts.append(await self.send_part(upload_id, len(parts) + 1, body, part))
                except Exception:
                    if body.short:
                        raise modified(item, "fewer bytes") from None
                    raise
                if not self.checksum:
                    whole = body.followed(item)[0]
                item.sent(length)
                crash_point("mid_delivery")  # parts uploaded, the object not yet whole
            if await anyio.to_thread.run_sync(os.pread, fd, 1, item.size):
                raise modified(item, "another size")
        if whole.hexdigest() != item.sha256:
            raise modified(item, f"sha256 {whole.hexdigest()}")
        return parts

    async def send_part(
        self, upload_id: str, number: int, body: FileWindow, sha: hashlib._Hash | None
    ) -> t.CompletedPartTypeDef:
        args: t.UploadPartRequestTypeDef = {
            "Bucket": self.bucket,
            "Key": self.key,
            "UploadId": upload_id,
            "PartNumber": number,
            "Body": cast("IO[bytes]", body),  # an io.RawIOBase: what botocore and aiohttp read
            "ContentLength": body.length,
        }
        if sha is not None:
            args["ChecksumSHA256"] = base64.b64encode(sha.digest()).decode()
        part: t.CompletedPartTypeDef = {"PartNumber": number}
        part["ETag"] = (await self.client.upload_part(**args))["ETag"]
        if sha is not None:
            part["ChecksumSHA256"] = args["ChecksumSHA256"]
        return part

    async def abort_leftovers(self) -> None:
        """Abort every unfinished upload of exactly this key (a crashed attempt's)."""
        pages = self.client.get_paginator("list_multipart_uploads")
        try:
            async for page in pages.paginate(Bucket=self.bucket, Prefix=self.key):
                for upload in page.get("Uploads", []):
                    if upload.get("Key") == self.key and "UploadId" in upload:
                        await self.abort(upload["UploadId"])
        except ClientError as e:
            if error_code(e) != "NoSuchUpload":  # rclone's answer while it holds none at all
                raise

    async def abort(self, upload_id: str) -> None:
        try:
            await self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=upload_id
            )
        except ClientError as e:
            if error_code(e) != "NoSuchUpload":  # already gone is what we want
                raise


class FileWindow(io.RawIOBase):
    """`length` bytes of an open file from `start`, as a request body read straight
    from the file with `pread` (the file's own offset is left alone).

    botocore reads a body once to sign it (over plain `http://`) and aiohttp once more
    to send it, each pass from the start. Every pass hashes what it reads into copies
    of `seeds` (the hashes of what came before the window): after the request,
    `followed` gives the hashes of the last whole pass, the bytes that were sent.
    `short` says the file ended early: it shrank since its claim.

    A read returns at most `_CHUNK` bytes, whatever it is asked for (botocore asks a
    MiB): each read is a new `bytes`, and glibc keeps the freed heap of larger
    ones, which an idle service holds on to.
    """

    def __init__(self, fd: int, start: int, length: int, *seeds: hashlib._Hash) -> None:
        super().__init__()
        self.fd, self.start, self.length = fd, start, length
        self.seeds, self.short = seeds, False
        self.pos = 0
        self.hashes = [h.copy() for h in seeds]
        self.hashed = 0  # how far from the start `hashes` follow the bytes read

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        if self.pos == 0:  # a new pass
            self.hashes, self.hashed = [h.copy() for h in self.seeds], 0
        return self.pos

    def read(self, size: int | None = -1) -> bytes:
        n = self.length - self.pos
        if size is not None and size >= 0:
            n = min(n, size)
        if n <= 0:
            return b""
        chunk = os.pread(self.fd, min(n, _CHUNK), self.start + self.pos)
        if not chunk:
            self.short = True
            raise OSError(f"the file ended {self.length - self.pos} bytes early")
        if self.pos == self.hashed:
            for h in self.hashes:
                h.update(chunk)
            self.hashed += len(chunk)
        self.pos += len(chunk)
        return chunk

    def followed(self, item: Item) -> list[hashlib._Hash]:
        """The hashes of the last whole pass over the window."""
        if self.hashed != self.length:
            what = f"{item.path}: the bytes sent were not all read in one pass"
            raise SinkError("sink_error", what, retryable=True)
        return self.hashes


def hashed(item: Item, window: FileWindow) -> list[hashlib._Hash]:
    """The window's hashes after one pass over it (in a worker thread); a file that
    ends early has changed since its claim."""
    try:
        while window.read():
            pass
    except OSError:
        if window.short:
            raise modified(item, "fewer bytes") from None
        raise
    return window.followed(item)


def error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))
