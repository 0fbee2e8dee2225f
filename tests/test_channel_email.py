"""The email channel against real SMTP servers: aiosmtpd on loopback, plain, with
STARTTLS and implicit TLS (a CA and certificate made here with trustme) and with AUTH."""

from __future__ import annotations

import asyncio
import gc
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from conftest import free_port, skip_or_fail
from smtp_box import Server, smtp_server

from service.notify.base import ChannelError, Event
from service.notify.email import EmailSender
from service.settings.notify import EmailChannel

USER, PASSWORD = "filedock", "correct horse battery staple"


def authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (USER.encode(), PASSWORD.encode())
    # handled=False: aiosmtpd answers a refusal itself (535).
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


@dataclass(frozen=True)
class Certs:
    ca_file: Path
    server: ssl.SSLContext


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    try:
        import trustme
    except ImportError:
        skip_or_fail("trustme is not installed (the test CA and certificates)")
    ca = trustme.CA()
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return Certs(ca_file, context)


@pytest.fixture(scope="module")
def plain() -> Iterator[Server]:
    with smtp_server() as server:
        yield server


@pytest.fixture(scope="module")
def starttls(certs: Certs) -> Iterator[Server]:
    with smtp_server(tls_context=certs.server, require_starttls=True) as server:
        yield server


@pytest.fixture(scope="module")
def with_auth(certs: Certs) -> Iterator[Server]:
    """STARTTLS and AUTH both required (aiosmtpd offers AUTH only over TLS)."""
    kwargs = {"authenticator": authenticate, "auth_required": True}
    with smtp_server(tls_context=certs.server, require_starttls=True, **kwargs) as server:
        yield server


