"""The AMQP channel against the machine's RabbitMQ (127.0.0.1:5672): an exchange and a
queue of its own per test, deleted after it."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import anyio
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from anyio.abc import SocketAttribute, SocketStream, TaskStatus
from conftest import free_port, skip_or_fail

from service.notify.amqp import AmqpSender
from service.notify.base import ChannelError, Event
from service.settings.notify import AmqpChannel

T = TypeVar("T")
AMQP_URL = os.environ.get("FILEDOCK_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
URL_VARIABLE = "FD_TEST_AMQP_URL"


def event(i: int = 0, type: str = "filedock.job.done", route: str = "orders") -> Event:
    job = f"01JOB{i:05d}-{uuid.uuid4().hex[:8]}"
    return Event(
        id=f"{job}.{type.rpartition('.')[2]}",
        type=type,
        source=f"/filedock/routes/{route}",
        subject=f"{route}/in/order-{i}.csv",
        time="2026-05-01T10:00:00.250000Z",
        data={"job_id": job, "route": route, "name": f"ä order-{i}.csv", "outcome": "imported"},
    )


def channel(monkeypatch: pytest.MonkeyPatch, url: str = AMQP_URL, **settings: Any) -> AmqpChannel:
    """Settings whose URL comes, as in production, from a variable."""
    monkeypatch.setenv(URL_VARIABLE, url)
    return AmqpChannel.model_validate(
        {"kind": "amqp", "name": "rabbit", "url": {"env": URL_VARIABLE}, "timeout_s": 5, **settings}
    )


@asynccontextmanager
async def opened(settings: AmqpChannel) -> AsyncIterator[AmqpSender]:
    sender = AmqpSender(settings)
    await sender.open()
    try:
        yield sender
    finally:
        await sender.close()


async def send(settings: AmqpChannel, *events: Event) -> list[ChannelError | None]:
    async with opened(settings) as sender:
        return await sender.send(events)


async def eventually(attempt: Callable[[], Awaitable[T | None]], *, timeout: float, what: str) -> T:
    """Try `attempt` until it returns something truthy; fail at the deadline."""
    with anyio.move_on_after(timeout):
        while True:
            result = await attempt()
            if result:
                return result
            await anyio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


@dataclass
class Broker:
    """The test's own exchange name and queue; `exchange` is declared only when asked."""

    channel: AbstractChannel
    exchange: str
    queue: AbstractQueue

    async def declare(self, kind: str = "topic") -> None:
        await self.channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType(kind), durable=True
        )

    async def bind(self, key: str) -> None:
        await self.queue.bind(self.exchange, key)

    async def get(self) -> AbstractIncomingMessage:
        # Confirmed means routed and queued: a basic.get finds it without waiting.
        message = await self.queue.get(no_ack=True, fail=False, timeout=5)
        assert message is not None, "the queue is empty"
        return message


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    try:
        conn = await aio_pika.connect(AMQP_URL, timeout=3)
    except Exception as e:
        where = urlsplit(AMQP_URL).netloc.rpartition("@")[2]
        skip_or_fail(f"RabbitMQ at {where} is not reachable: {type(e).__name__}: {e}")
    tag = uuid.uuid4().hex[:12]
    try:
        ch = await conn.channel()
        queue = await ch.declare_queue(f"fdtest-{tag}", durable=False, auto_delete=False)
        yield Broker(channel=ch, exchange=f"fdtest-{tag}", queue=queue)
        ch = await conn.channel()  # the test may have closed the first one
        await ch.queue_delete(f"fdtest-{tag}")
        await ch.exchange_delete(f"fdtest-{tag}")
    finally:
        await conn.close()


