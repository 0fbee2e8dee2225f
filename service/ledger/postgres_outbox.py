"""The PostgreSQL ledger's outbox: events written in the transaction of the state change
that causes them (`insert_events`, inside the ledger's own transactions), and what the
dispatcher asks of them. Replicas take pending events with `FOR UPDATE SKIP LOCKED`
and a lease, so each event goes to one of them at a time."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from service.ledger.base import OUTBOX_COLUMNS, OutboxRecord

__all__ = ["OUTBOX_SCHEMA", "PostgresAccess", "PostgresOutbox", "insert_events"]

OUTBOX_SCHEMA: Final = (
    """CREATE TABLE outbox (
        event_id text NOT NULL,
        channel text NOT NULL,
        type text NOT NULL,
        route text NOT NULL,
        job_id text NOT NULL,
        payload jsonb NOT NULL,
        state text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at double precision NOT NULL,
        error text,
        created_at double precision NOT NULL,
        sent_at double precision,
        owner text,
        lease_expires_at double precision,
        PRIMARY KEY (event_id, channel)
    )""",
    "CREATE INDEX outbox_pending ON outbox (state, next_attempt_at)",
)
_INSERT: Final = sql.SQL("INSERT INTO outbox ({}) VALUES ({}) ON CONFLICT DO NOTHING").format(
    sql.SQL(", ").join(map(sql.Identifier, OUTBOX_COLUMNS)),
    sql.SQL(", ").join(sql.Placeholder() * len(OUTBOX_COLUMNS)),
)


async def insert_events(cur: psycopg.AsyncCursor[Any], events: Sequence[OutboxRecord]) -> None:
    """Within the caller's transaction: an event already there (by id and channel) is
    kept as it is."""
    if events:
        await cur.executemany(_INSERT, [_values(e) for e in events])


def _values(e: OutboxRecord) -> list[Any]:
    return [Jsonb(e.payload) if c == "payload" else getattr(e, c) for c in OUTBOX_COLUMNS]


def _record(row: DictRow) -> OutboxRecord:
    values = dict(row)
    values["payload"] = dict(values["payload"])
    return OutboxRecord(**values)


class PostgresAccess:
    """What the mixins of `PostgresLedger` need of it."""

    async def _fetch(self, query: Any, params: Any = None) -> list[DictRow]:
        raise NotImplementedError

    async def _execute(self, query: Any, params: Any = None) -> int:
        raise NotImplementedError

    def _connection(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        raise NotImplementedError


class PostgresOutbox(PostgresAccess):
    """The outbox operations of `PostgresLedger` (a mixin)."""

    async def take_outbox(
        self,
        now: float,
        owner: str,
        lease_s: float,
        *,
        limit: int,
        channel: str | None = None,
        due_only: bool = True,
    ) -> list[OutboxRecord]:
        rows = await self._fetch(
            """UPDATE outbox SET owner = %(owner)s, lease_expires_at = %(until)s
               FROM (SELECT event_id, channel FROM outbox
                     WHERE state = 'pending'
                       AND (owner IS NULL OR owner = %(owner)s OR lease_expires_at < %(now)s)
                       AND (NOT %(due_only)s OR next_attempt_at <= %(now)s)
                       AND (%(channel)s::text IS NULL OR channel = %(channel)s)
                     ORDER BY created_at LIMIT %(limit)s
                     FOR UPDATE SKIP LOCKED) AS taken
               WHERE outbox.event_id = taken.event_id AND outbox.channel = taken.channel
               RETURNING outbox.*""",
            {
                "owner": owner,
                "until": float(now + lease_s),
                "now": float(now),
                "due_only": due_only,
                "channel": channel,
                "limit": limit,
            },
        )
        return sorted((_record(r) for r in rows), key=lambda r: (r.created_at, r.event_id))

    async def release_outbox(
        self, owner: str, *, gone: Sequence[str] = (), everyone: bool = False
    ) -> int:
        return await self._execute(
            """UPDATE outbox SET owner = NULL, lease_expires_at = NULL
               WHERE state = 'pending' AND owner IS NOT NULL AND owner != %s
                 AND (%s OR owner = ANY(%s))""",
            (owner, everyone, list(gone)),
        )

    async def outbox_done(self, records: Sequence[OutboxRecord]) -> None:
        if not records:
            return
        async with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.executemany(
                "UPDATE outbox SET state = %s, attempts = %s, next_attempt_at = %s, error = %s,"
                " sent_at = %s, owner = NULL, lease_expires_at = NULL"
                " WHERE event_id = %s AND channel = %s",
                [
                    (
                        r.state,
                        r.attempts,
                        float(r.next_attempt_at),
                        r.error,
                        r.sent_at,
                        r.event_id,
                        r.channel,
                    )
                    for r in sorted(records, key=lambda r: (r.event_id, r.channel))
                ],
            )

    async def outbox_backlog(self) -> list[tuple[str, int, float | None]]:
        rows = await self._fetch(
            "SELECT channel, count(*) AS n, min(created_at) AS oldest FROM outbox"
            " WHERE state = 'pending' GROUP BY channel"
        )
        return [(r["channel"], int(r["n"]), r["oldest"]) for r in rows]

    async def outbox_query(self, *, pending_only: bool, limit: int) -> list[OutboxRecord]:
        where = " WHERE state = 'pending'" if pending_only else ""
        rows = await self._fetch(
            f"SELECT * FROM outbox{where} ORDER BY created_at DESC, event_id LIMIT %s", (limit,)
        )
        return [_record(r) for r in rows]

    async def prune_outbox(self, before: float, limit: int) -> int:
        return await self._execute(
            """DELETE FROM outbox WHERE (event_id, channel) IN (
                   SELECT event_id, channel FROM outbox
                   WHERE state != 'pending' AND created_at < %s LIMIT %s)""",
            (float(before), limit),
        )
