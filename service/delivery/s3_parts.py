"""An S3 multipart upload of one item: what the S3 sink sends for a large file.

Leftovers of the key (a crashed attempt's unfinished uploads) are aborted first;
parts are read one at a time, so one part is in memory; each part is hashed (and
carries its SHA-256 where the sink sends checksums) and the whole file's SHA-256 is
checked before the upload is completed, so a changed file never becomes an object.
Any failure aborts the upload.
"""

from __future__ import annotations

import base64
import hashlib
import io
from typing import TYPE_CHECKING, Any, cast

import aiofiles
import anyio
from botocore.exceptions import ClientError

from service.crash import crash_point
from service.delivery.base import Item, modified

if TYPE_CHECKING:
    from aiofiles.threadpool.binary import AsyncBufferedReader
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3 import type_defs as t
    from types_aiobotocore_s3.literals import StorageClassType

    from service.settings.sinks import S3Sink

__all__ = ["Multipart", "error_code", "fill", "hash_into"]

_ABORT_TIMEOUT_S = 30.0


class Multipart:
    """One multipart upload of an item: leftovers of the key aborted first, parts read
    one at a time (one part in memory), and the upload aborted on any failure."""

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
        whole, read = hashlib.sha256(), 0
        parts: list[t.CompletedPartTypeDef] = []
        async with aiofiles.open(item.path, "rb") as f:
            while read < item.size:
                body = await fill(f, min(part_size, item.size - read))
                if body is None:
                    raise modified(item, "another size")
                read += body.getbuffer().nbytes
                part = hashlib.sha256() if self.checksum else None
                await anyio.to_thread.run_sync(hash_into, body, whole, part)
                parts.append(await self.send_part(upload_id, len(parts) + 1, body, part))
                item.sent(body.getbuffer().nbytes)
                crash_point("mid_delivery")  # parts uploaded, the object not yet whole
                del body  # before the next part is read: one part in memory, not two
            if await f.read(1):
                raise modified(item, "another size")
        if whole.hexdigest() != item.sha256:
            raise modified(item, f"sha256 {whole.hexdigest()}")
        return parts

    async def send_part(
        self, upload_id: str, number: int, body: io.BytesIO, sha: hashlib._Hash | None
    ) -> t.CompletedPartTypeDef:
        args: t.UploadPartRequestTypeDef = {
            "Bucket": self.bucket,
            "Key": self.key,
            "UploadId": upload_id,
            "PartNumber": number,
            "Body": body,
            "ContentLength": body.getbuffer().nbytes,
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


async def fill(f: AsyncBufferedReader, size: int) -> io.BytesIO | None:
    """The next `size` bytes of `f` in a BytesIO of their own, or None if `f` ends first.

    aiohttp wants a large body as a BytesIO (it warns about raw bytes) and takes its
    `getbuffer()`, which copies the bytes while anything else holds them: so they are
    read in place into the buffer of a BytesIO that alone owns it.
    """
    body = io.BytesIO(bytes(size))
    view, got = body.getbuffer(), 0
    while got < size and (n := await f.readinto(view[got:])):
        got += n
    return body if got == size else None


def hash_into(body: io.BytesIO, *hashes: hashlib._Hash | None) -> None:
    for h in filter(None, hashes):
        h.update(body.getbuffer())


def error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))
