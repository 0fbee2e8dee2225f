"""A real SMTP server for the tests: aiosmtpd on a free loopback port, keeping each
message it takes (`Mailbox`)."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from conftest import free_port


@dataclass(frozen=True)
class Received:
    mail_from: str | None
    rcpt_tos: list[str]
    message: EmailMessage
    tls: bool
    login: str | None


@dataclass
class Mailbox:
    """An aiosmtpd handler keeping each message; `reply` answers DATA instead."""

    received: list[Received] = field(default_factory=list)
    reply: str | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.reply is not None:
            return self.reply
        assert isinstance(envelope.original_content, bytes)
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        assert server.transport is not None
        tls = server.transport.get_extra_info("sslcontext") is not None
        login = session.auth_data.login.decode() if session.authenticated else None
        self.received.append(Received(envelope.mail_from, envelope.rcpt_tos, message, tls, login))
        return "250 2.0.0 queued"


@dataclass
class Server:
    mailbox: Mailbox
    port: int


@contextmanager
def smtp_server(**kwargs: Any) -> Iterator[Server]:
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()  # returns once the server answers
    try:
        yield Server(mailbox, port)
    finally:
        controller.stop()
