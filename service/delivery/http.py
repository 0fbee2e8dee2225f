"""The HTTP sink: each item is one request (PUT or POST) whose body is the file.

A single request is atomic by nature: a receiver that sees the whole body (as many
bytes as `Content-Length` says) has the file, one that sees less has nothing. The
body is streamed from the file and hashed as it is read; the last chunk is held back
until the whole file has been read and checked against `Item.sha256`, so a file that
changed underneath is never sent whole: the stream raises, the connection is dropped
short of `Content-Length`, and the receiver discards the partial body. A file of up to
a MiB is read and checked in one thread call before a byte is sent.

HTTP has no general "is it already there" question, so the sink asks the receiver to
answer it: every request carries `Idempotency-Key` (the same on every attempt of an
item on a sink) and the digest of the body (`Content-Digest`, RFC 9530). A receiver
that recognises the key answers 2xx again without storing twice (the retry after a
lost acknowledgement); one that already holds other bytes under the name answers 409,
which with `exists: fail` is `remote_exists`. Any 2xx is a delivery.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any
from urllib.parse import quote

import aiofiles
import anyio
import httpx

from service.delivery.base import Item, Receipt, Sink, SinkError, modified, read_checked, unreadable
from service.httpclient import client, verification
from service.settings.sinks import HttpSink

__all__ = ["HttpDelivery"]

_CHUNK = 1 << 20
_BODY_SHOWN = 200


class _Modified(Exception):
    """Raised inside the body stream: the file's bytes are not the item's."""

    def __init__(self, size: int, sha256: str) -> None:
        super().__init__(size, sha256)
        self.size, self.sha256 = size, sha256


class _Unreadable(Exception):
    """Raised inside the body stream: the source file could not be read."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


