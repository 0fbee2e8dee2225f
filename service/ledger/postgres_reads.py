"""The PostgreSQL ledger's reads: a job, its deliveries, lists and counts, and what the
reaper and the duplicate check look for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import sql
from psycopg.rows import DictRow

from service.ledger.base import DeliveryRecord, JobRecord
from service.ledger.postgres_outbox import PostgresAccess

__all__ = ["PostgresReads", "job_record"]


def job_record(row: DictRow) -> JobRecord:
    values = dict(row)
    values["name"] = bytes(values["name"])
    values["relative_path"] = bytes(values["relative_path"])
    values["history"] = list(values["history"] or [])
    return JobRecord(**values)


def _delivery(row: DictRow) -> DeliveryRecord:
    values = dict(row)
    values["receipts"] = list(values["receipts"] or [])
    return DeliveryRecord(**values)


class PostgresReads(PostgresAccess):
    """The read operations of `PostgresLedger` (a mixin)."""

    async def deliveries(self, job_id: str) -> list[DeliveryRecord]:
        rows = await self._fetch(
            "SELECT * FROM deliveries WHERE job_id = %s ORDER BY sink", (job_id,)
        )
        return [_delivery(r) for r in rows]

    async def delivery_backlog(self) -> list[tuple[str, str, int, float | None]]:
        rows = await self._fetch(
            "SELECT route, sink, count(*) AS n, min(created_at) AS oldest FROM deliveries"
            " WHERE state IN ('pending', 'delivering', 'waiting') GROUP BY route, sink"
        )
        return [(r["route"], r["sink"], int(r["n"]), r["oldest"]) for r in rows]

    async def get(self, job_id: str) -> JobRecord | None:
        rows = await self._fetch("SELECT * FROM jobs WHERE id = %s", (job_id,))
        return job_record(rows[0]) if rows else None

    async def query(
        self,
        *,
        states: Sequence[str] | None = None,
        route: str | None = None,
        limit: int | None = 100,
        oldest_first: bool = False,
    ) -> list[JobRecord]:
        where: list[sql.Composable] = []
        params: list[Any] = []
        if states:
            where.append(sql.SQL("state = ANY(%s)"))
            params.append(list(states))
        if route is not None:
            where.append(sql.SQL("route = %s"))
            params.append(route)
        query: sql.Composable = sql.SQL("SELECT * FROM jobs")
        if where:
            query += sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
        query += sql.SQL(" ORDER BY id ASC" if oldest_first else " ORDER BY id DESC")
        if limit is not None:
            query += sql.SQL(" LIMIT %s")
            params.append(limit)
        return [job_record(r) for r in await self._fetch(query, params)]

    async def counts(self) -> dict[str, int]:
        rows = await self._fetch("SELECT state, count(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: int(r["n"]) for r in rows}

    async def find_done_by_sha256(self, route: str, sha256: str, since: float) -> str | None:
        rows = await self._fetch(
            "SELECT id FROM jobs WHERE route = %s AND sha256 = %s AND state = 'done'"
            " AND outcome IS DISTINCT FROM 'duplicate' AND created_at >= %s"
            " ORDER BY id LIMIT 1",
            (route, sha256, float(since)),
        )
        return str(rows[0]["id"]) if rows else None

    async def older_than(self, states: Sequence[str], before: float, limit: int) -> list[JobRecord]:
        rows = await self._fetch(
            "SELECT * FROM jobs WHERE state = ANY(%s) AND updated_at < %s"
            " ORDER BY updated_at, id LIMIT %s",
            (list(states), float(before), limit),
        )
        return [job_record(r) for r in rows]
