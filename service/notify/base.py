"""What a channel sends and the protocol every channel kind implements.

An `Event` is a CloudEvents 1.0 event in structured mode (`to_json`), built once when
the state change that causes it is written, and stored in the ledger's outbox with
it. Its `id` is stable (the job, the transition, and for a repeated one its count), so
a channel that deduplicates (NATS's `Nats-Msg-Id`, a webhook receiver's `webhook-id`)
drops the duplicate a crash after a send may cause.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Channel", "ChannelError", "ConnectionLost", "Event"]


@dataclass(frozen=True)
class Event:
    """One CloudEvent: `type` (`filedock.job.done` …), `subject` (route/relative path),
    `time` (RFC 3339), `data` (job id, route, name, outcome, paths, receipts …)."""

    id: str
    type: str
    source: str
    subject: str
    time: str
    data: dict[str, Any]

    @property
    def route(self) -> str:
        return str(self.data.get("route", ""))

    def to_json(self) -> dict[str, Any]:
        return {
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "subject": self.subject,
            "time": self.time,
            "datacontenttype": "application/json",
            "data": self.data,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Event:
        return cls(
            id=doc["id"],
            type=doc["type"],
            source=doc["source"],
            subject=doc["subject"],
            time=doc["time"],
            data=dict(doc["data"]),
        )


class ChannelError(Exception):
    """A send that did not happen. `retryable`: it may succeed later (the server down,
    a timeout, a 5xx); otherwise never as configured (a 4xx, refused credentials)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


class ConnectionLost(Exception):
    """A channel's connection failed under a send: the rest of its batch is not tried
    (each event gets `error`)."""

    def __init__(self, error: ChannelError) -> None:
        super().__init__(error.message)
        self.error = error


class Channel(abc.ABC):
    """One configured channel. `open` reads credentials and may connect (a server down
    must not stop the service: connect lazily where it can); `send` delivers events."""

    name: str
    # A digest channel gets every pending event at once, when the oldest is due; the
    # others get events as they come, a batch at a time.
    digest: bool = False

    async def open(self) -> None:  # noqa: B027 - a channel without a client needs none
        """Read credentials, build clients; raise `ChannelError(retryable=False)` on a
        missing credential."""

    async def close(self) -> None:  # noqa: B027
        """Release clients and connections."""

    @abc.abstractmethod
    async def send(self, events: Sequence[Event]) -> list[ChannelError | None]:
        """Send each event; one result per event, in order: None when it was accepted
        (acknowledged by the server), else why not."""