class HttpDelivery(Sink):
    """One HTTP endpoint, one `httpx.AsyncClient` (opened once, pooled, reused)."""

    def __init__(self, settings: HttpSink) -> None:
        self.settings = settings
        self.name = settings.name
        scheme, _, rest = settings.url.partition("://")
        host = rest.partition("/")[0]
        self._base = f"{scheme}://{host}/"
        self._shown_base = f"{scheme}://{host.rpartition('@')[2]}/"
        self._client: httpx.AsyncClient | None = None
        self._secrets: dict[str, str] = {}

    async def open(self) -> None:
        s = self.settings
        secrets = {}
        for header, secret in s.secret_headers.items():
            try:
                secrets[header] = secret.read()
            except ValueError as e:
                what = f"sink {s.name}: secret header {header}: {e}"
                raise SinkError("sink_config", what, retryable=False) from None
        try:
            verify = verification(s.verify_tls, s.ca_file)
        except ValueError as e:
            raise SinkError("sink_config", f"sink {s.name}: {e}", retryable=False) from None
        self._secrets = secrets
        self._client = client(verify=verify, timeout_s=s.timeout_s, concurrency=s.concurrency)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def url(self, item: Item) -> str:
        """`scheme://host/` and the rendered path, each segment percent-encoded."""
        return self._base + _quoted(item.target)

    def location(self, item: Item) -> str:
        return self._shown_base + _quoted(item.target)

    async def deliver(self, item: Item) -> Receipt:
        if self._client is None:
            raise RuntimeError(f"sink {self.name} is not open")
        where = f"{self.settings.method} {self.location(item)}"
        method, url, headers = self.settings.method, self.url(item), self._headers(item)
        try:
            if item.size <= _CHUNK:  # read and checked in one thread call, sent whole
                whole = await anyio.to_thread.run_sync(read_checked, item)
                response = await self._client.request(method, url, content=whole, headers=headers)
                item.sent(item.size)
            else:
                async with aclosing(_body(item)) as body:
                    response = await self._client.request(
                        method, url, content=body, headers=headers
                    )
        except _Modified as e:
            raise modified(item, f"{e.size} bytes, sha256 {e.sha256}") from None
        except _Unreadable as e:
            raise unreadable(item, e.error) from None
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise SinkError("sink_unreachable", f"{where}: {_why(e)}", retryable=True) from None
        except httpx.TimeoutException as e:
            raise SinkError("timeout", f"{where}: {_why(e)}", retryable=True) from None
        except httpx.TransportError as e:
            # The connection broke before a whole answer came back (the receiver may
            # hold the file: the retry's Idempotency-Key lets it say so).
            what = f"{where}: connection lost: {_why(e)}"
            raise SinkError("sink_unreachable", what, retryable=True) from None
        return self._judge(item, response, where)

    def _headers(self, item: Item) -> httpx.Headers:
        digest = base64.b64encode(bytes.fromhex(item.sha256)).decode()
        headers = httpx.Headers({"Content-Type": "application/octet-stream"})
        headers.update(self.settings.headers)
        headers.update(self._secrets)
        headers.update(
            {
                "Content-Length": str(item.size),
                "Content-Digest": f"sha-256=:{digest}:",
                "Repr-Digest": f"sha-256=:{digest}:",
                "Digest": f"SHA-256={digest}",
                "Idempotency-Key": _quoted(item.idempotency_key, safe="/:"),
                "X-Filedock-Job-Id": item.job_id,
                "X-Filedock-Sha256": item.sha256,
            }
        )
        return headers

    def _judge(self, item: Item, response: httpx.Response, where: str) -> Receipt:
        status = response.status_code
        if not response.is_success:
            raise self._refusal(response, where)
        remote: dict[str, Any] = {"status": status}
        for header in ("ETag", "Location"):
            if (value := response.headers.get(header)) is not None:
                remote[header.lower()] = value
        return Receipt(self.location(item), item.size, item.sha256, remote)

    def _refusal(self, response: httpx.Response, where: str) -> SinkError:
        """The answer as an error class; the body's start is shown, with any secret
        header value a receiver echoed back masked."""
        status = response.status_code
        text = f"{where} answered {status}"
        if body := response.text[:_BODY_SHOWN].strip():
            text += f": {body}"
        for value in self._secrets.values():
            if value:
                text = text.replace(value, "***")
        if status >= 500 or status in self.settings.retry_statuses:
            return SinkError("sink_error", text, retryable=True)
        if status == 409 and self.settings.exists == "fail":
            return SinkError("remote_exists", text, retryable=False)
        if status in (401, 403):
            return SinkError("sink_denied", text, retryable=False)
        return SinkError("sink_rejected", text, retryable=False)


async def _body(item: Item) -> AsyncGenerator[bytes, None]:
    """The file in chunks, hashed as read. Each chunk is sent only once the next one
    is read; the last only after the size and SHA-256 matched, so a changed file
    raises before the receiver has a whole body."""
    h = hashlib.sha256()
    total = 0
    try:
        async with aiofiles.open(item.path, "rb") as f:
            chunk = await f.read(_CHUNK)
            while chunk:
                h.update(chunk)
                total += len(chunk)
                following = await f.read(_CHUNK)
                if total + len(following) > item.size:
                    raise _Modified(total + len(following), "(file grew)")
                if not following and (total != item.size or h.hexdigest() != item.sha256):
                    raise _Modified(total, h.hexdigest())
                yield chunk
                item.sent(len(chunk))
                chunk = following
        if total != item.size or h.hexdigest() != item.sha256:  # an empty file
            raise _Modified(total, h.hexdigest())
    except OSError as e:
        raise _Unreadable(e) from None


def _quoted(text: str, safe: str = "/") -> str:
    """Percent-encoded UTF-8: a url path, or a header value that stays ASCII (the same
    text always gives the same value: `%` itself is encoded)."""
    return quote(text.encode("utf-8", "surrogateescape"), safe=safe)


def _why(e: httpx.HTTPError) -> str:
    return str(e) or type(e).__name__
