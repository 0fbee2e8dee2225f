"""The SQLite ledger's reads for the operator page, on a connection of their own.

The writer thread runs every operation inside its group commit: a page that counted
a million rows there would hold every claim back as long. These reads run on a
second connection in a worker thread instead (WAL lets it read while the writer
writes), each page in one read transaction, so it sees one consistent state. Each
query names its index (`INDEXED BY`): SQLite keeps no statistics here, and a guess
that sorts a million rows would cost seconds. The indexes are in `sqlite_writer.py`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio
import anyio.to_thread

from service.ledger.base import UNFINISHED, DeliveryRecord, JobRecord, decode_history
from service.ledger.pages import (
    LIST_COLUMNS,
    ROUTES_SQL,
    FailureGroup,
    JobDetail,
    JobsPage,
    JobsQuery,
    LedgerOverview,
    RouteStats,
    id_prefix,
    page_of,
    plan,
)

__all__ = ["SqlitePages"]

T = TypeVar("T")


def _job(row: sqlite3.Row) -> JobRecord:
    values = dict(zip(row.keys(), tuple(row), strict=True))
    values["name"] = bytes(values["name"])
    values["relative_path"] = bytes(values["relative_path"])
    if "history" in values:
        values["history"] = decode_history(values["history"])
    return JobRecord(**values)


class _Reader:
    """Read-only connections, each used by one worker thread at a time: two, so that a
    page never waits behind the overview's slower gathering."""

    def __init__(self, path: Path, size: int = 2) -> None:
        self.path = path
        self.size = size
        self._idle: list[sqlite3.Connection] = []
        self._limiter: anyio.CapacityLimiter | None = None

    async def read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.size)
        return await anyio.to_thread.run_sync(self._run, op, limiter=self._limiter)

    def _run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA query_only=1")
        try:
            conn.execute("BEGIN")
            try:
                return op(conn)
            finally:
                conn.execute("COMMIT")
        finally:
            self._idle.append(conn)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


class SqlitePages:
    """The operator page's reads of `SqliteLedger` (a mixin: it needs `path`)."""

    path: Path
    _pages: _Reader | None = None

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._pages is None:
            self._pages = _Reader(self.path)
        return await self._pages.read(op)

    def _close_pages(self) -> None:
        if self._pages is not None:
            self._pages.close()

    async def page_overview(self, since: float) -> LedgerOverview:
        floor = id_prefix(since)

        def op(c: sqlite3.Connection) -> LedgerOverview:
            counts = {s: n for s, n in c.execute("SELECT state, count(*) FROM jobs GROUP BY state")}
            names = c.execute(ROUTES_SQL).fetchall()
            routes = [_route_stats(c, route, floor) for (route,) in names]
            deliveries = c.execute(
                "SELECT route, sink, count(*), min(created_at) FROM deliveries"
                " WHERE state IN ('pending', 'delivering', 'waiting') GROUP BY route, sink"
            ).fetchall()
            outbox = c.execute(
                "SELECT channel, count(*), min(created_at) FROM outbox"
                " WHERE state = 'pending' GROUP BY channel"
            ).fetchall()
            return LedgerOverview(
                counts,
                routes,
                [(r[0], r[1], int(r[2]), r[3]) for r in deliveries],
                [(r[0], int(r[1]), r[2]) for r in outbox],
            )

        return await self._read(op)

    async def page_jobs(self, query: JobsQuery) -> JobsPage:
        return await self._read(lambda c: _jobs(c, query))

    async def page_job(self, job_id: str) -> JobDetail:
        def op(c: sqlite3.Connection) -> JobDetail:
            row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None, []
            sinks = c.execute("SELECT * FROM deliveries WHERE job_id = ? ORDER BY sink", (job_id,))
            deliveries = []
            for d in sinks.fetchall():
                values = dict(zip(d.keys(), tuple(d), strict=True))
                values["receipts"] = decode_history(values["receipts"])
                deliveries.append(DeliveryRecord(**values))
            return _job(row), deliveries

        return await self._read(op)

    async def page_failures(self, per_group: int) -> list[FailureGroup]:
        def op(c: sqlite3.Connection) -> list[FailureGroup]:
            groups = c.execute(
                "SELECT route, error_class, count(*) AS n FROM jobs INDEXED BY jobs_failed"
                " WHERE state = 'failed' GROUP BY route, error_class ORDER BY n DESC LIMIT 500"
            ).fetchall()
            out = []
            for route, error_class, n in groups:
                rows = c.execute(
                    f"SELECT {LIST_COLUMNS} FROM jobs INDEXED BY jobs_failed WHERE state = 'failed'"
                    " AND route = ? AND error_class IS ? ORDER BY id DESC LIMIT ?",
                    (route, error_class, per_group),
                ).fetchall()
                out.append(FailureGroup(route, error_class, int(n), [_job(r) for r in rows]))
            return out

        return await self._read(op)


