"""The operator page's read-only pages: the overview, the job list, a job, the failures.

A page's parameters are checked before the ledger sees them (a state is one of the
states, a cursor looks like a job id, …); a bad one gets a 400 page saying which.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any, Final, get_args
from urllib.parse import urlencode

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from service.face.ui.documents import read_document, timeline
from service.face.ui.snapshot import WINDOW_S, Overview
from service.ledger import STATES, Outcome
from service.ledger.pages import JOB_ID_RE, JobsQuery

if TYPE_CHECKING:
    from service.face.ui.site import OperatorPage

__all__ = ["ID_RE", "failures", "job", "jobs", "not_found", "overview"]

OUTCOMES: Final = get_args(Outcome)
# Any id the ledger may hold (recovery adopts folders named by hand, too).
ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}\Z")
_WORD_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z")
_SHA_RE: Final = re.compile(r"^(sha256:)?([0-9a-fA-F]{16,64})\Z")
_NOTICES: Final = {"queued": "Queued for a new attempt: it runs within seconds."}
PAGE_SIZES: Final = (25, 50, 100, 200)


class BadQuery(ValueError):
    """A page parameter that is not what it must be."""


async def overview(page: OperatorPage, request: Request) -> Response:
    snap = await page.snapshot.get()
    context = _overview_context(page, snap) if snap is not None else {}
    return page.render(
        request, "overview.html", title="Overview", nav="overview", snap=snap, **context
    )


def _overview_context(page: OperatorPage, snap: Overview) -> dict[str, Any]:
    s, led = page.settings, snap.ledger
    stats = {r.route: r for r in led.routes}
    routes = [
        {"name": r.name, "match": r.match, "stats": stats.get(r.name), "configured": True}
        for r in s.routes
    ]
    routes += [
        {"name": name, "match": None, "stats": st, "configured": False}
        for name, st in stats.items()
        if name not in {r.name for r in s.routes}
    ]
    open_deliveries = {(route, sink): (n, oldest) for route, sink, n, oldest in led.deliveries}
    sinks: list[dict[str, Any]] = []
    for r in s.routes:
        for sink in r.deliver:
            n, oldest = open_deliveries.pop((r.name, sink.name), (0, None))
            paused = page.metrics.registry.get_sample_value(
                "filedock_sink_paused", {"route": r.name, "sink": sink.name}
            )
            sinks.append(_sink_row(r.name, sink.name, sink.kind, n, oldest, bool(paused)))
    for (route, name), (n, oldest) in open_deliveries.items():
        sinks.append(_sink_row(route, name, None, n, oldest, False))
    pending = {channel: (n, oldest) for channel, n, oldest in led.outbox}
    channels: list[dict[str, Any]] = [
        {"name": c.name, "kind": c.kind, "pending": pending.pop(c.name, (0, None))}
        for c in s.notify
    ]
    channels += [{"name": n, "kind": None, "pending": v} for n, v in pending.items()]
    return {
        "states": [(state, led.counts.get(state, 0)) for state in STATES],
        "total": sum(led.counts.values()),
        "routes": routes,
        "window_h": WINDOW_S / 3600,
        "sinks": sinks,
        "channels": channels,
        "ready": page.metrics.registry.get_sample_value("filedock_ready"),
        "now": time.time(),
    }


def _sink_row(
    route: str, sink: str, kind: str | None, n: int, oldest: float | None, paused: bool
) -> dict[str, Any]:
    return {
        "route": route,
        "sink": sink,
        "kind": kind,
        "open": n,
        "oldest": oldest,
        "paused": paused,
    }


def _query(request: Request) -> tuple[JobsQuery, str]:
    """The list's filters from the query string, and the search text as given."""
    q = request.query_params

    def one(key: str, allowed: tuple[str, ...] | None = None) -> str | None:
        value = q.get(key) or None
        if value is None:
            return None
        if (allowed is not None and value not in allowed) or not _WORD_RE.match(value):
            raise BadQuery(f"{key}: not a known value")
        return value

    before = q.get("before") or None
    if before is not None and not ID_RE.match(before):
        raise BadQuery("before: not a job id")
    limit = q.get("limit", "50")
    if limit not in {str(n) for n in PAGE_SIZES}:
        raise BadQuery(f"limit: one of {', '.join(map(str, PAGE_SIZES))}")
    search = (q.get("q") or "").strip()
    if len(search) > 200:
        raise BadQuery("q: at most 200 characters")
    sha = _SHA_RE.match(search)
    query = JobsQuery(
        state=one("state", STATES),
        route=one("route"),
        outcome=one("outcome", OUTCOMES),
        error_class=one("error_class"),
        text=None if sha else search or None,
        sha256=sha.group(2).lower() if sha else None,
        before=before,
        limit=int(limit),
    )
    return query, search


