"""What the operator page asks of the ledger, whatever the backend: the overview's
figures, a page of jobs by keyset, a job with its sinks, and the failures by cause.

Every read is bounded by an index, so a page costs the same with a million rows as
with a thousand (docs/benchmarks.md, "The operator page"). A list is paged by its
last job id (ids sort by creation time): the next page is the jobs older than it. A
filter no index serves (a name, an outcome) is checked on at most `scan_rows` jobs a
page; a page that ends there says so (`JobsPage.scan_ended`) and the next one goes
on from where it stopped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal

from service.ledger.base import DeliveryRecord, JobRecord
from service.storage.names import new_job_id

__all__ = [
    "JOB_ID_RE",
    "LIST_COLUMNS",
    "ROUTES_SQL",
    "SCAN_ROWS",
    "FailureGroup",
    "JobsPage",
    "JobsQuery",
    "LedgerOverview",
    "Plan",
    "RouteStats",
    "escape_octets",
    "id_prefix",
    "page_of",
    "plan",
]

# The list's columns, the same SQL on both backends: no history, the error cut short.
LIST_COLUMNS: Final = (
    "id, route, name, relative_path, state, outcome, attempts, size, sha256, next_attempt_at,"
    " error_class, substr(error, 1, 500) AS error, detected_at, created_at, updated_at,"
    " archive_path, failed_path, duplicate_of"
)
# The routes in the ledger, one index probe each (a loose index scan).
ROUTES_SQL: Final = """WITH RECURSIVE r(route) AS (
    SELECT (SELECT min(route) FROM jobs)
    UNION ALL SELECT (SELECT min(route) FROM jobs WHERE route > r.route) FROM r
    WHERE r.route IS NOT NULL)
SELECT route FROM r WHERE route IS NOT NULL"""

SCAN_ROWS: Final = 20_000
JOB_ID_RE: Final = re.compile(r"^\d{8}T\d{9}Z-[0-9a-f]{8}\Z")


def id_prefix(t: float) -> str:
    """The time part of a job id made at `t`: every job created at or after `t` has an
    id at least this (`20270115T000000000Z`)."""
    return new_job_id(t).split("-", 1)[0]


def escape_octets(data: bytes) -> str:
    r"""`data` as PostgreSQL's `encode(x, 'escape')` writes it, lowered (ASCII only):
    the form a case-blind search compares names in.

    >>> escape_octets(b"A\\b\xff")
    'a\\\\b\\377'
    """
    out = []
    for b in data.lower():
        if b == 0x5C:
            out.append("\\\\")
        elif b == 0 or b >= 0x80:
            out.append(f"\\{b:03o}")
        else:
            out.append(chr(b))
    return "".join(out)


@dataclass(frozen=True)
class RouteStats:
    """A route over the recent window: jobs created in it per final state, those still
    running, and when the route's newest `done` job finished (at any time)."""

    route: str
    done: int = 0
    failed: int = 0
    unfinished: int = 0
    last_done_at: float | None = None

    def per_hour(self, window_s: float) -> float:
        return (self.done + self.failed + self.unfinished) * 3600.0 / window_s

    @property
    def failure_ratio(self) -> float | None:
        final = self.done + self.failed
        return self.failed / final if final else None


@dataclass(frozen=True)
class LedgerOverview:
    """One consistent look at the ledger: jobs per state, each route's recent window,
    the sinks' open deliveries (route, sink, open, oldest) and the outbox's pending
    events (channel, pending, oldest)."""

    counts: dict[str, int]
    routes: list[RouteStats]
    deliveries: list[tuple[str, str, int, float | None]]
    outbox: list[tuple[str, int, float | None]]


@dataclass(frozen=True)
class JobsQuery:
    """A page of the job list: the filters, and `before` (the last id of the previous
    page). `text` is a case-blind (ASCII) piece of the relative path; `sha256` a
    prefix of the content's hex digest."""

    state: str | None = None
    route: str | None = None
    outcome: str | None = None
    error_class: str | None = None
    text: str | None = None
    sha256: str | None = None
    before: str | None = None
    limit: int = 50
    scan_rows: int = SCAN_ROWS


@dataclass(frozen=True)
class JobsPage:
    """Jobs newest first, without their history. `next_before` continues the list
    (None: nothing older matches); `scan_ended` says the page stopped at its scan
    bound rather than at `limit`, so older matches may still follow."""

    jobs: list[JobRecord]
    next_before: str | None = None
    scan_ended: bool = False


@dataclass(frozen=True)
class FailureGroup:
    """Failed jobs of one route and error class: how many, and the newest of them."""

    route: str
    error_class: str | None
    count: int
    jobs: list[JobRecord] = field(default_factory=list)


JobDetail = tuple[JobRecord | None, list[DeliveryRecord]]


@dataclass(frozen=True)
class Plan:
    """How a page of jobs is read, on either backend: the index, the filters its
    equality columns serve (`keyed`), and those left to check row by row (`residual`,
    with the text search). Residual filters make the read `bounded`: it looks at no
    more than `scan_rows` entries of the index."""

    index: Literal["id", "state", "route", "failed", "sha256"]
    keyed: dict[str, str]
    residual: dict[str, str]
    text: str | None

    @property
    def bounded(self) -> bool:
        return self.index != "sha256" and bool(self.residual or self.text)


def plan(q: JobsQuery) -> Plan:
    """The index that serves the query best: a route's (its jobs by id, with their
    state), the failed jobs' (by route, error class and id), a state's, or the ids'.
    A content search goes through (route, sha256): there are few routes."""
    given = {c: getattr(q, c) for c in ("state", "route", "outcome", "error_class")}
    given = {c: v for c, v in given.items() if v is not None}
    index: Literal["id", "state", "route", "failed", "sha256"] = "id"
    if q.sha256:
        index = "sha256"
    elif given.get("state") == "failed" and "route" in given and "error_class" in given:
        index = "failed"
    elif "route" in given:
        index = "route"
    elif "state" in given:
        index = "state"
    columns = {
        "id": (),
        "sha256": (),
        "failed": ("state", "route", "error_class"),
        "route": ("route",),
        "state": ("state",),
    }[index]
    keyed = {c: given[c] for c in columns}
    residual = {c: v for c, v in given.items() if c not in keyed}
    return Plan(index, keyed, residual, q.text or None)


def page_of(jobs: list[JobRecord], limit: int, boundary: str | None) -> JobsPage:
    """The page from up to `limit + 1` jobs read, and the scan's bound if it had one."""
    if len(jobs) > limit:
        return JobsPage(jobs[:limit], jobs[limit - 1].id)
    if boundary is not None:
        return JobsPage(jobs, boundary, scan_ended=True)
    return JobsPage(jobs)