def _route_stats(c: sqlite3.Connection, route: str, floor: str) -> RouteStats:
    by_state = dict(
        c.execute(
            "SELECT state, count(*) FROM jobs INDEXED BY jobs_route_id"
            " WHERE route = ? AND id >= ? GROUP BY state",
            (route, floor),
        ).fetchall()
    )
    last = c.execute(
        "SELECT updated_at FROM jobs WHERE id = (SELECT id FROM jobs INDEXED BY jobs_route_id"
        " WHERE route = ? AND state = 'done' ORDER BY id DESC LIMIT 1)",
        (route,),
    ).fetchone()
    return RouteStats(
        route,
        done=by_state.get("done", 0),
        failed=by_state.get("failed", 0),
        unfinished=sum(by_state.get(s, 0) for s in UNFINISHED),
        last_done_at=last[0] if last else None,
    )


_INDEXES: Final = {
    "id": "sqlite_autoindex_jobs_1",
    "state": "jobs_state_id",
    "route": "jobs_route_id",
    "failed": "jobs_failed",
    "sha256": "jobs_route_sha",
}


def _jobs(c: sqlite3.Connection, q: JobsQuery) -> JobsPage:
    """The plan's index range (keyset, and with residual filters a bound `scan_rows`
    entries back), then the residual filters row by row."""
    p = plan(q)
    index = _INDEXES[p.index]
    where = [_equals(c, v, "?") for c, v in p.keyed.items()]
    params: list[Any] = [v for c, v in p.keyed.items() if "?" in _equals(c, v, "?")]
    if q.sha256:
        routes = [r for (r,) in c.execute(ROUTES_SQL).fetchall()]
        where.append(f"route IN ({', '.join('?' * len(routes))}) AND sha256 >= ? AND sha256 < ?")
        params.extend([*routes, q.sha256, q.sha256 + "g"])
    if q.before is not None:
        where.append("id < ?")
        params.append(q.before)
    residual = [f"{column} = ?" for column in p.residual]
    extra: list[Any] = list(p.residual.values())
    if p.text:
        residual.append("instr(lower(CAST(relative_path AS TEXT)), ?) > 0")
        extra.append(p.text.encode().lower().decode("utf-8", "replace"))
    boundary = None
    if p.bounded:
        # The entry `scan_rows` back, when one older follows it (else the scan ends there).
        edge = c.execute(
            f"SELECT id FROM jobs INDEXED BY {index} WHERE {' AND '.join(where) or 'true'}"
            " ORDER BY id DESC LIMIT 2 OFFSET ?",
            (*params, q.scan_rows - 1),
        ).fetchall()
        if len(edge) == 2:
            boundary = edge[0][0]
            where.append("id >= ?")
            params.append(boundary)
    rows = c.execute(
        f"SELECT {LIST_COLUMNS} FROM jobs INDEXED BY {index}"
        f" WHERE {' AND '.join(where + residual) or 'true'} ORDER BY id DESC LIMIT ?",
        (*params, *extra, q.limit + 1),
    ).fetchall()
    return page_of([_job(r) for r in rows], q.limit, boundary)


def _equals(column: str, value: str, mark: str) -> str:
    """`column = <mark>`, but the failed state as a literal: the partial index's own
    condition, which the query must state for it to be used."""
    return "state = 'failed'" if (column, value) == ("state", "failed") else f"{column} = {mark}"
