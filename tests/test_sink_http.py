"""The HTTP sink against a real receiver (starlette under uvicorn on loopback)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, wait_for
from http_receiver import Receiver

from service.delivery.base import Item, Receipt, SinkError
from service.delivery.http import HttpDelivery
from service.delivery.template import Target, render
from service.settings.sinks import HttpSink, template_of

JOB = "20250102T030405006Z-0a1b2c3d"
SECRET = "Bearer s3cr3t-4f1d9e"


def http_sink(url: str, **options: Any) -> HttpSink:
    return HttpSink.model_validate({"kind": "http", "name": "web", "url": url, **options})


def make_item(tmp_path: Path, content: bytes, target: str = "in/a.bin", job: str = JOB) -> Item:
    path = tmp_path / f"source-{hashlib.sha256(content).hexdigest()[:8]}"
    path.write_bytes(content)
    sha = hashlib.sha256(content).hexdigest()
    return Item(path=path, target=target, size=len(content), sha256=sha, job_id=job, sink="web")


@asynccontextmanager
async def opened(settings: HttpSink) -> AsyncIterator[HttpDelivery]:
    sink = HttpDelivery(settings)
    await sink.open()
    try:
        yield sink
    finally:
        await sink.close()


async def deliver(settings: HttpSink, item: Item) -> Receipt:
    async with opened(settings) as sink:
        return await sink.deliver(item)


async def refused(settings: HttpSink, item: Item) -> SinkError:
    with pytest.raises(SinkError) as caught:
        await deliver(settings, item)
    return caught.value


async def test_delivers_the_bytes_with_digests_and_keys(tmp_path: Path, receiver: Receiver) -> None:
    content = bytes(range(256)) * (12 * 1024 + 7)  # three 1 MiB chunks and a bit
    sent: list[int] = []
    item = make_item(tmp_path, content, target="in/ä b#1.bin")
    item = dataclasses.replace(item, progress=sent.append)
    settings = http_sink(f"{receiver.url}/in/{{name}}", headers={"X-Tenant": "acme"})

    receipt = await deliver(settings, item)
    assert sent == [1 << 20] * 3 + [len(content) - (3 << 20)]  # told chunk by chunk

    assert receiver.stored == {"/in/ä b#1.bin": content}
    (seen,) = receiver.seen
    digest = base64.b64encode(hashlib.sha256(content).digest()).decode()
    assert seen.method == "PUT"
    assert seen.headers["content-length"] == str(len(content))
    assert seen.headers["content-type"] == "application/octet-stream"
    assert seen.headers["content-digest"] == seen.headers["repr-digest"] == f"sha-256=:{digest}:"
    assert seen.headers["digest"] == f"SHA-256={digest}"
    assert seen.headers["idempotency-key"] == f"{JOB}:web:in/%C3%A4%20b%231.bin"  # ASCII
    assert seen.headers["x-filedock-job-id"] == JOB
    assert seen.headers["x-filedock-sha256"] == item.sha256
    assert seen.headers["x-tenant"] == "acme"
    assert "transfer-encoding" not in seen.headers
    assert receipt.location == f"{receiver.url}/in/%C3%A4%20b%231.bin"
    assert (receipt.bytes, receipt.sha256, receipt.found) == (len(content), item.sha256, False)
    assert receipt.remote["status"] == 201
    assert receipt.remote["etag"] and receipt.remote["location"] == "/in/ä b#1.bin"


async def test_post_with_a_configured_content_type(tmp_path: Path, receiver: Receiver) -> None:
    item = make_item(tmp_path, b"a,b\n1,2\n", target="upload")
    settings = http_sink(
        f"{receiver.url}/upload", method="POST", headers={"content-type": "text/csv"}
    )
    await deliver(settings, item)
    (seen,) = receiver.seen
    assert (seen.method, seen.path, seen.body) == ("POST", "/upload", b"a,b\n1,2\n")
    assert seen.headers["content-type"] == "text/csv"


async def test_the_url_template_is_rendered_and_encoded(tmp_path: Path, receiver: Receiver) -> None:
    settings = http_sink(f"{receiver.url}/drop/{{route}}/{{name}}")
    assert template_of(settings) == "drop/{route}/{name}"
    target = Target(
        name="50% off?.csv", relative_path="x", route="main", job_id=JOB, sha256="", claimed_at=0
    )
    item = make_item(tmp_path, b"x", target=render(template_of(settings), target))
    async with opened(settings) as sink:
        assert sink.url(item) == f"{receiver.url}/drop/main/50%25%20off%3F.csv"
        await sink.deliver(item)
    assert receiver.stored == {"/drop/main/50% off?.csv": b"x"}


async def test_a_lost_acknowledgement_is_retried_and_stored_once(
    tmp_path: Path, receiver: Receiver
) -> None:
    item = make_item(tmp_path, b"payload" * 1000)
    settings = http_sink(f"{receiver.url}/in/{{name}}")
    receiver.drop()  # stores the body, then cuts the connection before answering whole
    async with opened(settings) as sink:
        with pytest.raises(SinkError) as caught:
            await sink.deliver(item)
        assert (caught.value.error_class, caught.value.retryable) == ("sink_unreachable", True)
        receipt = await sink.deliver(item)
    assert receipt.remote["status"] == 201
    assert receiver.writes == ["/in/a.bin"]
    assert [s.headers["idempotency-key"] for s in receiver.seen] == [item.idempotency_key] * 2


async def test_503_is_retried_until_the_receiver_takes_it(
    tmp_path: Path, receiver: Receiver
) -> None:
    item = make_item(tmp_path, b"hello")
    receiver.fail(503, times=2, body="maintenance")
    async with opened(http_sink(f"{receiver.url}/in/{{name}}")) as sink:
        for _ in range(2):
            with pytest.raises(SinkError) as caught:
                await sink.deliver(item)
            assert (caught.value.error_class, caught.value.retryable) == ("sink_error", True)
            assert "503" in caught.value.message and "maintenance" in caught.value.message
        await sink.deliver(item)
    assert receiver.stored == {"/in/a.bin": b"hello"}


@pytest.mark.parametrize(
    ("status", "options", "error_class", "retryable"),
    [
        (500, {}, "sink_error", True),
        (429, {}, "sink_error", True),
        (418, {"retry_statuses": [418]}, "sink_error", True),
        (400, {}, "sink_rejected", False),
        (404, {}, "sink_rejected", False),
        (401, {}, "sink_denied", False),
        (403, {}, "sink_denied", False),
        (409, {}, "remote_exists", False),
        (409, {"exists": "replace"}, "sink_rejected", False),
    ],
)
async def test_answers_are_classified(
    tmp_path: Path,
    receiver: Receiver,
    status: int,
    options: dict[str, Any],
    error_class: str,
    retryable: bool,
) -> None:
    receiver.fail(status, body="why: " + "x" * 500)
    error = await refused(
        http_sink(f"{receiver.url}/in/{{name}}", **options), make_item(tmp_path, b"hi")
    )
    assert (error.error_class, error.retryable) == (error_class, retryable)
    assert f"answered {status}: why: " in error.message
    assert "x" * 195 in error.message and "x" * 196 not in error.message  # 200 chars shown
    assert receiver.stored == {}


async def test_other_bytes_under_the_name_are_remote_exists(
    tmp_path: Path, receiver: Receiver
) -> None:
    settings = http_sink(f"{receiver.url}/in/{{name}}")
    await deliver(settings, make_item(tmp_path, b"first"))
    error = await refused(settings, make_item(tmp_path, b"second", job="20250102T030405006Z-ff"))
    assert (error.error_class, error.retryable) == ("remote_exists", False)
    assert receiver.stored == {"/in/a.bin": b"first"}


async def test_a_server_that_is_down_is_unreachable(tmp_path: Path) -> None:
    error = await refused(
        http_sink(f"http://127.0.0.1:{free_port()}/in/{{name}}"), make_item(tmp_path, b"hi")
    )
    assert (error.error_class, error.retryable) == ("sink_unreachable", True)


async def test_a_receiver_that_never_answers_times_out(tmp_path: Path, receiver: Receiver) -> None:
    receiver.hang()
    settings = http_sink(f"{receiver.url}/in/{{name}}", timeout_s=0.5)
    error = await refused(settings, make_item(tmp_path, b"hi"))
    assert (error.error_class, error.retryable) == ("timeout", True)


@pytest.mark.parametrize("size", [10, 3 << 20], ids=["read-whole", "three-chunks"])
async def test_a_modified_file_is_never_sent_whole(
    tmp_path: Path, receiver: Receiver, size: int
) -> None:
    item = make_item(tmp_path, b"a" * size)
    item.path.write_bytes(b"a" * (size - 1) + b"b")  # same size, other bytes
    error = await refused(http_sink(f"{receiver.url}/in/{{name}}"), item)
    assert (error.error_class, error.retryable) == ("modified_during_processing", False)
    if size > 1 << 20:  # streamed: the request is dropped short of its Content-Length
        wait_for(lambda: receiver.aborted == 1, timeout=10, what="the receiver to see the abort")
    else:  # up to a MiB the file is read and checked before any request
        assert receiver.aborted == 0
    assert receiver.stored == {} and receiver.seen == []


@pytest.mark.parametrize("now", [b"", b"grown"], ids=["shrunk", "grown"])
async def test_a_file_of_another_size_is_never_sent_whole(
    tmp_path: Path, receiver: Receiver, now: bytes
) -> None:
    item = make_item(tmp_path, b"" if now else b"abc")
    item.path.write_bytes(now)
    error = await refused(http_sink(f"{receiver.url}/in/{{name}}"), item)
    assert error.error_class == "modified_during_processing"
    assert receiver.stored == {} and receiver.seen == []


async def test_secret_headers_are_sent_and_never_shown(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FILEDOCK_TEST_HTTP_TOKEN", SECRET)
    settings = http_sink(
        f"{receiver.url}/in/{{name}}",
        secret_headers={"Authorization": {"env": "FILEDOCK_TEST_HTTP_TOKEN"}},
    )
    item = make_item(tmp_path, b"hi")
    receiver.fail(401, body=f"bad credentials: {SECRET}")  # a receiver that echoes them
    async with opened(settings) as sink:
        with pytest.raises(SinkError) as caught:
            await sink.deliver(item)
        receipt = await sink.deliver(item)
    assert [s.headers["authorization"] for s in receiver.seen] == [SECRET, SECRET]
    assert caught.value.error_class == "sink_denied"
    shown = f"{caught.value} {caught.value.message!r} {json.dumps(receipt.to_json())}"
    assert "s3cr3t" not in shown and "***" in shown
    assert "s3cr3t" not in repr(settings) + settings.model_dump_json()


async def test_a_missing_secret_fails_open(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FILEDOCK_TEST_HTTP_TOKEN", raising=False)
    settings = http_sink(
        f"{receiver.url}/in/{{name}}", secret_headers={"X-Key": {"env": "FILEDOCK_TEST_HTTP_TOKEN"}}
    )
    with pytest.raises(SinkError) as caught:
        await HttpDelivery(settings).open()
    assert (caught.value.error_class, caught.value.retryable) == ("sink_config", False)
    assert "FILEDOCK_TEST_HTTP_TOKEN" in caught.value.message


async def test_credentials_in_the_url_are_used_but_not_shown(
    tmp_path: Path, receiver: Receiver
) -> None:
    url = receiver.url.replace("http://", "http://user:pw@")
    item = make_item(tmp_path, b"hi")
    async with opened(http_sink(f"{url}/in/{{name}}")) as sink:
        assert sink.location(item) == f"{receiver.url}/in/a.bin"
        receipt = await sink.deliver(item)
    assert receipt.location == f"{receiver.url}/in/a.bin"
    basic = base64.b64encode(b"user:pw").decode()
    assert receiver.seen[0].headers["authorization"] == f"Basic {basic}"


async def test_an_empty_file_is_delivered(tmp_path: Path, receiver: Receiver) -> None:
    receipt = await deliver(http_sink(f"{receiver.url}/in/{{name}}"), make_item(tmp_path, b""))
    assert receiver.stored == {"/in/a.bin": b""} and receipt.bytes == 0