async def test_publishes_persistent_confirmed_cloudevents(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    await broker.declare()
    await broker.bind("orders.#")
    done, failed = event(1), event(2, type="filedock.job.failed")
    settings = channel(monkeypatch, exchange=broker.exchange, routing_key="{route}.{type}")

    assert await send(settings, done, failed) == [None, None]

    for sent in (done, failed):
        message = await broker.get()
        assert message.routing_key == f"orders.{sent.type}"
        assert message.message_id == sent.id
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.content_type == "application/cloudevents+json"
        assert message.type == sent.type
        assert message.app_id == "filedock"
        assert message.timestamp == datetime(2026, 5, 1, 10, 0, 0, tzinfo=UTC)  # seconds
        assert json.loads(message.body) == sent.to_json()


async def test_declares_its_exchange_and_reports_what_no_queue_takes(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = channel(monkeypatch, exchange=broker.exchange)
    first, second = event(1), event(2)
    async with opened(settings) as sender:
        [unroutable] = await sender.send([first])
        assert isinstance(unroutable, ChannelError) and unroutable.retryable
        assert unroutable.message == (
            f"no queue is bound for routing key filedock.job.done on exchange {broker.exchange}"
        )
        await broker.declare()  # declared by the sender already, durable and of its type
        await broker.bind("filedock.job.*")
        assert await sender.send([second]) == [None]
    assert (await broker.get()).message_id == second.id


async def test_a_missing_exchange_not_declared_is_retryable_and_recovers(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = channel(monkeypatch, exchange=broker.exchange, declare_exchange=False)
    async with opened(settings) as sender:
        errors = await sender.send([event(1), event(2)])
        assert len(errors) == 2
        for error in errors:
            assert isinstance(error, ChannelError) and error.retryable
            assert f"exchange {broker.exchange} does not exist" in error.message

        await broker.declare()
        await broker.bind("#")
        late = event(3)
        assert await sender.send([late]) == [None]  # the channel is reopened
    assert (await broker.get()).message_id == late.id


async def test_an_exchange_of_another_type_is_final(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    await broker.declare("fanout")
    settings = channel(monkeypatch, exchange=broker.exchange, exchange_type="topic")
    [error] = await send(settings, event())
    assert isinstance(error, ChannelError) and not error.retryable
    assert f"exchange {broker.exchange} exists with other settings" in error.message


async def test_a_broker_that_is_not_there_fails_fast_and_hides_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    port = free_port()
    settings = channel(monkeypatch, url=f"amqp://filedock:{password}@127.0.0.1:{port}/")
    sender = AmqpSender(settings)
    await sender.open()  # connects lazily: a broker down at start stops nothing
    started = time.monotonic()
    try:
        errors = await sender.send([event(1), event(2)])
    finally:
        await sender.close()
    assert time.monotonic() - started < 5
    assert len(errors) == 2
    for error in errors:
        assert isinstance(error, ChannelError) and error.retryable
        assert f"amqp://127.0.0.1:{port}/" in error.message
        assert password not in error.message and "filedock:" not in error.message


async def test_refused_credentials_are_final_and_the_password_is_hidden(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    wrong = AMQP_URL.replace("guest:guest@", f"guest:{password}@")
    [error] = await send(channel(monkeypatch, url=wrong, exchange=broker.exchange), event())
    assert isinstance(error, ChannelError) and not error.retryable
    assert "refused the credentials" in error.message
    assert password not in error.message


async def test_a_missing_secret_or_a_wrong_scheme_is_final(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = channel(monkeypatch, url="http://guest:guest@127.0.0.1:5672/")
    with pytest.raises(ChannelError) as caught:
        await AmqpSender(settings).open()
    assert not caught.value.retryable and "amqp://" in caught.value.message
    assert "guest:guest" not in caught.value.message

    monkeypatch.delenv(URL_VARIABLE)
    with pytest.raises(ChannelError) as caught:
        await AmqpSender(settings).open()
    assert not caught.value.retryable
    assert f"{URL_VARIABLE} is not set" in caught.value.message


class Proxy:
    """A TCP relay to the broker that a test can cut (every connection closed, new ones
    closed at once) and mend, as a network outage would."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.open = True
        self.streams: set[SocketStream] = set()

    async def serve(self, *, task_status: TaskStatus[int]) -> None:
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            task_status.started(listener.extra(SocketAttribute.local_port))
            await listener.serve(self._relay)

    async def _relay(self, client: SocketStream) -> None:
        async with client:
            if not self.open:
                return
            async with await anyio.connect_tcp(*self.upstream) as server:
                self.streams |= {client, server}
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._pipe, client, server)
                        await self._pipe(server, client)
                        tg.cancel_scope.cancel()
                finally:
                    self.streams -= {client, server}

    @staticmethod
    async def _pipe(source: SocketStream, sink: SocketStream) -> None:
        try:
            async for chunk in source:
                await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    async def cut(self) -> None:
        self.open = False
        for stream in list(self.streams):
            await stream.aclose()


async def test_a_lost_connection_fails_sends_fast_until_it_is_back(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = urlsplit(AMQP_URL)
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    await broker.declare()
    await broker.bind("#")
    async with anyio.create_task_group() as tg:
        port = await tg.start(proxy.serve)
        relayed = parts._replace(netloc=f"{parts.netloc.rpartition(':')[0]}:{port}")
        url = urlunsplit(relayed._replace(query="reconnect_interval=0.2"))
        settings = channel(monkeypatch, url=url, exchange=broker.exchange, timeout_s=10)
        async with opened(settings) as sender:
            assert await sender.send([event(1)]) == [None]

            await proxy.cut()

            async def refused() -> list[ChannelError | None] | None:
                results = await sender.send([event(2)])
                return results if results != [None] else None

            await eventually(refused, timeout=10, what="a send to fail once the link is cut")
            started = time.monotonic()
            errors = await sender.send([event(3), event(4)])
            assert time.monotonic() - started < 1  # not the 10 s timeout
            assert len(errors) == 2
            for error in errors:
                assert isinstance(error, ChannelError) and error.retryable
                assert f"the connection to amqp://127.0.0.1:{port}/ is lost" in error.message

            proxy.open = True
            back = event(5)

            async def sent() -> bool:
                return await sender.send([back]) == [None]

            await eventually(sent, timeout=10, what="a send to succeed once the link is back")
        tg.cancel_scope.cancel()
    ids = {(await broker.get()).message_id for _ in range(2)}
    assert back.id in ids