async def jobs(page: OperatorPage, request: Request) -> Response:
    try:
        query, search = _query(request)
    except BadQuery as e:
        return page.message(request, 400, "Bad filter", str(e))
    if JOB_ID_RE.match(search):
        found, _ = await page.ledger.page_job(search)
        if found is not None:
            return RedirectResponse(f"/ui/jobs/{found.id}", 303)
    result = await page.ledger.page_jobs(query)
    filters = {
        "state": query.state,
        "route": query.route,
        "outcome": query.outcome,
        "error_class": query.error_class,
        "q": search or None,
        "limit": None if query.limit == 50 else query.limit,
    }
    shown = {k: v for k, v in filters.items() if v is not None}
    older = urlencode({**shown, "before": result.next_before}) if result.next_before else None
    known = {r.name for r in page.settings.routes}
    snap = page.snapshot.current
    if snap is not None:
        known |= {r.route for r in snap.ledger.routes}
    return page.render(
        request,
        "jobs.html",
        title="Jobs",
        nav="jobs",
        result=result,
        filters=filters,
        states=STATES,
        outcomes=OUTCOMES,
        routes=sorted(known),
        sizes=PAGE_SIZES,
        older=older,
        newest=urlencode(shown) if query.before else None,
        scan_rows=query.scan_rows,
        now=time.time(),
    )


async def job(page: OperatorPage, request: Request) -> Response:
    job_id = request.path_params["job_id"]
    record, deliveries = await page.ledger.page_job(job_id) if ID_RE.match(job_id) else (None, [])
    if record is None:
        return page.message(request, 404, "No such job", f"The ledger has no job {job_id}.")
    s = page.settings
    manifest, error = await anyio.to_thread.run_sync(
        lambda: (
            read_document(record.archive_path, s.folder("archive"), "manifest.json"),
            read_document(record.failed_path, s.folder("failed"), "error.json"),
        )
    )
    live = record.state not in ("done", "failed")
    # 286 tells htmx to stop refreshing a page that has ended (and still swaps it in).
    status = 286 if not live and "hx-request" in request.headers else 200
    delivery_failed = record.state == "failed" and record.error_class == "delivery_failed"
    retry_sinks = [d.sink for d in deliveries if delivery_failed and d.state != "delivered"]
    return page.render(
        request,
        "job.html",
        status,
        title=f"Job {record.id}",
        nav="jobs",
        job=record,
        deliveries=deliveries,
        steps=timeline(record, deliveries),
        documents=[d for d in (manifest, error) if d is not None],
        retry_sinks=retry_sinks,
        notice=_NOTICES.get(request.query_params.get("notice", "")),
        live=live,
        now=time.time(),
    )


async def failures(page: OperatorPage, request: Request) -> Response:
    groups = await page.ledger.page_failures(per_group=5)
    return page.render(
        request,
        "failures.html",
        title="Failures",
        nav="failures",
        groups=groups,
        total=sum(g.count for g in groups),
        now=time.time(),
    )


async def not_found(page: OperatorPage, request: Request) -> Response:
    return page.message(request, 404, "Not found", "There is no page here.")
