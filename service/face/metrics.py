"""Every Prometheus metric filedock exports, in one place.

Names are a contract (dashboards and alerts are built on them). No file name,
path or job id is ever a label: label values are route names, outcomes, error
classes, folder names and fixed words.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

from service import __version__
from service.errors import ERROR_CLASSES

__all__ = ["Metrics"]

# 5 ms to 1 h: the import of a tiny file and the slowest allowed import both resolve.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip


FINAL_ERROR_CLASSES = tuple(c for c in ERROR_CLASSES if c not in ("import_error", "retry"))
RECOVERY_KINDS = (
    "requeued",
    "finished_archive",
    "finished_fail",
    "adopted",
    "removed_empty",
    "removed_tmp",
    "unclaimed_row",
    "inconsistency",
)


class Metrics:
    """The metric objects of one service instance, on their own registry.

    A registry per instance keeps tests that run several services in one
    process apart, and keeps prometheus-client's process collectors explicit.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.worker_pid: Callable[[], int | None] = lambda: None  # set by the pipeline
        if registry is None:
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                self.registry.register(collector)
            # The archive worker process's own figures, `filedock_archive_worker_process_*`
            # (CPU, resident memory, start time, descriptors).
            ProcessCollector("filedock_archive_worker", self._worker_proc, registry=self.registry)
        r = self.registry
        p = "filedock_"

        self.build_info = Info(p + "build", "Version of filedock and of Python.", registry=r)
        self.build_info.info({"version": __version__, "python": platform.python_version()})

        # Intake.
        self.files_detected = Counter(
            p + "files_detected_total", "Files found ready in transfer/.", ["route"], registry=r
        )
        self.unrouted_files = Gauge(
            p + "unrouted_files", "Files in transfer/ that match no route.", registry=r
        )
        self.stalled_uploads = Gauge(
            p + "stalled_uploads",
            "Temporary or unready files that stopped growing for stalled_after_s.",
            registry=r,
        )
        self.queue_depth = Gauge(
            p + "queue_depth", "Ready files queued in memory for a claim.", registry=r
        )
        self.claims_put_off = Counter(
            p + "claims_put_off_total",
            "Claims put off because a process still had the file open for writing.",
            ["route"],
            registry=r,
        )
        self.backlog_files = Gauge(
            p + "backlog_files", "Files waiting in each folder.", ["folder"], registry=r
        )
        self.backlog_bytes = Gauge(
            p + "backlog_bytes",
            'Bytes of routed files waiting in transfer/ (folder="transfer").',
            ["folder"],
            registry=r,
        )
        self.oldest_waiting_age = Gauge(
            p + "oldest_waiting_file_age_seconds",
            "Age of the oldest file waiting in transfer/ or proc/ (0 when none).",
            registry=r,
        )

        # Jobs.
        self.jobs = Counter(
            p + "jobs_total",
            "Jobs ended, by outcome (imported, partial, duplicate, rejected, exhausted,"
            " set_aside).",
            ["route", "outcome"],
            registry=r,
        )
        self.job_failures = Counter(
            p + "job_failures_total",
            "Jobs sent to failed/, by error class.",
            ["route", "error_class"],
            registry=r,
        )
        self.retries = Counter(
            p + "retries_total", "Import attempts that will be retried.", ["route"], registry=r
        )
        self.bytes = Counter(
            p + "bytes_total", "Bytes of source files archived.", ["route"], registry=r
        )
        self.rows = Counter(
            p + "rows_total",
            "CSV rows handled by csv-sql importers, by result (imported, failed).",
            ["route", "result"],
            registry=r,
        )
        self.in_progress = Gauge(
            p + "jobs_in_progress", "Imports running now.", ["route"], registry=r
        )
        self.concurrency_limit = Gauge(
            p + "concurrency_limit",
            'Most imports allowed at once (route="" is the global limit).',
            ["route"],
            registry=r,
        )
        self.last_success = Gauge(
            p + "last_success_timestamp_seconds",
            "When a job of the route last ended done (Unix time).",
            ["route"],
            registry=r,
        )
        self.import_duration = Histogram(
            p + "import_duration_seconds",
            "Time one import attempt took.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            p + "queue_wait_seconds",
            "Time from detection to the start of the first import attempt.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end = Histogram(
            p + "end_to_end_seconds",
            "Time from detection to the job's end (archived or failed).",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        # The service itself.
        self.watcher_mode = Gauge(
            p + "watcher_mode",
            "1 for the discovery mode in use (events, poll, scan).",
            ["mode"],
            registry=r,
        )
        self.watcher_restarts = Counter(
            p + "watcher_restarts_total", "Times the file watcher died and restarted.", registry=r
        )
        self.watcher_overflows = Counter(
            p + "watcher_overflows_total",
            "Times the kernel's inotify queue overflowed (events lost; a full scan follows).",
            registry=r,
        )
        self.watcher_missed = Counter(
            p + "watcher_missed_files_total",
            "Files a reconciliation scan found that the watcher never reported, "
            "with no queue overflow to explain it.",
            registry=r,
        )
        self.scan_duration = Histogram(
            p + "scan_duration_seconds",
            "Time one full scan of transfer/ took.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.recovery_actions = Counter(
            p + "recovery_actions_total",
            "What start-up recovery did or found, by kind.",
            ["kind"],
            registry=r,
        )
        self.filesystem_free = Gauge(
            p + "filesystem_free_bytes",
            "Free bytes on the filesystem of each folder.",
            ["folder"],
            registry=r,
        )
        self.filesystem_size = Gauge(
            p + "filesystem_size_bytes",
            "Size of the filesystem of each folder.",
            ["folder"],
            registry=r,
        )
        self.ready = Gauge(
            p + "ready", "1 when the service is ready (the /readyz answer).", registry=r
        )
        self.archive_retries = Counter(
            p + "archive_retries_total",
            "Archive writes that failed (disk full, I/O error) and will be tried again.",
            registry=r,
        )
        self.ledger_errors = Counter(
            p + "ledger_errors_total", "Ledger operations that failed.", registry=r
        )
        self.reaped = Counter(
            p + "reaped_total",
            "What the retention reaper deleted, by kind (archive, failed, ledger, events,"
            " replicas).",
            ["kind"],
            registry=r,
        )

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
            "Bytes done of the large jobs this process is archiving now (those of at least"
            " 64 MiB), by route and stage.",
            ["route", "stage"],
            registry=r,
        )
        self.progress_total = Gauge(
            p + "work_in_progress_total_bytes",
            "Bytes in all of the large jobs this process is archiving now, by route and stage.",
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

        for kind in RECOVERY_KINDS:
            self.recovery_actions.labels(kind)

    def _worker_proc(self) -> int | str:
        pid = self.worker_pid()
        # No worker (none yet, or archiving in a thread): a /proc entry that cannot
        # exist, which the collector reads as "no figures".
        return "no-archive-worker" if pid is None else pid

    def declare_route(self, route: str, concurrency: int) -> None:
        """Create a route's series at zero, so rates and alerts see it before its first file."""
        self.files_detected.labels(route)
        self.retries.labels(route)
        self.bytes.labels(route)
        self.in_progress.labels(route)
        self.concurrency_limit.labels(route).set(concurrency)
        self.import_duration.labels(route)
        self.queue_wait.labels(route)
        self.end_to_end.labels(route)
        for outcome in ("imported", "partial", "duplicate", "rejected", "exhausted", "set_aside"):
            self.jobs.labels(route, outcome)
        for error_class in FINAL_ERROR_CLASSES:
            self.job_failures.labels(route, error_class)

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
