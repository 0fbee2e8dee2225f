"""The S3 sink: each item becomes one object, written whole or not at all.

S3 needs no temp name: a PutObject or a completed multipart upload is the one moment
an object appears. What a crash leaves is an unfinished multipart upload (invisible,
but it holds storage): the next delivery of the key aborts those before its own.

Our mark is the user metadata `sha256` (`x-amz-meta-sha256`): a later attempt knows
its bytes without reading them back. Where a store lost the mark (rclone's S3 server
keeps metadata in memory only), a whole-object SHA-256 checksum or a plain-MD5 ETag
of the right size is compared with the file instead.

The bytes are hashed as they are read and checked against `Item.sha256` before an
object can appear: a PUT is sent, a multipart upload (`s3_parts.py`) completed, only
after that. A PUT carries the MD5 of the checked bytes (`Content-MD5`), so a file
that changes between its check and its send is refused by the store.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
from contextlib import AsyncExitStack
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import aiofiles
import aiohttp
import anyio
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, ParamValidationError
from botocore.exceptions import ConnectionError as BotoConnectionError

from service.delivery.base import Item, Receipt, Sink, SinkError, modified, read_checked, unreadable
from service.delivery.s3_parts import FileWindow, Multipart, error_code, hashed
from service.settings.sinks import S3Sink

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3 import type_defs as t
    from types_aiobotocore_s3.literals import StorageClassType
    from types_aiobotocore_s3.type_defs import HeadObjectOutputTypeDef as Head

__all__ = ["S3Delivery"]

_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MAX_KEY_BYTES = 1024
# A single PUT's body up to this size is read into memory in one thread call (the
# cheapest for the many small files); a larger one is streamed from the file.
_IN_MEMORY_MAX_BYTES = 1 << 20
# Asked again later, these may well succeed (S3's own advice for each).
_RETRY_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestTimeTooSkewed",
        "ConditionalRequestConflict",
        "OperationAborted",
    }
)
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "AllAccessDisabled",
        "AccountProblem",
    }
)


class S3Delivery(Sink):
    """An `S3Sink`'s deliveries, sharing one client and its connection pool."""

    def __init__(self, settings: S3Sink) -> None:
        self.settings = settings
        self.name = settings.name
        self._stack = AsyncExitStack()  # reusable: `aclose` empties it
        self._client: S3Client | None = None

    async def open(self) -> None:
        """Read the credentials and build the client. botocore retries nothing
        (`total_max_attempts: 1`): the framework retries the whole delivery with
        backoff, and a retry inside botocore would hide the first failure's cause."""
        s = self.settings
        try:
            key_id, secret = s.access_key_id.read(), s.secret_access_key.read()
        except ValueError as e:
            raise SinkError("sink_config", f"sink {s.name}: {e}", retryable=False) from None
        config = AioConfig(
            region_name=s.region,
            s3={
                "addressing_style": "path" if s.path_style else "auto",
                # With `checksum: sha256` every body goes with its SHA-256 in a signed
                # header, which the store checks: signing the body too would read and
                # hash it once more on the event loop (botocore does so on any
                # `http://` endpoint). With `none` the signature is the check.
                "payload_signing_enabled": s.checksum != "sha256",
            },
            request_checksum_calculation=s.request_checksum_calculation,
            response_checksum_validation=s.response_checksum_validation,
            connect_timeout=min(s.timeout_s, 30.0),
            read_timeout=s.timeout_s,
            max_pool_connections=s.concurrency,
            retries={"mode": "standard", "total_max_attempts": 1},
        )
        try:
            self._client = await self._stack.enter_async_context(
                get_session().create_client(
                    "s3",
                    endpoint_url=s.endpoint_url,
                    aws_access_key_id=key_id,
                    aws_secret_access_key=secret,
                    config=config,
                )
            )
        except ValueError as e:  # a malformed endpoint_url or region
            raise SinkError("sink_config", f"sink {s.name}: {e}", retryable=False) from None

    async def close(self) -> None:
        self._client = None
        await self._stack.aclose()

    def key(self, item: Item) -> str:
        """The object key: `prefix` and the rendered target joined by one `/`."""
        prefix = self.settings.prefix.strip("/")
        return f"{prefix}/{item.target}" if prefix else item.target

    def location(self, item: Item) -> str:
        key = self.key(item).encode("utf-8", "backslashreplace").decode("utf-8")
        return f"s3://{self.settings.bucket}/{key}"

    async def deliver(self, item: Item) -> Receipt:
        if self._client is None:
            raise RuntimeError(f"sink {self.name} is not open")
        key, where = self.key(item), self.location(item)
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError:
            raise SinkError("bad_target", f"{where}: not valid UTF-8", retryable=False) from None
        if size > _MAX_KEY_BYTES:
            raise SinkError("bad_target", f"{where}: over {_MAX_KEY_BYTES} bytes", retryable=False)
        try:
            return await self._deliver(self._client, key, item)
        except ClientError as e:
            raise _client_error(e, where) from None
        except ParamValidationError as e:
            raise SinkError("sink_config", f"{where}: {e}", retryable=False) from None
        except (
            BotoConnectionError,
            HTTPClientError,
            aiohttp.ClientError,
            ConnectionError,
            TimeoutError,
        ) as e:
            raise SinkError("sink_unreachable", f"{where}: {e}", retryable=True) from None
        except BotoCoreError as e:
            raise SinkError("sink_error", f"{where}: {e}", retryable=True) from None
        except OSError as e:  # the network's are caught above: this is the local file's
            raise unreadable(item, e) from None

    async def _deliver(self, client: S3Client, key: str, item: Item) -> Receipt:
        s = self.settings
        multipart = item.size >= s.multipart_threshold_bytes
        if s.head_first or multipart:
            head = await self._head(client, key)
            if head is not None and (found := await self._judge(head, item)) is not None:
                return found
        conditional = s.conditional_writes and s.exists == "fail"
        try:
            if multipart:
                sent = await Multipart(self.settings, client, key, item).run(conditional)
            else:
                sent = await self._put(client, key, item, conditional)
        except ClientError as e:
            if not (conditional and error_code(e) in ("PreconditionFailed", "412")):
                raise
            # An object is there: it appeared since our HEAD, or there was none (`head_first`).
            head = await self._head(client, key)
            if head is None or (found := await self._judge(head, item)) is None:
                what = f"{self.location(item)} changed while we wrote it"
                raise SinkError("sink_error", what, retryable=True) from None
            return found
        md5 = sent.pop("md5", None)
        if md5 is not None and self.settings.etag_is_md5 and sent.get("etag") == md5:
            # The store's answer to the PUT names the MD5 of what it received: ours.
            head = None
        else:
            head = await self._head(client, key)
            self._verify(head, item, md5)
        remote = _remote(head or {}) | {k: v for k, v in sent.items() if v}
        remote["multipart"], remote["parts"] = multipart, sent.get("parts", 1)
        return Receipt(self.location(item), item.size, item.sha256, remote)

    async def _head(self, client: S3Client, key: str) -> Head | None:
        """The object's HEAD, or None where there is none (HEAD has no body, so a
        missing bucket is a plain 404 too; the write that follows names it)."""
        args: t.HeadObjectRequestTypeDef = {"Bucket": self.settings.bucket, "Key": key}
        if self.settings.checksum == "sha256":
            args["ChecksumMode"] = "ENABLED"
        try:
            return await client.head_object(**args)
        except ClientError as e:
            if error_code(e) in ("404", "NoSuchKey", "NotFound"):  # a HEAD's code is its status
                return None
            raise

    async def _judge(self, head: Head, item: Item) -> Receipt | None:
        """An existing object: ours (a receipt saying found), not ours with
        `exists: replace` (None: write over it), otherwise `remote_exists`."""
        if await self._holds(head, item):
            return Receipt(self.location(item), item.size, item.sha256, _remote(head), found=True)
        if self.settings.exists == "replace":
            return None
        theirs = f"{head.get('ContentLength')} bytes, sha256 {_our_mark(head) or 'unknown'}"
        what = f"{self.location(item)} holds other bytes ({theirs}); the sink says exists: fail"
        raise SinkError("remote_exists", what, retryable=False)

    async def _holds(self, head: Head, item: Item) -> bool:
        """Whether the object is the item's bytes, on the best evidence the store gives."""
        if head.get("ContentLength") != item.size:
            return False
        if (ours := _our_mark(head)) is not None:
            return ours == item.sha256
        checksum = head.get("ChecksumSHA256", "")
        if checksum and head.get("ChecksumType") != "COMPOSITE" and "-" not in checksum:
            return checksum == _b64(item.sha256)
        etag = head.get("ETag", "").strip('"')
        if not self.settings.etag_is_md5 or not _MD5_ETAG.match(etag):
            return False
        return await anyio.to_thread.run_sync(_file_digests, item.path) == (item.sha256, etag)

    async def _put(
        self, client: S3Client, key: str, item: Item, conditional: bool
    ) -> dict[str, Any]:
        """One PutObject of the whole file, its size, SHA-256 and MD5 checked first.

        The MD5 goes with it (`Content-MD5`), which every S3 store checks against the
        bytes it receives: what becomes the object is what was checked here, even
        where the file is streamed and changes after its check. A file up to
        `_IN_MEMORY_MAX_BYTES` is read once into memory; a larger one is hashed and then
        streamed from the file, so `concurrency` large PUTs hold no file in memory."""
        async with AsyncExitStack() as stack:
            body: io.BytesIO | FileWindow
            if item.size <= _IN_MEMORY_MAX_BYTES:
                body, md5 = await anyio.to_thread.run_sync(_read_checked, item)
            else:
                fd = (await stack.enter_async_context(aiofiles.open(item.path, "rb"))).fileno()
                md5 = await anyio.to_thread.run_sync(_checked_md5, item, fd)
                body = FileWindow(fd, 0, item.size)
            args: t.PutObjectRequestTypeDef = {
                "Bucket": self.settings.bucket,
                "Key": key,
                "Body": cast("IO[bytes]", body),
                "ContentLength": item.size,
                "ContentMD5": _b64(md5),
                "Metadata": {"sha256": item.sha256},
            }
            if self.settings.checksum == "sha256":
                args["ChecksumSHA256"] = _b64(item.sha256)
            if self.settings.storage_class:
                args["StorageClass"] = cast("StorageClassType", self.settings.storage_class)
            if conditional:
                args["IfNoneMatch"] = "*"
            try:
                r = await client.put_object(**args)
            except Exception as e:
                if isinstance(body, FileWindow) and body.short:
                    raise modified(item, "fewer bytes") from None
                if isinstance(e, ClientError) and error_code(e) == "BadDigest":
                    await self._bad_digest(item)
                raise
        item.sent(item.size)
        return {
            "etag": r.get("ETag", "").strip('"'),
            "version_id": r.get("VersionId"),
            "checksum_sha256": r.get("ChecksumSHA256"),
            "md5": md5,
        }

    async def _bad_digest(self, item: Item) -> None:
        """The store received other bytes than were checked: the file changed since
        (its claim's SHA-256 no longer matches), or they were damaged on the way."""
        sha = (await anyio.to_thread.run_sync(_file_digests, item.path))[0]
        if sha != item.sha256:
            raise modified(item, f"sha256 {sha}")
        what = f"{self.location(item)}: the store received other bytes than were sent"
        raise SinkError("checksum_mismatch", what, retryable=True)

    def _verify(self, head: Head | None, item: Item, md5: str | None) -> None:
        """What the store says it now holds, against what we sent. A multipart ETag is
        no MD5 of the bytes, so only a single PUT's is compared."""
        if head is None:
            problem = "it is not there after the upload"
        elif head.get("ContentLength") != item.size:
            problem = f"it has {head.get('ContentLength')} bytes, not {item.size}"
        elif _our_mark(head) != item.sha256:
            problem = "its x-amz-meta-sha256 is not ours"
        elif (
            md5
            and self.settings.etag_is_md5
            and _MD5_ETAG.match(etag := head.get("ETag", "").strip('"'))
            and etag != md5
        ):
            problem = f"its ETag {etag} is not our MD5 {md5}"
        else:
            return
        raise SinkError("checksum_mismatch", f"{self.location(item)}: {problem}", retryable=True)


