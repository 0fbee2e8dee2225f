"""The SQLite ledger's outbox: events written in the transaction of the state change
that causes them (`insert_events`, called inside the ledger's own operations), and
what the dispatcher asks of them."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

import orjson

from service.ledger.base import OUTBOX_COLUMNS, OutboxRecord
from service.ledger.sqlite_writer import WriterThread

__all__ = ["SqliteOutbox", "insert_events"]

_INSERT = (
    f"INSERT OR IGNORE INTO outbox ({', '.join(OUTBOX_COLUMNS)})"
    f" VALUES ({', '.join('?' * len(OUTBOX_COLUMNS))})"
)


def insert_events(c: sqlite3.Connection, events: Sequence[OutboxRecord]) -> None:
    """Within the caller's transaction: an event already there (by id and channel) is
    kept as it is, so writing a transition again never sends it twice."""
    if events:
        c.executemany(_INSERT, [_values(e) for e in events])


def _values(e: OutboxRecord) -> list[Any]:
    return [_encode(e.payload) if c == "payload" else getattr(e, c) for c in OUTBOX_COLUMNS]


def _encode(payload: dict[str, Any]) -> str:
    """Compact JSON, by orjson (a tenth of the standard encoder's time, and an event is
    written for every job); what orjson refuses (an integer beyond 64 bits in an
    importer's detail) by the standard encoder."""
    try:
        return orjson.dumps(payload).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(payload, separators=(",", ":"))


def _record(row: sqlite3.Row) -> OutboxRecord:
    values = dict(zip(row.keys(), tuple(row), strict=True))
    values["payload"] = json.loads(values["payload"])
    return OutboxRecord(**values)


class SqliteOutbox:
    """The outbox operations of `SqliteLedger` (a mixin: it needs `_writer`)."""

    _writer: WriterThread

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
        where = "state = 'pending' AND (owner IS NULL OR owner = ? OR lease_expires_at < ?)"
        params: list[Any] = [owner, now]
        if due_only:
            where += " AND next_attempt_at <= ?"
            params.append(now)
        if channel is not None:
            where += " AND channel = ?"
            params.append(channel)

        def op(c: sqlite3.Connection) -> list[sqlite3.Row]:
            rows = c.execute(
                f"SELECT * FROM outbox WHERE {where} ORDER BY created_at LIMIT ?",
                (*params, limit),
            ).fetchall()
            c.executemany(
                "UPDATE outbox SET owner = ?, lease_expires_at = ?"
                " WHERE event_id = ? AND channel = ?",
                [(owner, now + lease_s, r["event_id"], r["channel"]) for r in rows],
            )
            return rows

        records = [_record(r) for r in await self._writer.call(op)]
        for r in records:
            r.owner, r.lease_expires_at = owner, now + lease_s
        return records

    async def release_outbox(
        self, owner: str, *, gone: Sequence[str] = (), everyone: bool = False
    ) -> int:
        marks = ", ".join("?" * len(gone))
        count: int = await self._writer.call(
            lambda c: (
                c.execute(
                    "UPDATE outbox SET owner = NULL, lease_expires_at = NULL"
                    " WHERE state = 'pending' AND owner IS NOT NULL AND owner != ?"
                    f" AND (? OR owner IN ({marks}))",
                    (owner, everyone, *gone),
                ).rowcount
            )
        )
        return count

    async def outbox_done(self, records: Sequence[OutboxRecord]) -> None:
        rows = [
            (r.state, r.attempts, r.next_attempt_at, r.error, r.sent_at, r.event_id, r.channel)
            for r in records
        ]
        await self._writer.call(
            lambda c: c.executemany(
                "UPDATE outbox SET state = ?, attempts = ?, next_attempt_at = ?, error = ?,"
                " sent_at = ?, owner = NULL, lease_expires_at = NULL"
                " WHERE event_id = ? AND channel = ?",
                rows,
            )
        )

    async def outbox_backlog(self) -> list[tuple[str, int, float | None]]:
        rows = await self._writer.call(
            lambda c: c.execute(
                "SELECT channel, count(*), min(created_at) FROM outbox"
                " WHERE state = 'pending' GROUP BY channel"
            ).fetchall()
        )
        return [(r[0], int(r[1]), r[2]) for r in rows]

    async def outbox_query(self, *, pending_only: bool, limit: int) -> list[OutboxRecord]:
        where = " WHERE state = 'pending'" if pending_only else ""
        rows = await self._writer.call(
            lambda c: c.execute(
                f"SELECT * FROM outbox{where} ORDER BY created_at DESC, event_id LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [_record(r) for r in rows]

    async def prune_outbox(self, before: float, limit: int) -> int:
        count: int = await self._writer.call(
            lambda c: (
                c.execute(
                    "DELETE FROM outbox WHERE rowid IN (SELECT rowid FROM outbox"
                    " WHERE state != 'pending' AND created_at < ? LIMIT ?)",
                    (before, limit),
                ).rowcount
            )
        )
        return count
