"""The NATS channel against real JetStream: the machine's server (127.0.0.1:4222) with a
stream of its own per test, and servers of our own where a test needs credentials or
kills the server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from conftest import free_port, skip_or_fail, wait_for
from nats.js.api import StorageType
from nats_streams import NATS_URL, Stream, stream_on
from servers import ServerProcess

from service.notify.base import ChannelError, Event
from service.notify.nats import NatsSender
from service.settings.notify import NatsChannel
from service.settings.sinks import Secret

T = TypeVar("T")
CE_REQUIRED = ("specversion", "id", "source", "type")


def event(i: int = 0, type: str = "filedock.job.done", route: str = "orders") -> Event:
    job = f"01JOB{i:05d}-{uuid.uuid4().hex[:8]}"
    return Event(
        id=f"{job}.{type.rpartition('.')[2]}",
        type=type,
        source=f"/filedock/routes/{route}",
        subject=f"{route}/in/order-{i}.csv",
        time="2026-05-01T10:00:00.000000Z",
        data={
            "job_id": job,
            "route": route,
            "name": f"order-{i}.csv",
            "sha256": hashlib.sha256(str(i).encode()).hexdigest(),
            "outcome": "imported",
        },
    )


def channel(**settings: Any) -> NatsChannel:
    return NatsChannel.model_validate(
        {"kind": "nats", "name": "bus", "servers": [NATS_URL], "timeout_s": 5, **settings}
    )


@asynccontextmanager
async def opened(settings: NatsChannel) -> AsyncIterator[NatsSender]:
    sender = NatsSender(settings)
    await sender.open()
    try:
        yield sender
    finally:
        await sender.close()


async def send(settings: NatsChannel, *events: Event) -> list[ChannelError | None]:
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


@pytest.fixture
async def stream() -> AsyncIterator[Stream]:
    """A stream of its own on the machine's server, deleted after the test."""
    async with stream_on(NATS_URL) as s:
        yield s


# -- the machine's server ----------------------------------------------------------------


async def test_publishes_cloudevents_with_headers_acknowledged(stream: Stream) -> None:
    done, failed = event(1), event(2, type="filedock.job.failed", route="billing")
    odd = event(3)  # a file name that cannot be a header value: not ASCII, a CR LF in it
    odd = Event(odd.id, odd.type, odd.source, "orders/in/ä b\r\n.csv", odd.time, odd.data)
    settings = channel(subject=f"{stream.prefix}.{{route}}.{{type}}", stream=stream.name)

    assert await send(settings, done, failed, odd) == [None, None, None]

    sub = await stream.js.pull_subscribe(f"{stream.prefix}.>", stream=stream.name)
    msgs = await sub.fetch(3, timeout=5)
    assert [m.subject for m in msgs] == [
        f"{stream.prefix}.orders.filedock.job.done",
        f"{stream.prefix}.billing.filedock.job.failed",
        f"{stream.prefix}.orders.filedock.job.done",
    ]
    for msg, sent in zip(msgs, (done, failed, odd), strict=True):
        doc = json.loads(msg.data)
        assert doc == sent.to_json()
        assert all(doc[k] for k in CE_REQUIRED) and doc["specversion"] == "1.0"
        assert msg.data == json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        headers = msg.headers or {}
        assert headers["Nats-Msg-Id"] == sent.id
        assert headers["Content-Type"] == "application/cloudevents+json"
        assert headers["ce-id"] == sent.id and headers["ce-type"] == sent.type
        assert headers["ce-source"] == sent.source and headers["ce-time"] == sent.time
        await msg.ack()
    assert msgs[0].headers is not None and msgs[0].headers["ce-subject"] == done.subject
    assert msgs[2].headers is not None and "ce-subject" not in msgs[2].headers
    await sub.unsubscribe()


