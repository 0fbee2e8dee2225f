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
from service.face.metrics_onward import LATENCY_BUCKETS, OnwardMetrics

__all__ = ["Metrics"]

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


class Metrics(OnwardMetrics):
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

        self._define_onward(p, r)

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
