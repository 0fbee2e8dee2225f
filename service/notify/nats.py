"""The NATS JetStream channel: each event published to a subject and acknowledged by the
stream that stores it.

The connection opens on the first send (a server down at start stops nothing) and is
shared by every send after. nats-py reconnects by itself, but only briefly
(`_RECONNECT_ATTEMPTS` per server, `_RECONNECT_WAIT_S` apart): a longer outage closes
the client and the next send connects afresh. The short window also bounds the first
connection, so a server that is down is reported within about a second, not after
nats-py's default minutes of retries. While the client reconnects, a send fails at
once as retryable instead of parking the publish in nats-py's buffer and waiting out
`timeout_s`; a disconnect cancels the publishes waiting for their acknowledgement.

Each message carries `Nats-Msg-Id: <event id>`: the stream drops a second copy within
its duplicate window (two minutes unless the stream says otherwise) and acknowledges
it as a duplicate, which is a success here. A subject no stream takes gets "no
responders" from the server: retryable, since an operator may create the stream later.
With `stream` set, the publish carries `Nats-Expected-Stream`, so the server refuses
to store the event in any other stream.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

import anyio
import orjson
from nats import errors as nats_errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js import errors as js_errors

from service.notify.base import Channel, ChannelError, ConnectionLost, Event
from service.settings.notify import NatsChannel

__all__ = ["NatsSender"]

log = logging.getLogger("filedock.notify")

_RECONNECT_ATTEMPTS = 1
_RECONNECT_WAIT_S = 1
_PING_INTERVAL_S = 20
# A batch publishes for at most this many `timeout_s` (after connecting, itself bounded
# by one): the dispatcher gives a send four, and results it gets are worth keeping.
_BATCH_TIMEOUTS = 2
_CONTENT_TYPE = "application/cloudevents+json"
_WRONG_STREAM = 10060  # JetStream's "expected stream does not match"


class NatsSender(Channel):
    """One JetStream publisher, one lazily opened NATS connection."""

    def __init__(self, settings: NatsChannel) -> None:
        self.settings = settings
        self.name = settings.name
        self._auth: dict[str, str] | None = None
        self._nc: Client | None = None
        self._connecting = anyio.Lock()
        self._in_flight: set[anyio.CancelScope] = set()
        self._shown = ", ".join(_without_userinfo(url) for url in settings.servers)

    async def open(self) -> None:
        self._auth = self._read_auth()

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.settings.timeout_s):
                await nc.close()

    async def send(self, events: Sequence[Event]) -> list[ChannelError | None]:
        try:
            nc = await self._connection()
        except ChannelError as e:
            return _each(e, len(events))
        js = nc.jetstream(timeout=self.settings.timeout_s)
        budget = _BATCH_TIMEOUTS * self.settings.timeout_s
        deadline = anyio.current_time() + budget
        results: list[ChannelError | None] = []
        for event in events:
            left = min(self.settings.timeout_s, deadline - anyio.current_time())
            if left <= 0:
                late = ChannelError(f"not sent: the batch took over {budget:g}s")
                results += _each(late, len(events) - len(results))
                break
            try:
                results.append(await self._publish(nc, js, event, left))
            except ConnectionLost as lost:
                results += _each(lost.error, len(events) - len(results))
                break
        return results

    # -- the connection ----------------------------------------------------------------

    def _read_auth(self) -> dict[str, str]:
        s = self.settings
        auth: dict[str, str] = {}
        try:
            if s.user is not None:
                auth["user"] = s.user
            if s.password is not None:
                auth["password"] = s.password.read()
            if s.token is not None:
                auth["token"] = s.token.read()
        except ValueError as e:
            raise ChannelError(f"channel {s.name}: {e}", retryable=False) from None
        return auth

    async def _connection(self) -> Client:
        async with self._connecting:
            if self._nc is not None and self._nc.is_closed:
                self._nc = None  # nats-py gave up reconnecting: start over
            if self._nc is None:
                self._nc = await self._connect()
            if not self._nc.is_connected:
                raise ChannelError(f"the connection to NATS at {self._shown} is lost; reconnecting")
            return self._nc

    async def _connect(self) -> Client:
        if self._auth is None:
            self._auth = self._read_auth()
        seen: list[Exception] = []
        connected = False

        async def on_error(e: Exception) -> None:
            if connected:
                log.warning("notify %s: NATS: %s", self.name, _describe(e))
            else:
                seen.append(e)  # reported by the ChannelError below

        nc = Client()
        try:
            with anyio.fail_after(self.settings.timeout_s):
                await nc.connect(
                    servers=list(self.settings.servers),
                    name=f"filedock notify {self.name}",
                    error_cb=on_error,
                    disconnected_cb=self._on_disconnected,
                    allow_reconnect=True,
                    max_reconnect_attempts=_RECONNECT_ATTEMPTS,
                    reconnect_time_wait=_RECONNECT_WAIT_S,
                    connect_timeout=max(1, math.ceil(self.settings.timeout_s)),
                    ping_interval=_PING_INTERVAL_S,
                    user=self._auth.get("user"),
                    password=self._auth.get("password"),
                    token=self._auth.get("token"),
                )
        except (nats_errors.Error, OSError, TimeoutError) as e:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await nc.close()
            # The server may close the socket before its -ERR is read (a reset): any
            # attempt that got the answer tells.
            if any("authorization violation" in str(x).lower() for x in seen):
                what = f"NATS at {self._shown} refused the credentials"
                raise ChannelError(what, retryable=False) from None
            cause = seen[-1] if seen else e
            what = f"cannot connect to NATS at {self._shown}: {_describe(cause)}"
            raise ChannelError(what) from None
        connected = True
        return nc

    async def _on_disconnected(self) -> None:
        # No acknowledgement comes over a lost connection: stop waiting for one.
        for scope in self._in_flight:
            scope.cancel()

    # -- one event ----------------------------------------------------------------------

    async def _publish(
        self, nc: Client, js: JetStreamContext, event: Event, timeout_s: float
    ) -> ChannelError | None:
        s = self.settings
        subject = s.subject.replace("{type}", event.type).replace("{route}", event.route)
        problem = _subject_problem(subject)
        if problem is not None:
            return ChannelError(
                f"cannot publish to subject {subject!r}: {problem}", retryable=False
            )
        try:
            headers = _headers(event)
            body = orjson.dumps(event.to_json())
        except (ValueError, TypeError) as e:
            return ChannelError(f"event {event.id}: {e}", retryable=False)
        if not nc.is_connected:
            raise ConnectionLost(ChannelError(f"the connection to NATS at {self._shown} is lost"))
        scope = anyio.CancelScope()
        self._in_flight.add(scope)
        try:
            with scope:
                ack = await js.publish(
                    subject, body, timeout=timeout_s, stream=s.stream, headers=headers
                )
        except js_errors.NoStreamResponseError:
            return ChannelError(f"no JetStream stream takes subject {subject}")
        except js_errors.APIError as e:
            if e.err_code == _WRONG_STREAM:
                return ChannelError(f"subject {subject} is not stored in stream {s.stream}")
            return ChannelError(f"JetStream refused subject {subject}: {e.description}")
        except nats_errors.TimeoutError:
            what = f"no acknowledgement for subject {subject} within {timeout_s:.3g}s"
            raise ConnectionLost(ChannelError(what)) from None
        except (nats_errors.BadSubjectError, nats_errors.MaxPayloadError) as e:
            return ChannelError(f"cannot publish to subject {subject!r}: {e}", retryable=False)
        except (nats_errors.Error, OSError) as e:
            what = f"publishing to NATS at {self._shown} failed: {_describe(e)}"
            raise ConnectionLost(ChannelError(what)) from None
        finally:
            self._in_flight.discard(scope)
        if scope.cancelled_caught:
            what = f"the connection to NATS at {self._shown} was lost before the acknowledgement"
            raise ConnectionLost(ChannelError(what))
        if s.stream is not None and ack.stream != s.stream:
            return ChannelError(f"subject {subject} went to stream {ack.stream}, not {s.stream}")
        return None


def _headers(event: Event) -> dict[str, str]:
    """`Nats-Msg-Id` and the CloudEvents binding's `ce-` attributes; a value that is not
    printable ASCII (a subject with a newline) is left to the body, where it is JSON."""
    if not _header_safe(event.id):
        raise ValueError(f"the id {event.id!r} cannot be a Nats-Msg-Id header")
    headers = {"Nats-Msg-Id": event.id, "Content-Type": _CONTENT_TYPE}
    attributes = {
        "ce-specversion": "1.0",
        "ce-id": event.id,
        "ce-type": event.type,
        "ce-source": event.source,
        "ce-subject": event.subject,
        "ce-time": event.time,
    }
    headers.update((k, v) for k, v in attributes.items() if _header_safe(v))
    return headers


def _subject_problem(subject: str) -> str | None:
    """Why a publish subject is not one (the server would take it and route it nowhere)."""
    tokens = subject.split(".")
    if any(not token for token in tokens):
        return "an empty token (an event without a route?)"
    if any(token in ("*", ">") for token in tokens):
        return "a wildcard token"
    if not subject.isprintable() or any(c.isspace() for c in subject):
        return "white space or control characters"
    return None


def _header_safe(value: str) -> bool:
    return bool(value) and value.isascii() and value.isprintable()


def _each(error: ChannelError, n: int) -> list[ChannelError | None]:
    return [ChannelError(error.message, retryable=error.retryable) for _ in range(n)]


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _without_userinfo(url: str) -> str:
    """A server URL fit for messages: `nats://user:password@host` loses its user part."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable server URL>"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
