"""The AMQP channel: each event a persistent message on a RabbitMQ exchange, confirmed
by the broker before it counts as sent.

The connection opens on the first send (a broker down at start stops nothing) and is
robust: aio-pika reconnects it and restores the channel and the exchange by itself.
While it is away, a send fails at once as retryable instead of waiting for it.

The channel uses publisher confirms and publishes with `mandatory`: a message no queue
takes comes back (`basic.return`, 312 NO_ROUTE, then an ack: the ack alone does not
mean routed), and is reported as not sent, retryable, since a queue may be bound
later. A nack is retryable too. A missing exchange (with `declare_exchange` off)
closes the channel on the broker: the rest of the batch is not tried, and the next
send waits a moment for aio-pika to reopen the channel (or opens another). An
exchange that exists with other settings than declared, and refused credentials, are
final.

The URL comes from a secret and holds the password: every message shows the URL
without its user information, and any error text has the password masked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import suppress
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit, urlunsplit

import aio_pika
import anyio
import orjson
from aio_pika import exceptions as amqp_errors
from aio_pika.abc import AbstractExchange, AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelAccessRefused

from service.notify.base import Channel, ChannelError, ConnectionLost, Event
from service.settings.notify import AmqpChannel

__all__ = ["AmqpSender"]

log = logging.getLogger("filedock.notify")

# A batch publishes for at most this many `timeout_s` (after connecting, itself bounded
# by one): the dispatcher gives a send four, and results it gets are worth keeping.
_BATCH_TIMEOUTS = 2
_CONTENT_TYPE = "application/cloudevents+json"
_NO_ROUTE = 312
_REOPEN_WAIT_S = 1.0
_MAX_ROUTING_KEY = 255  # bytes: an AMQP short string


class AmqpSender(Channel):
    """One exchange, one lazily opened robust connection with a confirming channel."""

    def __init__(self, settings: AmqpChannel) -> None:
        self.settings = settings
        self.name = settings.name
        self._url: str | None = None
        self._secrets: list[str] = []
        self._shown = "the AMQP URL"
        self._conn: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._connecting = anyio.Lock()

    async def open(self) -> None:
        self._read_url()

    async def close(self) -> None:
        conn, self._conn, self._channel, self._exchange = self._conn, None, None, None
        if conn is not None and not conn.is_closed:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.settings.timeout_s):
                await conn.close()

    async def send(self, events: Sequence[Event]) -> list[ChannelError | None]:
        try:
            exchange = await self._ready()
        except ChannelError as e:
            return _each(e, len(events))
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
                results.append(await self._publish(exchange, event, left))
            except ConnectionLost as lost:
                results += _each(lost.error, len(events) - len(results))
                break
        return results

    # -- the connection ----------------------------------------------------------------

    def _read_url(self) -> str:
        s = self.settings
        try:
            url = s.url.read()
        except ValueError as e:
            raise ChannelError(f"channel {s.name}: {e}", retryable=False) from None
        try:
            parts = urlsplit(url)
            password = parts.password
            host = parts.netloc.rpartition("@")[2]
        except ValueError:
            what = f"channel {s.name}: the AMQP URL is not a URL"
            raise ChannelError(what, retryable=False) from None
        if parts.scheme not in ("amqp", "amqps"):
            what = f"channel {s.name}: the AMQP URL must start with amqp:// or amqps://"
            raise ChannelError(what, retryable=False)
        self._secrets = sorted({p for p in (password, unquote(password or "")) if p}, key=len)
        self._shown = urlunsplit((parts.scheme, host, parts.path, "", ""))
        self._url = url
        return url

    def _redact(self, text: str) -> str:
        if self._url:
            text = text.replace(self._url, self._shown)
        for secret in reversed(self._secrets):  # the longest first
            text = text.replace(secret, "***")
        return text

    async def _ready(self) -> AbstractExchange:
        async with self._connecting:
            if self._conn is None:
                self._conn = await self._connect()
            if not self._conn.connected.is_set():
                raise ChannelError(f"the connection to {self._shown} is lost; reconnecting")
            if self._channel is not None and self._channel.is_closed:
                # aio-pika reopens a channel the broker closed, or one whose connection
                # came back, a moment later; one whose reopening failed stays closed.
                with anyio.move_on_after(min(self.settings.timeout_s, _REOPEN_WAIT_S)):
                    await self._channel.ready()
                if self._channel.is_closed:
                    log.info(
                        "notify %s: the AMQP channel stayed closed; opening another", self.name
                    )
                    await self._drop_channel()
            if self._channel is None or self._exchange is None:
                self._channel, self._exchange = await self._open_channel(self._conn)
            return self._exchange

    async def _connect(self) -> AbstractRobustConnection:
        s = self.settings
        url = self._url or self._read_url()
        try:
            # aio-pika's own timeout ends its attempt cleanly; ours is the backstop.
            with anyio.fail_after(s.timeout_s + 1):
                return await aio_pika.connect_robust(
                    url,
                    timeout=s.timeout_s,
                    client_properties={"connection_name": f"filedock notify {s.name}"},
                )
        except (amqp_errors.AMQPError, RuntimeError, OSError, TimeoutError) as e:
            raise self._error(e, f"cannot connect to {self._shown}") from None

    async def _open_channel(
        self, conn: AbstractRobustConnection
    ) -> tuple[AbstractRobustChannel, AbstractExchange]:
        s = self.settings
        channel: AbstractRobustChannel | None = None
        try:
            with anyio.fail_after(s.timeout_s):
                channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
                if not s.exchange:
                    return channel, channel.default_exchange
                if s.declare_exchange:
                    kind = aio_pika.ExchangeType(s.exchange_type)
                    return channel, await channel.declare_exchange(s.exchange, kind, durable=True)
                # A missing exchange is reported by the first publish.
                return channel, await channel.get_exchange(s.exchange, ensure=False)
        except (amqp_errors.AMQPError, RuntimeError, OSError, TimeoutError) as e:
            if channel is not None:
                await _close_quietly(channel)
            raise self._error(e, f"cannot open a channel on {self._shown}") from None

    async def _drop_channel(self) -> None:
        channel, self._channel, self._exchange = self._channel, None, None
        if channel is not None:
            await _close_quietly(channel)

    # -- one event ----------------------------------------------------------------------

    async def _publish(
        self, exchange: AbstractExchange, event: Event, timeout_s: float
    ) -> ChannelError | None:
        s = self.settings
        key = s.routing_key.replace("{type}", event.type).replace("{route}", event.route)
        if len(key.encode()) > _MAX_ROUTING_KEY:
            what = f"routing key {key[:60]}… is longer than {_MAX_ROUTING_KEY} bytes"
            return ChannelError(what, retryable=False)
        try:
            body = orjson.dumps(event.to_json())
        except TypeError as e:
            return ChannelError(f"event {event.id}: {e}", retryable=False)
        message = aio_pika.Message(
            body,
            content_type=_CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event.id,
            type=event.type,
            timestamp=_timestamp(event.time),
            app_id="filedock",
        )
        conn = self._conn
        if conn is None or not conn.connected.is_set():
            raise ConnectionLost(
                ChannelError(f"the connection to {self._shown} is lost; reconnecting")
            )
        try:
            with anyio.fail_after(timeout_s):
                confirmed = await exchange.publish(message, key, mandatory=True, timeout=timeout_s)
        except amqp_errors.PublishError as e:
            return self._returned(e, key)
        except amqp_errors.DeliveryError:
            return ChannelError(f"RabbitMQ refused the message for routing key {key} (nack)")
        except TimeoutError:
            what = f"no confirm for routing key {key} within {timeout_s:.3g}s"
            raise ConnectionLost(ChannelError(what)) from None
        except (amqp_errors.AMQPError, RuntimeError, OSError) as e:  # Runtime: channel closed
            raise ConnectionLost(self._error(e, f"publishing to {self._shown} failed")) from None
        if isinstance(confirmed, DeliveredMessage):  # returned, not raised
            return ChannelError(f"no queue is bound for routing key {key} on {self._where()}")
        return None

    def _returned(self, e: amqp_errors.PublishError, key: str) -> ChannelError:
        frame = e.frame
        code = getattr(frame, "reply_code", None)
        if code == _NO_ROUTE:
            return ChannelError(f"no queue is bound for routing key {key} on {self._where()}")
        text = getattr(frame, "reply_text", "") or type(e).__name__
        return ChannelError(f"RabbitMQ returned the message for routing key {key}: {text}")

    def _where(self) -> str:
        exchange = self.settings.exchange
        return f"exchange {exchange}" if exchange else "the default exchange"

    def _error(self, e: BaseException, failed: str) -> ChannelError:
        """What a failure means, with the password masked wherever it appears."""
        text = self._redact(str(e) or type(e).__name__)
        if isinstance(e, amqp_errors.ProbableAuthenticationError):
            return ChannelError(f"{self._shown} refused the credentials: {text}", retryable=False)
        if isinstance(e, ChannelAccessRefused):
            return ChannelError(f"{self._shown} refused access: {text}", retryable=False)
        if isinstance(e, amqp_errors.ChannelPreconditionFailed):
            what = f"{self._where()} exists with other settings than configured: {text}"
            return ChannelError(what, retryable=False)
        if isinstance(e, amqp_errors.ChannelNotFoundEntity):
            return ChannelError(f"{self._where()} does not exist on {self._shown}: {text}")
        if isinstance(e, TimeoutError):
            return ChannelError(f"{failed}: no answer in time")
        if isinstance(e, amqp_errors.InvalidFrameError) and "Connection.Close" in text:
            # aiormq keeps only the frame's repr: the broker's reason is lost.
            text = "the broker closed the connection while opening it (no such virtual host?)"
        return ChannelError(f"{failed}: {text}")


async def _close_quietly(channel: AbstractRobustChannel) -> None:
    """Close a channel that may be broken already; nothing about it is worth reporting."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(1):
        with suppress(amqp_errors.AMQPError, RuntimeError, OSError):
            await channel.close()


def _timestamp(time: str) -> datetime:
    try:
        return datetime.fromisoformat(time)
    except ValueError:
        return datetime.now(UTC)


def _each(error: ChannelError, n: int) -> list[ChannelError | None]:
    return [ChannelError(error.message, retryable=error.retryable) for _ in range(n)]
