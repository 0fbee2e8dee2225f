"""The PostgreSQL ledger's arrival windows: what an expectation counts (`arrivals`)
and the windows judged, each written once with its events (so that of several
replicas judging the same window, one writes it and sends its events)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from psycopg import sql

from service.ledger.base import WINDOW_COLUMNS, Arrival, OutboxRecord, WindowRecord
from service.ledger.postgres_outbox import PostgresAccess, insert_events

__all__ = ["WINDOWS_SCHEMA", "PostgresArrivals"]

WINDOWS_SCHEMA: Final = (
    """CREATE TABLE arrival_windows (
        route text NOT NULL,
        expectation text NOT NULL,
        deadline double precision NOT NULL,
        start double precision NOT NULL,
        judgement text NOT NULL,
        files integer NOT NULL DEFAULT 0,
        failed integer NOT NULL DEFAULT 0,
        until double precision NOT NULL,
        judged_at double precision NOT NULL,
        judged_by text,
        PRIMARY KEY (route, expectation, deadline)
    )""",
    "CREATE INDEX jobs_route_detected ON jobs (route, detected_at)",
)
_INSERT: Final = sql.SQL(
    "INSERT INTO arrival_windows ({}) VALUES ({}) ON CONFLICT DO NOTHING"
).format(
    sql.SQL(", ").join(map(sql.Identifier, WINDOW_COLUMNS)),
    sql.SQL(", ").join(sql.Placeholder() * len(WINDOW_COLUMNS)),
)


class PostgresArrivals(PostgresAccess):
    """The arrival operations of `PostgresLedger` (a mixin)."""

    async def arrivals(self, route: str, after: float, until: float) -> list[Arrival]:
        rows = await self._fetch(
            "SELECT id, relative_path, detected_at, state FROM jobs"
            " WHERE route = %s AND detected_at > %s AND detected_at <= %s"
            " ORDER BY detected_at, id",
            (route, float(after), float(until)),
        )
        return [
            Arrival(r["id"], bytes(r["relative_path"]), r["detected_at"], r["state"]) for r in rows
        ]

    async def record_window(
        self, window: WindowRecord, events: Sequence[OutboxRecord] = ()
    ) -> bool:
        values = [getattr(window, c) for c in WINDOW_COLUMNS]
        async with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute(_INSERT, values)
            if cur.rowcount != 1:
                return False
            await insert_events(cur, events)
            return True

    async def windows(self, route: str, expectation: str, limit: int) -> list[WindowRecord]:
        rows = await self._fetch(
            "SELECT * FROM arrival_windows WHERE route = %s AND expectation = %s"
            " ORDER BY deadline DESC LIMIT %s",
            (route, expectation, limit),
        )
        return [WindowRecord(**r) for r in rows]

    async def prune_windows(self, before: float, limit: int) -> int:
        return await self._execute(
            """DELETE FROM arrival_windows WHERE ctid IN (
                   SELECT w.ctid FROM arrival_windows w
                   WHERE w.judged_at < %s AND EXISTS (
                       SELECT 1 FROM arrival_windows n
                       WHERE n.route = w.route AND n.expectation = w.expectation
                         AND n.deadline > w.deadline)
                   LIMIT %s)""",
            (float(before), limit),
        )
