"""The ledger's records besides jobs: each sink's delivery, each event in the outbox,
each judged arrival window (and the arrivals it counts), each registered instance;
and their columns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from service.storage.names import rfc3339

__all__ = [
    "DELIVERY_COLUMNS",
    "OUTBOX_COLUMNS",
    "REPLICA_COLUMNS",
    "WINDOW_COLUMNS",
    "Arrival",
    "DeliveryRecord",
    "DeliveryState",
    "Judgement",
    "OutboxRecord",
    "ReplicaRecord",
    "WindowRecord",
]


DeliveryState = Literal["pending", "delivering", "delivered", "waiting", "failed"]


@dataclass
class DeliveryRecord:
    """One sink's part of a job: its state, attempts, next attempt, last error and,
    once delivered, a receipt per file sent (`receipts`, see `Receipt.to_json`)."""

    job_id: str
    sink: str
    route: str
    state: DeliveryState = "pending"
    attempts: int = 0
    next_attempt_at: float | None = None
    error_class: str | None = None
    error: str | None = None
    receipts: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = 0.0
    updated_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "sink": self.sink,
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_at": rfc3339(self.next_attempt_at),
            "error_class": self.error_class,
            "error": self.error,
            "receipts": self.receipts,
            "updated_at": rfc3339(self.updated_at),
        }


@dataclass
class OutboxRecord:
    """One event for one channel, written with the state change that caused it and
    sent by the dispatcher: `pending` until the channel took it (`sent`), or gave up
    on it (`failed`). `payload` is the CloudEvent as JSON; `owner` and
    `lease_expires_at` hold it for the replica sending it."""

    event_id: str
    channel: str
    type: str
    route: str
    job_id: str
    payload: dict[str, Any]
    state: Literal["pending", "sent", "failed"] = "pending"
    attempts: int = 0
    next_attempt_at: float = 0.0
    error: str | None = None
    created_at: float = 0.0
    sent_at: float | None = None
    owner: str | None = None
    lease_expires_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.event_id,
            "channel": self.channel,
            "type": self.type,
            "route": self.route,
            "job_id": self.job_id,
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_at": rfc3339(self.next_attempt_at),
            "error": self.error,
            "created_at": rfc3339(self.created_at),
            "sent_at": rfc3339(self.sent_at),
        }


Judgement = Literal["watching", "on_time", "late", "missing", "failed"]


@dataclass
class WindowRecord:
    """One window of an arrival expectation, judged once (by whichever replica wrote
    it first): the files matching it that arrived after `start`, by `deadline` or
    within the grace after it. Arrivals up to `until` are this window's; the next
    window counts from there. The first row of an expectation is `watching`: when it
    was first seen, so that only the windows ending after that are judged."""

    route: str
    expectation: str
    deadline: float
    start: float
    judgement: Judgement
    files: int = 0
    failed: int = 0
    until: float = 0.0
    judged_at: float = 0.0
    judged_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "expectation": self.expectation,
            "start": rfc3339(self.start),
            "deadline": rfc3339(self.deadline),
            "judgement": self.judgement,
            "files": self.files,
            "failed": self.failed,
            "judged_at": rfc3339(self.judged_at),
            "judged_by": self.judged_by,
        }


@dataclass(frozen=True)
class Arrival:
    """A job as an arrival expectation counts it: when it was detected, and whether it
    failed."""

    job_id: str
    relative_path: bytes
    detected_at: float
    state: str


@dataclass
class ReplicaRecord:
    """One start of a filedock process: `instance` is unique to it and is the `owner` of
    the jobs it holds; `name` is its configured `replica_id` (the pod name), which
    several instances may share. `host`, `boot_id`, `pid_ns`, `pid` and `pid_start`
    (the process's start time in clock ticks since boot) let a process on the same
    host tell whether this one still runs; `heartbeat_at` is written every
    `lease_s / 3`; `stopped_at` once it has stopped cleanly. `jobs` is read, never
    written: the unfinished jobs it holds."""

    instance: str
    name: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    version: str = ""
    boot_id: str | None = None
    pid_ns: str | None = None
    pid_start: int | None = None
    stopped_at: float | None = None
    jobs: int = 0


OUTBOX_COLUMNS: Final = tuple(f.name for f in dataclasses.fields(OutboxRecord))
DELIVERY_COLUMNS: Final = tuple(f.name for f in dataclasses.fields(DeliveryRecord))
WINDOW_COLUMNS: Final = tuple(f.name for f in dataclasses.fields(WindowRecord))
REPLICA_COLUMNS: Final = tuple(  # `jobs` is counted when read, never stored
    f.name for f in dataclasses.fields(ReplicaRecord) if f.name != "jobs"
)
