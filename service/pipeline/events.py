"""Transition events, and what subscribes to them: metrics, log lines and the tally.

`Transitions` emits one event for each state change of a job, after the ledger
holds it. A new behaviour on a state change (a notification, say) is one more
subscriber here, not an edit in every stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from service.face.logs import job_fields
from service.face.metrics import Metrics
from service.ledger import DeliveryRecord, JobRecord

__all__ = ["Kind", "Subscriber", "Tally", "Transition", "log_transition", "metrics_subscriber"]

log = logging.getLogger("filedock.pipeline")

# `retry`: waiting after a failed attempt; `set_back`: waiting because the service could
# not finish a step (no attempt failed).
# `delivery`: one sink's attempt ended (`outcome`: delivered, found, retry, failed, paused).
Kind = Literal[
    "claimed",
    "importing",
    "retry",
    "set_back",
    "delivering",
    "delivery",
    "archiving",
    "done",
    "failed",
]


@dataclass(frozen=True)
class Transition:
    kind: Kind
    job: JobRecord
    at: float
    outcome: str | None = None
    error_class: str | None = None
    message: str | None = None
    retry_in_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)  # the import's facts, on `done`
    sink: DeliveryRecord | None = None  # on `delivery`
    elapsed_s: float | None = None  # on `delivery`: the attempt's
    sent_bytes: int = 0  # on `delivery`: bytes sent (none when found)


Subscriber = Callable[[Transition], None]


@dataclass
class Tally:
    """What this process did, for `run --once`'s exit code and the shutdown summary."""

    done: int = 0
    failed: int = 0
    retried: int = 0
    by_outcome: dict[str, int] = field(default_factory=dict)

    def __call__(self, t: Transition) -> None:
        if t.kind == "retry":
            self.retried += 1
        elif t.kind in ("done", "failed") and t.outcome is not None:
            self.by_outcome[t.outcome] = self.by_outcome.get(t.outcome, 0) + 1
            if t.kind == "failed":
                self.failed += 1
            else:
                self.done += 1


def metrics_subscriber(metrics: Metrics) -> Subscriber:
    """The metrics that change with a job's state."""

    def on(t: Transition) -> None:
        job, m = t.job, metrics
        if t.kind == "importing":
            if job.attempts == 1 or sum(1 for h in job.history if "n" in h) == 1:
                m.queue_wait.labels(job.route).observe(max(0.0, t.at - job.detected_at))
        elif t.kind == "retry":
            m.retries.labels(job.route).inc()
        elif t.kind == "done":
            m.jobs.labels(job.route, t.outcome).inc()
            m.bytes.labels(job.route).inc(job.size or 0)
            m.last_success.labels(job.route).set(t.at)
            m.end_to_end.labels(job.route).observe(max(0.0, t.at - job.detected_at))
            for key, label in (("rows_imported", "imported"), ("rows_failed", "failed")):
                if isinstance(t.detail.get(key), int):
                    m.rows.labels(job.route, label).inc(t.detail[key])
        elif t.kind == "failed":
            m.jobs.labels(job.route, t.outcome).inc()
            m.job_failures.labels(job.route, t.error_class).inc()
            m.end_to_end.labels(job.route).observe(max(0.0, t.at - job.detected_at))
        elif t.kind == "delivery" and t.sink is not None:
            sink = t.sink.sink
            m.deliveries.labels(job.route, sink, t.outcome).inc()
            if t.elapsed_s is not None:
                m.delivery_duration.labels(job.route, sink).observe(t.elapsed_s)
            if t.sent_bytes:
                m.delivery_bytes.labels(job.route, sink).inc(t.sent_bytes)

    return on


_DELIVERY_LINES = {
    "retry": "delivery will be retried",
    "paused": "sink paused after repeated failures; delivery waits",
    "failed": "delivery failed",
}


def log_transition(t: Transition) -> None:
    """One compact line for each transition an operator follows."""
    job = t.job
    if t.kind == "claimed":
        log.info(
            "claimed", extra=job_fields(job.id, route=job.route, name=job.name, state="claimed")
        )
    elif t.kind == "retry":
        log.info(
            "import will be retried",
            extra=job_fields(
                job.id,
                route=job.route,
                name=job.name,
                state="waiting",
                error_class=t.error_class,
                retry_in_s=round(t.retry_in_s or 0.0, 3),
                attempt=job.attempts,
            ),
        )
    elif t.kind == "delivery" and t.sink is not None:
        row = t.sink
        fields = job_fields(
            job.id,
            route=job.route,
            name=job.name,
            sink=row.sink,
            outcome=t.outcome,
            attempt=row.attempts,
        )
        if t.outcome in ("delivered", "found"):
            where = [r.get("location") for r in row.receipts]
            log.info("delivered", extra={**fields, "to": where, "elapsed_s": t.elapsed_s})
        else:
            if t.error_class is not None:
                fields["error_class"] = t.error_class
            fields["error"] = (t.message or "")[:500]
            if t.retry_in_s is not None:
                fields["retry_in_s"] = round(t.retry_in_s, 3)
            log.warning(_DELIVERY_LINES.get(t.outcome or "", "delivery failed"), extra=fields)
    elif t.kind == "done":
        log.info(
            "archived",
            extra=job_fields(
                job.id,
                route=job.route,
                name=job.name,
                state="done",
                outcome=t.outcome,
                elapsed_s=t.at - job.detected_at,
                attempts=job.attempts,
            ),
        )
    elif t.kind == "failed":
        log.warning(
            "failed",
            extra=job_fields(
                job.id,
                route=job.route,
                name=job.name,
                state="failed",
                outcome=t.outcome,
                error_class=t.error_class,
                error=(t.message or "")[:500],
                elapsed_s=t.at - job.detected_at,
            ),
        )
