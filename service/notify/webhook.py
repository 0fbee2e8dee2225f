"""The webhook channel: each event one signed POST of its CloudEvent (Standard Webhooks).

The body is the event in CloudEvents' structured mode (`application/cloudevents+json`,
compact UTF-8 JSON), signed as Standard Webhooks says: `webhook-id` is the event's id,
stable across re-sends, so a receiver that keeps the ids it has seen drops the
duplicate a crash after a send may cause; `webhook-timestamp` is when this attempt was
signed, which receivers check against replays (five minutes either way by default), so
each attempt is signed afresh; `webhook-signature` is `v1,` and the base64 HMAC-SHA256
of `{id}.{timestamp}.{body}` under the secret's key (the base64 after `whsec_`).

A 2xx is delivery. 5xx, 408, 429, a connection refused or broken and a timeout may
pass later and are retried; any other answer (400, 401 for a signature the receiver
refuses, a redirect to follow by hand) never will as configured, and neither will a
certificate the receiver's CA does not vouch for.

The client is aiohttp's: a request costs it about 0.2 ms of CPU, against 1.7 ms
through httpx (`docs/benchmarks.md`, "Notifications"), and the sends share the event
loop with the whole pipeline.
"""

from __future__ import annotations

import base64
import binascii
import json
import ssl
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import aiohttp
import anyio
import orjson
from standardwebhooks import Webhook

from service.httpclient import verification
from service.notify.base import Channel, ChannelError, Event
from service.settings.notify import WebhookChannel

__all__ = ["WebhookSender"]

_BODY_SHOWN = 200
_RETRIED_4XX = frozenset({408, 429})
_SECRET_PREFIX = "whsec_"


class WebhookSender(Channel):
    """One endpoint, one pooled `aiohttp.ClientSession`; each event signed when it is sent.

    `clock` gives the signature's unix time (tests pin it to check a signature by
    hand)."""

    def __init__(self, settings: WebhookChannel, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.name = settings.name
        self._clock = clock
        # Shown in errors: without credentials in the authority or a token in the query.
        scheme, _, rest = settings.url.partition("://")
        authority, slash, path = rest.partition("/")
        path = path.partition("?")[0].partition("#")[0]
        self._shown_url = f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"
        self._client: aiohttp.ClientSession | None = None
        self._signer: Webhook | None = None
        self._masked: tuple[str, ...] = ()

    async def open(self) -> None:
        s = self.settings
        try:
            secret = s.secret.read()
        except ValueError as e:
            raise ChannelError(f"webhook {s.name}: secret: {e}", retryable=False) from None
        key = _signing_key(secret)
        if key is None:
            what = f"webhook {s.name}: the secret is not `whsec_` and base64 (value not shown)"
            raise ChannelError(what, retryable=False)
        try:
            verify = verification(s.verify_tls, s.ca_file)
        except ValueError as e:
            raise ChannelError(f"webhook {s.name}: {e}", retryable=False) from None
        self._signer = Webhook(key)
        self._masked = tuple(
            v for v in (secret, secret.removeprefix(_SECRET_PREFIX)) if len(v) >= 4
        )
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=s.concurrency, ssl=verify),
            timeout=aiohttp.ClientTimeout(total=s.timeout_s),
            # Proxy settings and .netrc credentials from the environment are not the
            # configuration's: the channel talks to what its URL names, nothing else.
            trust_env=False,
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        self._signer = None

    async def send(self, events: Sequence[Event]) -> list[ChannelError | None]:
        if self._client is None or self._signer is None:
            raise RuntimeError(f"webhook {self.name} is not open")
        results: list[ChannelError | None] = [None] * len(events)
        todo = iter(enumerate(events))

        async def worker() -> None:  # a task per connection, not per event: cheaper
            for i, event in todo:
                results[i] = await self._post(event)

        async with anyio.create_task_group() as tg:
            for _ in range(min(self.settings.concurrency, len(events))):
                tg.start_soon(worker)
        return results

    async def _post(self, event: Event) -> ChannelError | None:
        """One event as one signed request: None when a 2xx came back, else why not."""
        assert self._client is not None
        body = _body(event)
        try:
            async with self._client.post(
                self.settings.url,
                data=body,
                headers=self._headers(event.id, body),
                allow_redirects=False,
            ) as response:
                status = response.status
                if 200 <= status < 300:
                    return None
                shown = (await response.content.read(4 * _BODY_SHOWN)).decode("utf-8", "replace")
                location = response.headers.get("location", "")
        except TimeoutError as e:
            return self._error(f"timed out: {_why(e)}", retryable=True)
        except aiohttp.InvalidURL as e:
            return self._error(f"invalid url: {e}", retryable=False)
        except aiohttp.ClientError as e:
            if _certificate_refused(e):
                return self._error(f"TLS certificate not trusted: {_why(e)}", retryable=False)
            return self._error(f"connection failed: {_why(e)}", retryable=True)
        text = f"answered {status}"
        if shown := shown[:_BODY_SHOWN].strip():
            text += f": {shown}"
        elif status in (301, 302, 303, 307, 308) and location:
            text += f" (Location: {location[:_BODY_SHOWN]})"
        return self._error(text, retryable=status >= 500 or status in _RETRIED_4XX)

    def _headers(self, event_id: str, body: bytes) -> dict[str, str]:
        assert self._signer is not None
        now = int(self._clock())
        signature = self._signer.sign(event_id, datetime.fromtimestamp(now, UTC), body)
        # The signature's headers come last: configured headers never replace them.
        return self.settings.headers | {
            "Content-Type": "application/cloudevents+json",
            "webhook-id": event_id,
            "webhook-timestamp": str(now),
            "webhook-signature": signature,
        }

    def _error(self, what: str, *, retryable: bool) -> ChannelError:
        text = f"webhook {self.name}: POST {self._shown_url} {what}"
        for value in self._masked:  # a receiver that echoes what it got
            text = text.replace(value, "***")
        return ChannelError(text, retryable=retryable)


def _signing_key(secret: str) -> bytes | None:
    """The HMAC key: the base64 after `whsec_` (the prefix is optional, as the receivers'
    libraries take it); None when that is not base64 or is empty."""
    text = secret.strip().removeprefix(_SECRET_PREFIX)
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key or None


def _body(event: Event) -> bytes:
    """Compact UTF-8 JSON. What orjson refuses (an integer beyond 64 bits in an
    importer's detail) the standard encoder still writes, escaped to ASCII."""
    doc = event.to_json()
    try:
        return orjson.dumps(doc)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(doc, separators=(",", ":")).encode("ascii")


def _certificate_refused(e: BaseException) -> bool:
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        return True
    chain: list[BaseException] = []
    seen: BaseException | None = e
    while seen is not None and seen not in chain:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return False


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__
