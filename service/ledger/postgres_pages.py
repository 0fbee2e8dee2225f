"""The PostgreSQL ledger's reads for the operator page, and the indexes they need.

Each page reads on one pooled connection in one read-only REPEATABLE READ
transaction, so it sees one consistent state. The planner picks the indexes itself
(it has statistics); what keeps a page cheap whatever it picks is that every list
query is bounded by an index range: the keyset (`id < before`), and for a filter no
index serves, a lower bound found by counting `scan_rows` index entries back.
"""

from __future__ import annotations

from typing import Any, Final

import psycopg
from psycopg.rows import DictRow, dict_row

from service.ledger.base import UNFINISHED, DeliveryRecord, JobRecord
from service.ledger.pages import (
    LIST_COLUMNS,
    ROUTES_SQL,
    FailureGroup,
    JobDetail,
    JobsPage,
    JobsQuery,
    LedgerOverview,
    RouteStats,
    escape_octets,
    id_prefix,
    page_of,
    plan,
)
from service.ledger.postgres_outbox import PostgresAccess

__all__ = ["PAGES_SCHEMA", "PostgresPages"]

# IF NOT EXISTS: on a large ledger the operator may build them beforehand with CREATE
# INDEX CONCURRENTLY (docs/operations.md), and the step then keeps them.
PAGES_SCHEMA: Final = (
    "CREATE INDEX IF NOT EXISTS jobs_state_id ON jobs (state, id)",
    "CREATE INDEX IF NOT EXISTS jobs_route_id ON jobs (route, id, state)",
    "CREATE INDEX IF NOT EXISTS jobs_failed ON jobs (route, error_class, id)"
    " WHERE state = 'failed'",
)
_FAILED_GROUP: Final = (
    f"SELECT {LIST_COLUMNS} FROM jobs WHERE state = 'failed' AND route = %s AND {{}}"
    " ORDER BY id DESC LIMIT %s"
)

Cursor = psycopg.AsyncCursor[DictRow]


def _job(row: DictRow) -> JobRecord:
    values = dict(row)
    values["name"] = bytes(values["name"])
    values["relative_path"] = bytes(values["relative_path"])
    if "history" in values:
        values["history"] = list(values["history"] or [])
    return JobRecord(**values)


class PostgresPages(PostgresAccess):
    """The operator page's reads of `PostgresLedger` (a mixin)."""

    async def _snapshot(self, read: Any) -> Any:
        async with self._connection() as conn, conn.transaction():
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                return await read(cur)

    async def page_overview(self, since: float) -> LedgerOverview:
        floor = id_prefix(since)

        async def read(cur: Cursor) -> LedgerOverview:
            await cur.execute("SELECT state, count(*) AS n FROM jobs GROUP BY state")
            counts = {r["state"]: int(r["n"]) for r in await cur.fetchall()}
            await cur.execute(ROUTES_SQL)
            routes = [r["route"] for r in await cur.fetchall()]
            stats = [await _route_stats(cur, route, floor) for route in routes]
            await cur.execute(
                "SELECT route, sink, count(*) AS n, min(created_at) AS oldest FROM deliveries"
                " WHERE state IN ('pending', 'delivering', 'waiting') GROUP BY route, sink"
            )
            deliveries = [
                (r["route"], r["sink"], int(r["n"]), r["oldest"]) for r in await cur.fetchall()
            ]
            await cur.execute(
                "SELECT channel, count(*) AS n, min(created_at) AS oldest FROM outbox"
                " WHERE state = 'pending' GROUP BY channel"
            )
            outbox = [(r["channel"], int(r["n"]), r["oldest"]) for r in await cur.fetchall()]
            return LedgerOverview(counts, stats, deliveries, outbox)

        overview: LedgerOverview = await self._snapshot(read)
        return overview

    async def page_jobs(self, query: JobsQuery) -> JobsPage:
        page: JobsPage = await self._snapshot(lambda cur: _jobs(cur, query))
        return page

    async def page_job(self, job_id: str) -> JobDetail:
        async def read(cur: Cursor) -> JobDetail:
            await cur.execute("SELECT * FROM jobs WHERE id = %s", (job_id,))
            row = await cur.fetchone()
            if row is None:
                return None, []
            await cur.execute("SELECT * FROM deliveries WHERE job_id = %s ORDER BY sink", (job_id,))
            deliveries = []
            for d in await cur.fetchall():
                values = dict(d)
                values["receipts"] = list(values["receipts"] or [])
                deliveries.append(DeliveryRecord(**values))
            return _job(row), deliveries

        detail: JobDetail = await self._snapshot(read)
        return detail

    async def page_failures(self, per_group: int) -> list[FailureGroup]:
        async def read(cur: Cursor) -> list[FailureGroup]:
            await cur.execute(
                "SELECT route, error_class, count(*) AS n FROM jobs WHERE state = 'failed'"
                " GROUP BY route, error_class ORDER BY n DESC, route, error_class LIMIT 500"
            )
            groups = await cur.fetchall()
            out = []
            for g in groups:
                if g["error_class"] is None:
                    query = _FAILED_GROUP.format("error_class IS NULL")
                    params: tuple[Any, ...] = (g["route"], per_group)
                else:
                    query = _FAILED_GROUP.format("error_class = %s")
                    params = (g["route"], g["error_class"], per_group)
                await cur.execute(query, params)
                jobs = [_job(r) for r in await cur.fetchall()]
                out.append(FailureGroup(g["route"], g["error_class"], int(g["n"]), jobs))
            return out

        failures: list[FailureGroup] = await self._snapshot(read)
        return failures


