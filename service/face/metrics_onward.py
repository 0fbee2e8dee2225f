"""The metrics of what happens after an import: deliveries to sinks, events to notify
channels, long work in progress and arrival expectations (`Metrics` mixes them in)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["LATENCY_BUCKETS", "OnwardMetrics"]

# 5 ms to 1 h: the import of a tiny file and the slowest allowed import both resolve.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip


class OnwardMetrics:
    def _define_onward(self, p: str, r: CollectorRegistry) -> None:
        # Delivery.
        self.deliveries = Counter(
            p + "deliveries_total",
            "Deliveries to a sink that ended an attempt, by outcome (delivered, found:"
            " the remote held our bytes already, retry, failed, paused).",
            ["route", "sink", "outcome"],
            registry=r,
        )
        self.delivery_duration = Histogram(
            p + "delivery_duration_seconds",
            "Time a delivery attempt to a sink took (all of a job's files).",
            ["route", "sink"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_bytes = Counter(
            p + "delivery_bytes_total",
            "Bytes delivered to a sink (found ones not counted).",
            ["route", "sink"],
            registry=r,
        )
        self.deliveries_waiting = Gauge(
            p + "deliveries_waiting",
            "Jobs whose delivery to the sink is not done yet (pending, running or waiting"
            " for a retry), across every replica.",
            ["route", "sink"],
            registry=r,
        )
        self.oldest_delivery_age = Gauge(
            p + "oldest_delivery_age_seconds",
            "Age of the oldest delivery to the sink not done yet (0 when none).",
            ["route", "sink"],
            registry=r,
        )
        self.sink_paused = Gauge(
            p + "sink_paused",
            "1 while the sink's circuit breaker holds its deliveries after repeated failures.",
            ["route", "sink"],
            registry=r,
        )

        # Notifications.
        self.events_sent = Counter(
            p + "events_sent_total", "Events a channel accepted.", ["channel"], registry=r
        )
        self.event_send_errors = Counter(
            p + "event_send_errors_total",
            "Attempts to send an event that failed (retried, or given up).",
            ["channel"],
            registry=r,
        )
        self.events_failed = Counter(
            p + "events_failed_total",
            "Events given up on after the channel's max_attempts (or a final error).",
            ["channel"],
            registry=r,
        )
        self.notify_process_restarts = Counter(
            p + "notify_process_restarts",
            "Times the notify process (the dispatcher's own) ended on its own or could not"
            " start, and was started again.",
            registry=r,
        )
        self.outbox_pending = Gauge(
            p + "outbox_pending",
            "Events waiting in the outbox for the channel, across every replica.",
            ["channel"],
            registry=r,
        )
        self.outbox_oldest_age = Gauge(
            p + "outbox_oldest_pending_age_seconds",
            "Age of the oldest event waiting for the channel (0 when none).",
            ["channel"],
            registry=r,
        )
        # -- long work in progress --------------------------------------------------
        self.progress_done = Gauge(
            p + "work_in_progress_bytes",
            "Bytes done of the large jobs (64 MiB or more) this process is archiving or"
            " delivering now, by route and stage (archive, deliver:<sink>).",
            ["route", "stage"],
            registry=r,
        )
        self.progress_total = Gauge(
            p + "work_in_progress_total_bytes",
            "Bytes in all of the large jobs this process is archiving or delivering now.",
            ["route", "stage"],
            registry=r,
        )

        # -- arrival expectations --------------------------------------------------
        self.expectation_missing = Gauge(
            p + "expectation_missing",
            "1 while the expectation's last judged window is missing and no matching file"
            " has arrived since.",
            ["route", "expectation"],
            registry=r,
        )
        self.expectation_next_deadline = Gauge(
            p + "expectation_next_deadline_timestamp_seconds",
            "When the expectation's current window ends (Unix time; its grace comes after).",
            ["route", "expectation"],
            registry=r,
        )
        self.arrival_windows = Counter(
            p + "arrival_windows",
            "Windows of the expectation judged by this replica, by judgement.",
            ["route", "expectation", "judgement"],
            registry=r,
        )

    def declare_channel(self, channel: str) -> None:
        """A channel's series at zero, before its first event."""
        for metric in (self.events_sent, self.event_send_errors, self.events_failed):
            metric.labels(channel)
        self.outbox_pending.labels(channel)
        self.outbox_oldest_age.labels(channel)

    def declare_expectation(self, route: str, expectation: str) -> None:
        """An expectation's series at zero, before its first window is judged."""
        for judgement in ("on_time", "late", "missing", "failed"):
            self.arrival_windows.labels(route, expectation, judgement)
        self.expectation_missing.labels(route, expectation).set(0)
        self.expectation_next_deadline.labels(route, expectation)

    def declare_sink(self, route: str, sink: str) -> None:
        """A sink's series at zero, before its first delivery."""
        for outcome in ("delivered", "found", "retry", "failed", "paused"):
            self.deliveries.labels(route, sink, outcome)
        self.delivery_duration.labels(route, sink)
        self.delivery_bytes.labels(route, sink)
        self.deliveries_waiting.labels(route, sink)
        self.oldest_delivery_age.labels(route, sink)
        self.sink_paused.labels(route, sink).set(0)
