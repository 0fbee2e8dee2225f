"""The webhook channel against a real receiver (`webhook_receiver.py`) that verifies
every request with the `standardwebhooks` library, as receivers in the wild do."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import free_port, skip_or_fail
from webhook_receiver import WebhookReceiver, webhook_receiver

from service.notify.base import ChannelError, Event
from service.notify.webhook import WebhookSender
from service.settings.notify import WebhookChannel
from service.settings.sinks import Secret


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def event(i: int = 0, **data: Any) -> Event:
    job = f"01JOB{i:05d}"
    body: dict[str, Any] = {
        "job_id": job,
        "route": "orders",
        "name": f"order-{i}.csv",
        "relative_path": f"in/order-{i}.csv",
        "size": 120 + i,
        "sha256": hashlib.sha256(str(i).encode()).hexdigest(),
        "outcome": "imported",
        "archive_path": f"archive/orders/2026/05/01/{job}",
    }
    body.update(data)
    return Event(
        id=f"{job}.done",
        type="filedock.job.done",
        source="/filedock/routes/orders",
        subject=f"orders/{body['relative_path']}",
        time="2026-05-01T10:00:00.000000Z",
        data=body,
    )


@pytest.fixture(scope="module")
def served() -> Iterator[WebhookReceiver]:
    with webhook_receiver(new_secret()) as receiver:
        yield receiver


@pytest.fixture
def receiver(served: WebhookReceiver) -> Iterator[WebhookReceiver]:
    """The module's receiver with a fresh secret, holding nothing."""
    served.reset(new_secret())
    yield served
    served.reset(new_secret())


@pytest.fixture
def secret_file(receiver: WebhookReceiver, tmp_path: Path) -> Secret:
    """The receiver's secret in a file, as a mounted Kubernetes secret (newline and all)."""
    path = tmp_path / "webhook-secret"
    path.write_text(receiver.secret + "\n")
    return Secret(file=path)


def channel(url: str, secret: Secret, **settings: Any) -> WebhookChannel:
    return WebhookChannel(kind="webhook", name="hooks", url=url, secret=secret, **settings)


@asynccontextmanager
async def opened(settings: WebhookChannel, **kw: Any) -> AsyncIterator[WebhookSender]:
    sender = WebhookSender(settings, **kw)
    await sender.open()
    try:
        yield sender
    finally:
        await sender.close()


async def test_events_arrive_signed_as_cloudevents(
    receiver: WebhookReceiver, secret_file: Secret
) -> None:
    events = [event(i) for i in range(20)]
    async with opened(channel(receiver.url, secret_file)) as sender:
        assert await sender.send(events) == [None] * 20
    assert receiver.rejected == []
    got = {d.headers["webhook-id"]: d for d in receiver.accepted}
    assert set(got) == {e.id for e in events}
    for e in events:
        delivered = got[e.id]
        assert delivered.doc == e.to_json()
        assert delivered.body == json.dumps(e.to_json(), separators=(",", ":")).encode()
        assert delivered.headers["content-type"] == "application/cloudevents+json"
        assert abs(int(delivered.headers["webhook-timestamp"]) - time.time()) < 60


async def test_signature_is_the_one_the_spec_defines(
    receiver: WebhookReceiver, secret_file: Secret
) -> None:
    """Computed here by hand from the spec, not only checked by the library."""
    now = int(time.time())
    e = event(1)
    async with opened(channel(receiver.url, secret_file), clock=lambda: now + 0.9) as sender:
        assert await sender.send([e]) == [None]
    [delivered] = receiver.accepted
    key = base64.b64decode(receiver.secret.removeprefix("whsec_"))
    signed = f"{e.id}.{now}.".encode() + delivered.body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert delivered.headers["webhook-timestamp"] == str(now)
    assert delivered.headers["webhook-signature"] == expected


async def test_concurrency_is_bounded(receiver: WebhookReceiver, secret_file: Secret) -> None:
    receiver.gate(3)  # nothing answers until three requests are in flight together
    async with opened(channel(receiver.url, secret_file, concurrency=3)) as sender:
        assert await sender.send([event(i) for i in range(9)]) == [None] * 9
    assert receiver.max_in_flight == 3
    assert len(receiver.accepted) == 9


async def test_a_name_that_is_not_utf8_arrives_safely(
    receiver: WebhookReceiver, secret_file: Secret
) -> None:
    raw = b"r\xe9sum\xe9\n.csv"
    e = event(
        2,
        name="r\\xe9sum\\xe9\\n.csv",
        relative_path="in/café/r\\xe9sum\\xe9\\n.csv",
        name_b64=base64.b64encode(raw).decode(),
    )
    async with opened(channel(receiver.url, secret_file)) as sender:
        assert await sender.send([e]) == [None]
    [delivered] = receiver.accepted
    assert "in/café/".encode() in delivered.body  # UTF-8 as it is, not \\u escapes
    assert delivered.doc["data"]["name"] == "r\\xe9sum\\xe9\\n.csv"
    assert base64.b64decode(delivered.doc["data"]["name_b64"]) == raw