async def test_the_same_event_twice_is_stored_once(stream: Stream) -> None:
    settings = channel(subject=f"{stream.prefix}.{{type}}")
    first, other = event(1), event(2)
    async with opened(settings) as sender:
        assert await sender.send([first]) == [None]
        assert await sender.send([first, first]) == [None, None]  # acknowledged as duplicates
        assert await sender.send([other]) == [None]
    assert await stream.messages() == 2
    ids = [(await stream.js.get_msg(stream.name, seq)).headers for seq in (1, 2)]
    assert [(h or {})["Nats-Msg-Id"] for h in ids] == [first.id, other.id]


async def test_no_stream_for_the_subject_is_retryable_and_says_so(stream: Stream) -> None:
    subject = f"fdtest.nostream.{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    [error] = await send(channel(subject=subject + ".{type}"), event())
    assert isinstance(error, ChannelError) and error.retryable
    assert error.message == f"no JetStream stream takes subject {subject}.filedock.job.done"
    assert time.monotonic() - started < 5


async def test_a_subject_of_another_stream_is_refused(stream: Stream) -> None:
    settings = channel(subject=f"{stream.prefix}.{{type}}", stream="FDTEST_ELSEWHERE")
    [error] = await send(settings, event())
    assert isinstance(error, ChannelError) and error.retryable
    assert "is not stored in stream FDTEST_ELSEWHERE" in error.message
    assert await stream.messages() == 0  # Nats-Expected-Stream: the server stored nothing


async def test_an_event_without_a_route_makes_no_subject_and_is_final(stream: Stream) -> None:
    no_route = event()
    no_route = Event(no_route.id, no_route.type, no_route.source, "x", no_route.time, {})
    settings = channel(subject=f"{stream.prefix}.{{route}}.{{type}}")
    [error, fine] = await send(settings, no_route, event(route="orders"))
    assert isinstance(error, ChannelError) and not error.retryable
    assert f"cannot publish to subject '{stream.prefix}..filedock.job.done'" in error.message
    assert fine is None


async def test_a_server_that_is_not_there_fails_fast_and_retryable() -> None:
    port = free_port()
    settings = channel(servers=[f"nats://filedock:hunter2-pw@127.0.0.1:{port}"], timeout_s=5)
    sender = NatsSender(settings)
    await sender.open()  # connects lazily: a server down at start stops nothing
    started = time.monotonic()
    try:
        results = await sender.send([event(1), event(2)])
    finally:
        await sender.close()
    assert time.monotonic() - started < 5
    assert all(isinstance(r, ChannelError) and r.retryable for r in results)
    assert len(results) == 2
    for r in results:
        assert isinstance(r, ChannelError)
        assert f"cannot connect to NATS at nats://127.0.0.1:{port}" in r.message
        assert "hunter2" not in r.message


# -- servers of our own --------------------------------------------------------------------


@pytest.fixture
def nats_server_bin() -> str:
    path = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not os.access(path, os.X_OK):
        skip_or_fail("nats-server is not installed (Debian package nats-server)")
    return path


