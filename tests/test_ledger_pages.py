"""The operator page's ledger reads (service/ledger/pages.py and each backend's
`*_pages.py`), on both backends: keyset pages, filters, the scan bound, the overview,
a job with its sinks, failures by cause, and the schema step that adds their indexes."""

from __future__ import annotations

import doctest
from typing import Any

from conftest import OpenLedger
from test_ledger import NOW, event, job, raw_execute, sink_row

import service.ledger.pages
from service.ledger import Ledger
from service.ledger.base import SCHEMA_VERSION
from service.ledger.pages import JobsQuery, id_prefix, plan

PAGE_INDEXES = ("jobs_state_id", "jobs_route_id", "jobs_failed")


def at(n: int, **fields: Any) -> Any:
    """Job n, created n seconds after the first (ids sort as they were made)."""
    t = NOW - 10_000 + n
    stamp = id_prefix(t)
    fields.setdefault("created_at", t)
    fields.setdefault("updated_at", t)
    return job(n, id=f"{stamp}-{n:08x}", **fields)


async def all_pages(ledger: Ledger, query: JobsQuery) -> tuple[list[str], int]:
    """Every id the list gives, page after page, and how many pages it took."""
    ids: list[str] = []
    pages = 0
    before = None
    while True:
        page = await ledger.page_jobs(
            JobsQuery(**{**query.__dict__, "before": before})  # type: ignore[arg-type]
        )
        pages += 1
        ids += [j.id for j in page.jobs]
        if page.next_before is None:
            return ids, pages
        before = page.next_before
        assert pages < 1000


def test_the_docstring_examples_hold() -> None:
    assert doctest.testmod(service.ledger.pages).failed == 0


def test_the_plan_takes_the_index_that_serves_the_filters() -> None:
    assert plan(JobsQuery()).index == "id"
    assert plan(JobsQuery(state="failed")).index == "state"
    p = plan(JobsQuery(state="failed", route="orders", outcome="rejected"))
    assert (p.index, p.keyed, p.residual, p.bounded) == (
        "route",
        {"route": "orders"},
        {"state": "failed", "outcome": "rejected"},
        True,
    )
    p = plan(JobsQuery(state="failed", route="orders", error_class="rejected"))
    assert p.index == "failed" and not p.residual and not p.bounded
    assert plan(JobsQuery(sha256="ab" * 8, text=None)).index == "sha256"
    assert plan(JobsQuery(text="x")).bounded


async def test_pages_walk_every_job_newest_first_without_gaps(ledger: Ledger) -> None:
    await ledger.insert([at(n) for n in range(23)])
    ids, pages = await all_pages(ledger, JobsQuery(limit=5))
    assert ids == [at(n).id for n in reversed(range(23))] and pages == 5
    page = await ledger.page_jobs(JobsQuery(limit=5))
    assert page.jobs[0].history == [] and not page.scan_ended  # the list carries no history


async def test_filters_by_state_route_outcome_and_error_class(ledger: Ledger) -> None:
    rows = []
    for n in range(40):
        failed = n % 4 == 0
        rows.append(
            at(
                n,
                route="orders" if n % 2 else "stock",
                state="failed" if failed else "done",
                outcome=("rejected" if n % 8 == 0 else "exhausted") if failed else "imported",
                error_class=("rejected" if n % 8 == 0 else "exhausted") if failed else None,
            )
        )
    await ledger.insert(rows)

    def expect(**want: Any) -> list[str]:
        return [r.id for r in reversed(rows) if all(getattr(r, k) == v for k, v in want.items())]

    for query, want in [
        (JobsQuery(state="failed", limit=3), {"state": "failed"}),
        (JobsQuery(route="orders", limit=3), {"route": "orders"}),
        (JobsQuery(route="stock", state="failed", limit=3), {"route": "stock", "state": "failed"}),
        (JobsQuery(outcome="rejected", limit=3), {"outcome": "rejected"}),
        (
            JobsQuery(state="failed", route="stock", error_class="exhausted", limit=2),
            {"state": "failed", "route": "stock", "error_class": "exhausted"},
        ),
        (JobsQuery(state="importing"), {"state": "importing"}),
    ]:
        assert (await all_pages(ledger, query))[0] == expect(**want), query


async def test_text_search_is_case_blind_and_finds_bytes_that_are_not_utf8(
    ledger: Ledger,
) -> None:
    await ledger.insert(
        [
            at(1, relative_path=b"eu/Orders_2026.CSV", name=b"Orders_2026.CSV"),
            at(2, relative_path=b"us/orders_2027.csv", name=b"orders_2027.csv"),
            at(3, relative_path=b"caf\xc3\xa9/\xff\xfe-\nx.csv", name=b"\xff\xfe-\nx.csv"),
            at(4, relative_path=b"back\\slash.csv", name=b"back\\slash.csv"),
        ]
    )

    async def found(text: str) -> list[int]:
        page = await ledger.page_jobs(JobsQuery(text=text))
        return sorted(int(j.id[-8:], 16) for j in page.jobs)

    assert await found("orders_") == [1, 2]
    assert await found("EU/") == [1]
    assert await found("café/") == [3]
    assert await found("\n") == [3]
    assert await found("k\\s") == [4]
    assert await found("%") == [] and await found("_2027") == [2]