def _read_checked(item: Item) -> tuple[io.BytesIO, str]:
    """The file's bytes (`read_checked`) in a BytesIO of their own, and their MD5: one
    call in a worker thread.

    aiohttp wants a large body as a BytesIO (it warns about raw bytes) and takes its
    `getbuffer()`, which copies the bytes while anything else holds them: once this
    returns, the BytesIO alone does.
    """
    data = read_checked(item)
    return io.BytesIO(data), hashlib.md5(data, usedforsecurity=False).hexdigest()


def _checked_md5(item: Item, fd: int) -> str:
    """The MD5 of the open file's bytes, once their size and SHA-256 are the claim's:
    one pass in a worker thread, through a `FileWindow` (nothing held)."""
    window = FileWindow(fd, 0, item.size, hashlib.sha256(), hashlib.md5(usedforsecurity=False))
    sha, md5 = hashed(item, window)
    if os.pread(fd, 1, item.size):
        raise modified(item, "another size")
    if sha.hexdigest() != item.sha256:
        raise modified(item, f"sha256 {sha.hexdigest()}")
    return md5.hexdigest()


def _file_digests(path: Path) -> tuple[str, str]:
    """SHA-256 and MD5 of a file, read a MiB at a time (in a worker thread)."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _our_mark(head: Head) -> str | None:
    """Our `x-amz-meta-sha256`, in any case (rclone's is `Sha256` after a multipart)."""
    for name, value in head.get("Metadata", {}).items():
        if name.lower() == "sha256":
            return value
    return None


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _remote(head: Head | dict[str, Any]) -> dict[str, Any]:
    named = {"etag": "ETag", "version_id": "VersionId", "checksum_sha256": "ChecksumSHA256"}
    return {name: str(head.get(f)).strip('"') for name, f in named.items() if head.get(f)}


def _client_error(e: ClientError, where: str) -> SinkError:
    """The store's answer as an error class. Only its code, status and message are
    shown: S3 never echoes a secret in them (a request's signature is not there)."""
    code, status = (
        error_code(e),
        int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)),
    )
    message = str(e.response.get("Error", {}).get("Message", "")).strip()
    op = getattr(e, "operation_name", "") or "request"
    text = f"{where}: {op} answered {status} {code}" + (f": {message}" if message else "")
    if code in _RETRY_CODES or status >= 500 or status in (408, 429):
        return SinkError("sink_error", text, retryable=True)
    if code in _DENIED_CODES or status in (401, 403):
        return SinkError("sink_denied", text, retryable=False)
    return SinkError("sink_rejected", text, retryable=False)
