"""The channels events are sent to (`notify:`), one model per kind, each with its `on:`
filter and its own retries. Secrets are named (`{env: …}` or `{file: …}`), never
written here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from service.settings.sections import Section
from service.settings.sinks import Secret

__all__ = [
    "EVENT_TYPES",
    "AmqpChannel",
    "ChannelSettings",
    "EmailChannel",
    "EventFilter",
    "NatsChannel",
    "WebhookChannel",
]

EVENT_TYPES = (
    "filedock.job.done",
    "filedock.job.partial",
    "filedock.job.duplicate",
    "filedock.job.failed",
    "filedock.delivery.failed",
    "filedock.arrival.missing",
    "filedock.arrival.late",
    "filedock.arrival.failed",
)
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class EventFilter(Section):
    """Which events a channel gets: each list, when given, must hold the event's type,
    route or outcome (an empty list means any)."""

    types: list[str] = Field(default_factory=list)
    routes: list[str] = Field(default_factory=list)
    outcomes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _known_types(self) -> EventFilter:
        for t in self.types:
            if t not in EVENT_TYPES:
                raise ValueError(f"unknown event type {t!r}; known: " + ", ".join(EVENT_TYPES))
        return self

    def takes(self, event_type: str, route: str, outcome: str | None) -> bool:
        return (
            (not self.types or event_type in self.types)
            and (not self.routes or route in self.routes)
            and (not self.outcomes or (outcome or "") in self.outcomes)
        )


class _Channel(Section):
    name: str = Field(pattern=_NAME)
    on: EventFilter = EventFilter()
    max_attempts: int = Field(default=10, ge=1)
    backoff_s: float = Field(default=5.0, ge=0)
    max_backoff_s: float = Field(default=900.0, ge=0)
    timeout_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _backoff_order(self) -> _Channel:
        if self.max_backoff_s < self.backoff_s:
            raise ValueError("max_backoff_s must be at least backoff_s")
        return self


class WebhookChannel(_Channel):
    """An HTTP endpoint that gets each event as a signed POST (Standard Webhooks)."""

    kind: Literal["webhook"]
    url: str = Field(pattern=r"^https?://")
    # The Standard Webhooks secret: `whsec_` and base64, as the receiver's library takes it.
    secret: Secret
    headers: dict[str, str] = Field(default_factory=dict)
    verify_tls: bool = True
    ca_file: Path | None = None
    concurrency: int = Field(default=8, ge=1, le=256)


class EmailChannel(_Channel):
    """A digest by email: the events of `digest_s` in one message, one per window."""

    kind: Literal["email"]
    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)  # 587, 465 with tls: implicit
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    verify_tls: bool = True
    ca_file: Path | None = None
    username: str | None = None
    password: Secret | None = None
    sender: str = Field(alias="from", min_length=3)
    to: list[str] = Field(min_length=1)
    subject_prefix: str = "[filedock]"
    digest_s: float = Field(default=300.0, ge=0)


class NatsChannel(_Channel):
    """A JetStream subject: each event published with `Nats-Msg-Id`, acknowledged."""

    kind: Literal["nats"]
    servers: list[str] = Field(default_factory=lambda: ["nats://127.0.0.1:4222"], min_length=1)
    subject: str = "filedock.events.{type}"  # {type}, {route}
    stream: str | None = None  # the stream the subject must land in (checked on publish)
    user: str | None = None
    password: Secret | None = None
    token: Secret | None = None


class AmqpChannel(_Channel):
    """A RabbitMQ exchange: persistent messages, publisher confirms."""

    kind: Literal["amqp"]
    url: Secret  # amqp://user:password@host:5672/vhost, from a variable or a file
    exchange: str = "filedock"
    exchange_type: Literal["topic", "direct", "fanout", "headers"] = "topic"
    declare_exchange: bool = True
    routing_key: str = "{type}"  # {type}, {route}


ChannelSettings = Annotated[
    WebhookChannel | EmailChannel | NatsChannel | AmqpChannel, Field(discriminator="kind")
]