@pytest.fixture
def own_server(nats_server_bin: str, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Starts a nats-server on a free loopback port with the given options."""
    started: list[ServerProcess] = []

    def start(*options: str) -> ServerProcess:
        port = free_port()
        argv = [nats_server_bin, "-a", "127.0.0.1", "-p", str(port), *options]
        server = ServerProcess(argv, port, tmp_path / f"nats-{port}.log", "nats-server")
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


async def test_user_and_password_or_token_from_secrets(
    own_server: Callable[..., ServerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    by_password = own_server("-js", "-sd", str(tmp_path / "js"), "--user", "fd", "--pass", "pw-1")
    url = f"nats://127.0.0.1:{by_password.port}"
    async with stream_on(f"nats://fd:pw-1@127.0.0.1:{by_password.port}") as s:
        monkeypatch.setenv("FD_TEST_NATS_PASSWORD", "pw-1")
        right = channel(
            servers=[url],
            subject=f"{s.prefix}.{{type}}",
            user="fd",
            password={"env": "FD_TEST_NATS_PASSWORD"},
        )
        assert await send(right) == []
        assert await send(right, event()) == [None]
        assert await s.messages() == 1

        monkeypatch.setenv("FD_TEST_NATS_PASSWORD", "not-the-password")
        [error] = await send(right, event())
        assert isinstance(error, ChannelError) and not error.retryable
        assert error.message == f"NATS at {url} refused the credentials"

    token_file = tmp_path / "nats-token"
    token_file.write_text("tok-2\n")
    by_token = own_server("--auth", "tok-2")
    async with opened(
        channel(servers=[f"nats://127.0.0.1:{by_token.port}"], token=Secret(file=token_file))
    ) as sender:
        [error] = await sender.send([event()])  # the token is taken: no stream takes the subject
        assert isinstance(error, ChannelError) and error.retryable
        assert error.message.startswith("no JetStream stream takes subject")


async def test_a_missing_secret_is_final(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FD_TEST_NATS_UNSET", raising=False)
    sender = NatsSender(channel(token={"env": "FD_TEST_NATS_UNSET"}))
    with pytest.raises(ChannelError) as caught:
        await sender.open()
    assert not caught.value.retryable
    assert "FD_TEST_NATS_UNSET is not set" in caught.value.message


async def test_a_lost_server_fails_sends_fast_until_it_is_back(
    own_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = own_server("-js", "-sd", str(tmp_path / "js"))
    url = f"nats://127.0.0.1:{server.port}"
    async with stream_on(url, storage=StorageType.FILE) as s:
        settings = channel(servers=[url], subject=f"{s.prefix}.{{type}}", timeout_s=10)
        async with opened(settings) as sender:
            assert await sender.send([event(1)]) == [None]

            server.kill()
            started = time.monotonic()
            errors = await sender.send([event(2), event(3)])
            assert time.monotonic() - started < 5  # not timeout_s per event
            assert len(errors) == 2
            for e in errors:
                assert isinstance(e, ChannelError) and e.retryable
                assert f"NATS at {url}" in e.message

            server.start()  # the same port, the same store: the stream is there again
            later = event(4)

            async def sent() -> bool:
                return await sender.send([later]) == [None]

            await eventually(sent, timeout=15, what="a send to succeed after the restart")
        assert await s.messages() == 2


def stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


async def test_a_hung_server_costs_one_timeout_and_its_death_ends_the_wait(
    own_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = own_server("-js", "-sd", str(tmp_path / "js"))
    assert server.proc is not None
    pid = server.proc.pid
    url = f"nats://127.0.0.1:{server.port}"
    async with stream_on(url) as s:
        subject = f"{s.prefix}.{{type}}"
        async with (
            opened(channel(servers=[url], subject=subject, timeout_s=1)) as short,
            opened(channel(servers=[url], subject=subject, timeout_s=30)) as long,
        ):
            assert await short.send([event(1)]) == [None]
            assert await long.send([event(2)]) == [None]
            os.kill(pid, signal.SIGSTOP)
            try:
                wait_for(lambda: stopped(pid), timeout=5, what="nats-server to stop")
                started = time.monotonic()
                errors = await short.send([event(3), event(4), event(5)])
                assert time.monotonic() - started < 2  # one timeout, not one per event
                assert [e.message if e else e for e in errors] == [
                    f"no acknowledgement for subject {s.prefix}.filedock.job.done within 1s"
                ] * 3
                assert all(e is not None and e.retryable for e in errors)

                # A publish waiting for its acknowledgement when the connection drops
                # ends then, not at the 30 s timeout.
                async with anyio.create_task_group() as tg:
                    result: list[list[ChannelError | None]] = []

                    async def send_long() -> None:
                        result.append(await long.send([event(6), event(7)]))

                    async def waiting() -> bool:
                        return bool(long._in_flight)

                    tg.start_soon(send_long)
                    what = "the publish to wait for its acknowledgement"
                    await eventually(waiting, timeout=5, what=what)
                    started = time.monotonic()
                    server.kill()
            finally:
                if server.proc is not None:
                    os.kill(pid, signal.SIGCONT)
            assert time.monotonic() - started < 5
            [lost] = result
            assert all(e is not None and e.retryable for e in lost), lost
            assert lost[0] is not None and "was lost before the acknowledgement" in lost[0].message
