"""The events a job's transitions cause, as CloudEvents, and the outbox rows that carry
them (and the arrival judgements' events, which name no job) to each channel whose
filter takes them.

`Transitions` builds the events of a state change (`job_event`) and writes their rows
(`Outbox.records`) in the same transaction as the change itself: a crash can delay
an event, never lose it or invent one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import anyio

from service.ledger import DeliveryRecord, JobRecord
from service.ledger.base import OutboxRecord
from service.notify.base import Event
from service.settings.notify import ChannelSettings, EmailChannel
from service.storage.names import display_name, name_b64, rfc3339

__all__ = ["Outbox", "job_event"]

_TYPES = {
    "imported": "filedock.job.done",
    "partial": "filedock.job.partial",
    "duplicate": "filedock.job.duplicate",
}


def job_event(
    job: JobRecord, kind: str, *, at: float, sink: DeliveryRecord | None = None, **data: Any
) -> Event:
    """The CloudEvent of a transition. Its id is stable: the job and the transition, and
    for one that can happen again after `filedock retry`, how many retries came before."""
    retries = sum(1 for h in job.history if h.get("event") == "manual_retry")
    if kind == "done":
        event_type, event_id = _TYPES.get(job.outcome or "", "filedock.job.done"), f"{job.id}.done"
    elif kind == "failed":
        event_type, event_id = "filedock.job.failed", f"{job.id}.failed.{retries}"
    else:
        assert sink is not None
        event_type = "filedock.delivery.failed"
        event_id = f"{job.id}.delivery.{sink.sink}.{retries}"
    body: dict[str, Any] = {
        "job_id": job.id,
        "route": job.route,
        "name": display_name(job.name),
        "relative_path": display_name(job.relative_path),
        "size": job.size,
        "sha256": job.sha256,
        "outcome": job.outcome,
    }
    if (b64 := name_b64(job.name)) is not None:
        body["name_b64"] = b64
    if kind == "done":
        body["archive_path"] = job.archive_path
    else:
        body["error_class"] = sink.error_class if sink else job.error_class
        body["error"] = (sink.error if sink else job.error) or ""
        body["failed_path"] = job.failed_path
        body["how_to_retry"] = f"filedock retry {job.id}" + (f" --sink {sink.sink}" if sink else "")
    if sink is not None:
        body["sink"] = sink.sink
    body.update(data)
    return Event(
        id=event_id,
        type=event_type,
        source=f"/filedock/routes/{job.route}",
        subject=f"{job.route}/{display_name(job.relative_path)}",
        time=rfc3339(at) or "",
        data=body,
    )


class Outbox:
    """Which channel gets which event; `written` wakes the dispatcher."""

    def __init__(self, channels: Sequence[ChannelSettings]) -> None:
        self.channels = list(channels)
        self._written = anyio.Event()

    def __bool__(self) -> bool:
        return bool(self.channels)

    def records(self, events: Sequence[Event]) -> list[OutboxRecord]:
        """A row per event and channel that takes it."""
        now = time.time()
        out = []
        for event in events:
            outcome = event.data.get("outcome")
            for ch in self.channels:
                if not ch.on.takes(event.type, event.route, outcome):
                    continue
                # A digest waits for the events of its window; the others go at once.
                due = now + ch.digest_s if isinstance(ch, EmailChannel) else now
                out.append(
                    OutboxRecord(
                        event_id=event.id,
                        channel=ch.name,
                        type=event.type,
                        route=event.route,
                        job_id=str(event.data.get("job_id", "")),
                        payload=event.to_json(),
                        next_attempt_at=due,
                        created_at=now,
                    )
                )
        return out

    def written(self) -> None:
        """Events were committed: the dispatcher looks now."""
        self._written.set()

    async def wait_written(self, timeout_s: float) -> None:
        with anyio.move_on_after(timeout_s):
            await self._written.wait()
        self._written = anyio.Event()