@pytest.fixture(autouse=True)
def _empty_mailboxes(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("plain", "starttls", "with_auth"):
        if name in request.fixturenames:
            server = request.getfixturevalue(name)
            server.mailbox.received.clear()
            server.mailbox.reply = None


def channel(port: int, **settings: Any) -> EmailChannel:
    doc: dict[str, Any] = {
        "kind": "email",
        "name": "ops-mail",
        "host": "127.0.0.1",
        "port": port,
        "tls": "none",
        "from": "filedock <filedock@example.org>",
        "to": ["ops@example.org", "oncall@example.org"],
        "timeout_s": 5,
    }
    doc.update(settings)
    return EmailChannel.model_validate(doc)


@asynccontextmanager
async def opened(settings: EmailChannel) -> AsyncIterator[EmailSender]:
    sender = EmailSender(settings)
    await sender.open()
    try:
        yield sender
    finally:
        await sender.close()
        await sockets_closed()


async def sockets_closed(timeout_s: float = 10) -> None:
    """Wait until every socket transport that is closing has closed.

    aiosmtplib closes a connection it gives up on (a refused login, a failed STARTTLS)
    with the transport's own close, which finishes loop turns later (after the TLS
    shutdown, for a STARTTLS connection). The test's loop must run until then, or the
    transport is reported unclosed in whichever test the garbage collector runs in.
    """
    with anyio.fail_after(timeout_s):
        # A selector transport drops its socket (`_sock`) once its close has finished.
        while any(
            isinstance(t, asyncio.Transport) and t.is_closing() and getattr(t, "_sock", None)
            for t in gc.get_objects()
        ):
            await anyio.sleep(0.01)


def event(i: int, kind: str = "failed", route: str = "orders") -> Event:
    job = f"01JOB{i:05d}"
    data: dict[str, Any] = {
        "job_id": job,
        "route": route,
        "name": f"order-{i}.csv",
        "relative_path": f"in/order-{i}.csv",
        "size": 100,
        "sha256": "0" * 64,
    }
    if kind == "done":
        data.update(outcome="imported", archive_path=f"archive/{route}/{job}")
        event_type, event_id = "filedock.job.done", f"{job}.done"
    elif kind == "delivery":
        data.update(
            outcome="imported",
            sink="lake",
            error_class="sink_unreachable",
            error="PUT s3://lake/x: connection refused",
            failed_path=f"failed/{job}",
            how_to_retry=f"filedock retry {job} --sink lake",
        )
        event_type, event_id = "filedock.delivery.failed", f"{job}.delivery.lake.0"
    else:
        data.update(
            outcome="failed",
            error_class="parse_error",
            error=f"line {i}: bad date\nexpected YYYY-MM-DD",
            failed_path=f"failed/{job}",
            how_to_retry=f"filedock retry {job}",
        )
        event_type, event_id = "filedock.job.failed", f"{job}.failed.0"
    return Event(
        id=event_id,
        type=event_type,
        source=f"/filedock/routes/{route}",
        subject=f"{route}/in/order-{i}.csv",
        time=f"2026-05-01T10:{i // 60 % 60:02d}:{i % 60:02d}.000000Z",
        data=data,
    )


async def test_a_thousand_failures_make_one_short_message(plain: Server) -> None:
    events = [event(i) for i in range(1000)]
    async with opened(channel(plain.port)) as sender:
        assert await sender.send(events) == [None] * 1000
    [got] = plain.mailbox.received
    message = got.message
    assert message["Subject"] == "[filedock] 1000 files failed on route orders"
    assert message["X-Filedock-Events"] == "1000"
    assert message["From"] == "filedock <filedock@example.org>"
    assert got.mail_from == "filedock@example.org"
    assert got.rcpt_tos == ["ops@example.org", "oncall@example.org"]
    assert message["Date"] and message["Message-ID"].startswith("<filedock.01JOB00000-failed-0.")
    body = message.get_content().replace("\r\n", "\n")
    assert len(body) < 100_000
    assert body.count("    retry: filedock retry 01JOB") == EmailSender.listed == 200
    assert "in/order-0.csv" in body and "in/order-199.csv" in body
    assert "in/order-200.csv" not in body
    assert "    failed: parse_error: line 7: bad date\n      expected YYYY-MM-DD" in body
    assert "    failed folder: failed/01JOB00007" in body
    assert "and 800 more: filedock jobs --state failed --route orders" in body
    assert "800 of 1000 events are counted here but not listed." in body


async def test_the_subject_counts_each_type_per_route(plain: Server) -> None:
    events = (
        [event(i, "done") for i in range(3)]
        + [event(i, "failed") for i in range(3, 20)]
        + [event(i, "delivery", route="lake") for i in range(20, 22)]
    )
    async with opened(channel(plain.port)) as sender:
        assert await sender.send(events) == [None] * 22
    [got] = plain.mailbox.received
    assert got.message["Subject"] == (
        "[filedock] 3 done, 17 failed on route orders; 2 delivery failures on route lake"
    )
    body = got.message.get_content().replace("\r\n", "\n")
    # Failures come first, then delivery failures, then what went well.
    failed = body.index("Failed on route orders (17)")
    delivery = body.index("Delivery failures on route lake (2)")
    assert failed < delivery < body.index("Done on route orders (3)")
    assert "    delivery to lake failed: sink_unreachable: PUT s3://lake/x" in body
    assert "    retry: filedock retry 01JOB00020 --sink lake" in body
    assert "    archive folder: archive/orders/01JOB00000" in body


async def test_the_message_id_is_the_same_for_the_same_events(plain: Server) -> None:
    events = [event(i) for i in range(5)]
    async with opened(channel(plain.port)) as sender:
        assert await sender.send(events) == [None] * 5
        assert await sender.send(events) == [None] * 5  # a re-send after a crash
        assert await sender.send([*events, event(5)]) == [None] * 6  # more since
    first, again, grown = (r.message["Message-ID"] for r in plain.mailbox.received)
    assert first == again
    assert grown != first
    assert first.endswith("@example.org>")


async def test_starttls_verified_against_the_ca_file(starttls: Server, certs: Certs) -> None:
    settings = channel(starttls.port, tls="starttls", ca_file=certs.ca_file)
    async with opened(settings) as sender:
        assert await sender.send([event(1)]) == [None]
    [got] = starttls.mailbox.received
    assert got.tls


async def test_an_untrusted_certificate_is_final(starttls: Server) -> None:
    async with opened(channel(starttls.port, tls="starttls")) as sender:
        [error] = await sender.send([event(1)])
    assert isinstance(error, ChannelError) and not error.retryable
    assert "TLS certificate not trusted" in error.message
    assert starttls.mailbox.received == []


async def test_a_server_that_requires_starttls_refuses_plain_text(starttls: Server) -> None:
    async with opened(channel(starttls.port, tls="none")) as sender:
        [error] = await sender.send([event(1)])
    assert isinstance(error, ChannelError) and not error.retryable
    assert "530" in error.message


async def test_starttls_asked_of_a_server_without_it_is_final(plain: Server) -> None:
    async with opened(channel(plain.port, tls="starttls")) as sender:
        [error] = await sender.send([event(1)])
    assert isinstance(error, ChannelError) and not error.retryable
    assert "STARTTLS" in error.message


async def test_implicit_tls(certs: Certs) -> None:
    with smtp_server(ssl_context=certs.server) as server:
        settings = channel(server.port, tls="implicit", ca_file=certs.ca_file)
        async with opened(settings) as sender:
            assert await sender.send([event(1), event(2)]) == [None, None]
        [got] = server.mailbox.received
        assert got.tls and got.message["X-Filedock-Events"] == "2"


async def test_login_with_the_password_from_a_secret(
    with_auth: Server, certs: Certs, tmp_path: Path
) -> None:
    (tmp_path / "smtp-password").write_text(PASSWORD + "\n")
    settings = channel(
        with_auth.port,
        tls="starttls",
        ca_file=certs.ca_file,
        username=USER,
        password={"file": str(tmp_path / "smtp-password")},
    )
    async with opened(settings) as sender:
        assert await sender.send([event(1)]) == [None]
    [got] = with_auth.mailbox.received
    assert got.login == USER and got.tls


async def test_a_wrong_password_is_final(
    with_auth: Server, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FILEDOCK_TEST_SMTP_PASSWORD", "not the password")
    settings = channel(
        with_auth.port,
        tls="starttls",
        ca_file=certs.ca_file,
        username=USER,
        password={"env": "FILEDOCK_TEST_SMTP_PASSWORD"},
    )
    async with opened(settings) as sender:
        [error] = await sender.send([event(1)])
    assert isinstance(error, ChannelError) and not error.retryable
    assert "login refused: 535" in error.message
    assert "not the password" not in error.message
    assert with_auth.mailbox.received == []


async def test_a_missing_password_fails_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FILEDOCK_TEST_UNSET", raising=False)
    settings = channel(25, username=USER, password={"env": "FILEDOCK_TEST_UNSET"})
    with pytest.raises(ChannelError) as caught:
        await EmailSender(settings).open()
    assert not caught.value.retryable
    assert "FILEDOCK_TEST_UNSET is not set" in caught.value.message


async def test_a_server_down_is_retryable() -> None:
    async with opened(channel(free_port())) as sender:
        errors = await sender.send([event(1), event(2)])
    assert errors[0] is errors[1]
    assert isinstance(errors[0], ChannelError) and errors[0].retryable
    assert "connection failed" in errors[0].message


@pytest.mark.parametrize(
    ("reply", "retryable"),
    [("451 4.3.0 mailbox busy, try later", True), ("554 5.6.0 message refused", False)],
)
async def test_a_reply_decides_whether_to_retry(plain: Server, reply: str, retryable: bool) -> None:
    plain.mailbox.reply = reply
    async with opened(channel(plain.port)) as sender:
        [error] = await sender.send([event(1)])
    assert isinstance(error, ChannelError) and error.retryable is retryable
    assert reply.partition(" ")[2] in error.message


async def test_a_header_injected_through_an_address_is_refused(plain: Server) -> None:
    async with opened(channel(plain.port, to=["ops@example.org\r\nBcc: x@example.com"])) as sender:
        [error] = await sender.send([event(1)])
    assert isinstance(error, ChannelError) and not error.retryable
    assert plain.mailbox.received == []


async def test_nothing_to_send_sends_nothing(plain: Server) -> None:
    async with opened(channel(plain.port)) as sender:
        assert await sender.send([]) == []
    assert plain.mailbox.received == []