async def test_a_search_by_content_takes_a_sha256_prefix(ledger: Ledger) -> None:
    await ledger.insert(
        [
            at(1, sha256="ab" * 32, route="orders"),
            at(2, sha256="ab" * 31 + "cd", route="stock", state="failed"),
            at(3, sha256="cd" * 32, route="orders"),
        ]
    )
    page = await ledger.page_jobs(JobsQuery(sha256="abab"))
    assert [j.id for j in page.jobs] == [at(2).id, at(1).id]
    page = await ledger.page_jobs(JobsQuery(sha256="abab", state="failed"))
    assert [j.id for j in page.jobs] == [at(2).id]
    assert (await ledger.page_jobs(JobsQuery(sha256="ef"))).jobs == []


async def test_a_filter_no_index_serves_stops_at_the_scan_bound_and_goes_on(
    ledger: Ledger,
) -> None:
    rows = [at(n, relative_path=b"needle.csv" if n in (2, 30) else b"hay.csv") for n in range(50)]
    await ledger.insert(rows)
    first = await ledger.page_jobs(JobsQuery(text="needle", scan_rows=10, limit=5))
    assert first.jobs == [] and first.scan_ended and first.next_before == at(40).id
    ids, pages = await all_pages(ledger, JobsQuery(text="needle", scan_rows=10, limit=5))
    assert ids == [at(30).id, at(2).id] and pages == 5
    # A full page ends at the page, not at the bound.
    page = await ledger.page_jobs(JobsQuery(text="hay", scan_rows=10, limit=3))
    assert len(page.jobs) == 3 and not page.scan_ended and page.next_before == at(47).id


async def test_overview_counts_states_routes_sinks_and_the_outbox(ledger: Ledger) -> None:
    since = NOW - 10_000 + 10  # jobs 10 and later are in the window
    await ledger.insert(
        [
            at(1, route="orders", state="done", updated_at=NOW - 5000),  # before the window
            at(11, route="orders", state="done", updated_at=NOW - 100),
            at(12, route="orders", state="failed"),
            at(13, route="orders", state="waiting"),
            at(14, route="stock", state="failed"),
        ]
    )
    await ledger.save_deliveries(
        [
            sink_row(at(11).id, "lake", state="waiting", created_at=NOW - 70),
            sink_row(at(13).id, "lake", state="delivered", created_at=NOW - 90),
        ]
    )
    await ledger.update_many([(at(12).id, {"state": "failed"})], events=[event(1)])
    o = await ledger.page_overview(since)
    assert o.counts == {"done": 2, "failed": 2, "waiting": 1}
    by_route = {r.route: r for r in o.routes}
    orders = by_route["orders"]
    assert (orders.done, orders.failed, orders.unfinished) == (1, 1, 1)
    assert orders.last_done_at == NOW - 100 and orders.failure_ratio == 0.5
    assert orders.per_hour(3600) == 3
    assert (by_route["stock"].last_done_at, by_route["stock"].failure_ratio) == (None, 1.0)
    assert o.deliveries == [("orders", "lake", 1, NOW - 70)]
    assert [(channel, n) for channel, n, _ in o.outbox] == [(event(1).channel, 1)]


async def test_page_job_reads_a_job_and_its_sinks(ledger: Ledger) -> None:
    await ledger.insert([at(1, history=[{"n": 1, "result": "ok"}])])
    await ledger.save_deliveries([sink_row(at(1).id, "lake", receipts=[{"location": "x"}])])
    record, sinks = await ledger.page_job(at(1).id)
    assert record == at(1, history=[{"n": 1, "result": "ok"}])
    assert [(d.sink, d.receipts) for d in sinks] == [("lake", [{"location": "x"}])]
    assert await ledger.page_job("20990101T000000000Z-00000000") == (None, [])


async def test_failures_are_grouped_by_route_and_error_class_largest_first(
    ledger: Ledger,
) -> None:
    await ledger.insert(
        [
            *(at(n, state="failed", route="orders", error_class="rejected") for n in range(5)),
            *(at(n, state="failed", route="orders", error_class="timeout") for n in range(5, 7)),
            at(7, state="failed", route="stock", error_class=None, error="?"),
            at(8, state="done", route="stock", error_class="rejected"),
        ]
    )
    groups = await ledger.page_failures(per_group=3)
    assert [(g.route, g.error_class, g.count) for g in groups] == [
        ("orders", "rejected", 5),
        ("orders", "timeout", 2),
        ("stock", None, 1),
    ]
    assert [j.id for j in groups[0].jobs] == [at(4).id, at(3).id, at(2).id]
    assert groups[2].jobs[0].error == "?"


async def test_a_version_5_ledger_gains_the_page_indexes(
    open_ledger: OpenLedger, backend_url: str
) -> None:
    first = await open_ledger()
    await first.insert([at(1, state="failed", error_class="rejected")])
    await first.close()
    for index in PAGE_INDEXES:
        raw_execute(backend_url, f"DROP INDEX {index}")
    raw_execute(backend_url, "UPDATE filedock_schema SET version = 5")
    ledger = await open_ledger()
    assert raw_execute(backend_url, "SELECT version FROM filedock_schema") == [(SCHEMA_VERSION,)]
    if backend_url.startswith("sqlite"):
        names = "SELECT name FROM sqlite_master WHERE type = 'index'"
    else:
        names = "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
    assert set(PAGE_INDEXES) <= {row[0] for row in raw_execute(backend_url, names)}
    page = await ledger.page_jobs(JobsQuery(state="failed", route="orders", error_class="rejected"))
    assert [j.id for j in page.jobs] == [at(1).id]