async def test_each_answer_decides_whether_to_retry(
    receiver: WebhookReceiver, secret_file: Secret
) -> None:
    events = [event(i) for i in range(6)]
    long_body = "bad request: " + "x" * 1000
    receiver.answer(events[1].id, 503, "maintenance")
    receiver.answer(events[2].id, 429)
    receiver.answer(events[3].id, 408)
    receiver.answer(events[4].id, 400, long_body)
    receiver.answer(events[5].id, 404)
    async with opened(channel(receiver.url, secret_file)) as sender:
        results = await sender.send(events)
    assert results[0] is None
    errors = [r for r in results[1:] if r is not None]
    assert len(errors) == 5
    assert [e.retryable for e in errors] == [True, True, True, False, False]
    assert "answered 503: maintenance" in errors[0].message
    assert "answered 400: " + long_body[:200] in errors[3].message
    assert long_body[:201] not in errors[3].message
    assert errors[3].message.startswith(f"webhook hooks: POST {receiver.url} answered 400")


async def test_a_server_down_is_retryable(secret_file: Secret) -> None:
    url = f"http://127.0.0.1:{free_port()}/hooks"
    async with opened(channel(url, secret_file)) as sender:
        [error] = await sender.send([event()])
    assert isinstance(error, ChannelError) and error.retryable
    assert "connection failed" in error.message


async def test_a_timeout_is_retryable(receiver: WebhookReceiver, secret_file: Secret) -> None:
    e = event()
    receiver.hang(e.id)
    async with opened(channel(receiver.url, secret_file, timeout_s=0.3)) as sender:
        [error] = await sender.send([e])
    assert isinstance(error, ChannelError) and error.retryable
    assert "timed out" in error.message


async def test_a_receiver_with_another_secret_refuses(
    receiver: WebhookReceiver, secret_file: Secret
) -> None:
    """The receiver's check is real: the same request under another secret fails it."""
    receiver.reset(new_secret())  # the receiver's secret changes; ours stays in the file
    async with opened(channel(receiver.url, secret_file)) as sender:
        [error] = await sender.send([event()])
    assert isinstance(error, ChannelError) and not error.retryable
    assert "answered 401: signature refused" in error.message
    assert receiver.rejected == ["No matching signature found"]
    assert receiver.accepted == []


@pytest.mark.parametrize("source", ["file", "env"])
async def test_the_secret_is_read_from_a_file_or_the_environment(
    receiver: WebhookReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    if source == "env":
        monkeypatch.setenv("FILEDOCK_TEST_WEBHOOK_SECRET", receiver.secret)
        secret = Secret(env="FILEDOCK_TEST_WEBHOOK_SECRET")
    else:
        (tmp_path / "secret").write_text(receiver.secret + "\n")
        secret = Secret(file=tmp_path / "secret")
    async with opened(channel(receiver.url, secret)) as sender:
        assert await sender.send([event()]) == [None]
    assert len(receiver.accepted) == 1


async def test_a_missing_or_malformed_secret_fails_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = WebhookSender(channel("http://127.0.0.1:9/", Secret(env="FILEDOCK_TEST_UNSET")))
    monkeypatch.delenv("FILEDOCK_TEST_UNSET", raising=False)
    with pytest.raises(ChannelError) as caught:
        await missing.open()
    assert not caught.value.retryable
    assert "FILEDOCK_TEST_UNSET is not set" in caught.value.message

    (tmp_path / "bad").write_text("whsec_not*base64!secret-value")
    bad = WebhookSender(channel("http://127.0.0.1:9/", Secret(file=tmp_path / "bad")))
    with pytest.raises(ChannelError) as caught:
        await bad.open()
    assert not caught.value.retryable
    assert "not*base64" not in caught.value.message


async def test_the_secret_never_appears_in_errors(
    receiver: WebhookReceiver, secret_file: Secret
) -> None:
    events = [event(i) for i in range(3)]
    # A receiver that echoes what it knows: its error page names the secret.
    receiver.answer(events[0].id, 400, f"secret {receiver.secret} is not the one")
    receiver.answer(events[1].id, 502, f"key {receiver.secret.removeprefix('whsec_')}")
    receiver.hang(events[2].id)
    userinfo = "user:" + quote(receiver.secret, safe="")
    url = f"http://{userinfo}@127.0.0.1:{free_port()}/hooks?token=x"
    messages = []
    async with opened(channel(receiver.url, secret_file, timeout_s=0.3)) as sender:
        messages += [r.message for r in await sender.send(events) if r is not None]
    async with opened(channel(url, secret_file)) as sender:
        messages += [r.message for r in await sender.send(events[:1]) if r is not None]
    assert len(messages) == 4
    assert "*** is not the one" in messages[0]
    for message in messages:
        assert receiver.secret.removeprefix("whsec_") not in message
        assert "token" not in message and userinfo not in message


async def test_https_verified_against_the_ca_file(tmp_path: Path) -> None:
    try:
        import trustme
    except ImportError:
        skip_or_fail("trustme is not installed (the test CA and certificates)")
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    secret = new_secret()
    (tmp_path / "secret").write_text(secret)
    with webhook_receiver(secret, certfile=pem) as receiver:
        settings = channel(receiver.url, Secret(file=tmp_path / "secret"), ca_file=ca_file)
        async with opened(settings) as sender:
            assert await sender.send([event()]) == [None]
        async with opened(channel(receiver.url, Secret(file=tmp_path / "secret"))) as sender:
            [error] = await sender.send([event(1)])
        assert isinstance(error, ChannelError) and not error.retryable
        assert "TLS certificate not trusted" in error.message
        assert [d.headers["webhook-id"] for d in receiver.accepted] == [event().id]