async def _route_stats(cur: Cursor, route: str, floor: str) -> RouteStats:
    await cur.execute(
        "SELECT state, count(*) AS n FROM jobs WHERE route = %s AND id >= %s GROUP BY state",
        (route, floor),
    )
    by_state = {r["state"]: int(r["n"]) for r in await cur.fetchall()}
    await cur.execute(
        "SELECT updated_at FROM jobs WHERE route = %s AND state = 'done' ORDER BY id DESC LIMIT 1",
        (route,),
    )
    last = await cur.fetchone()
    return RouteStats(
        route,
        done=by_state.get("done", 0),
        failed=by_state.get("failed", 0),
        unfinished=sum(by_state.get(s, 0) for s in UNFINISHED),
        last_done_at=last["updated_at"] if last else None,
    )


async def _jobs(cur: Cursor, q: JobsQuery) -> JobsPage:
    """The plan's index range (keyset, and with residual filters a bound `scan_rows`
    entries back, as on SQLite), then the residual filters row by row."""
    p = plan(q)
    where = [_equals(c, v, "%s") for c, v in p.keyed.items()]
    params: list[Any] = [v for c, v in p.keyed.items() if "?" in _equals(c, v, "?")]
    if q.sha256:
        await cur.execute(ROUTES_SQL)
        where.append("route = ANY(%s) AND sha256 >= %s AND sha256 < %s")
        params.extend([[r["route"] for r in await cur.fetchall()], q.sha256, q.sha256 + "g"])
    if q.before is not None:
        where.append("id < %s")
        params.append(q.before)
    residual = [f"{column} = %s" for column in p.residual]
    extra: list[Any] = list(p.residual.values())
    if p.text:
        residual.append("strpos(lower(encode(relative_path, 'escape')), %s) > 0")
        extra.append(escape_octets(p.text.encode()))
    boundary = None
    if p.bounded:
        # The entry `scan_rows` back, when one older follows it (else the scan ends there).
        await cur.execute(
            f"SELECT id FROM jobs WHERE {' AND '.join(where) or 'true'}"
            " ORDER BY id DESC OFFSET %s LIMIT 2",
            (*params, q.scan_rows - 1),
        )
        edge = await cur.fetchall()
        if len(edge) == 2:
            boundary = edge[0]["id"]
            where.append("id >= %s")
            params.append(boundary)
    await cur.execute(
        f"SELECT {LIST_COLUMNS} FROM jobs WHERE {' AND '.join(where + residual) or 'true'}"
        " ORDER BY id DESC LIMIT %s",
        (*params, *extra, q.limit + 1),
    )
    return page_of([_job(r) for r in await cur.fetchall()], q.limit, boundary)


def _equals(column: str, value: str, mark: str) -> str:
    """`column = <mark>`, but the failed state as a literal: the partial index's own
    condition, which the query must state for it to be used."""
    return "state = 'failed'" if (column, value) == ("state", "failed") else f"{column} = {mark}"
