"""The embedded SQLite ledger: WAL, one writer thread with group commit
(`sqlite_writer.py`), and the ledger's operations as SQL.

Durability follows the protocol's ordering rather than fsyncing every commit: WAL with
`synchronous=NORMAL` survives any crash of the process; against power loss, the claim's
row (`insert`) must be on disk before the claim rename, so a batch holding an insert
fsyncs the WAL before its callers resume. Later transitions follow durable filesystem
steps (the archive, the move to failed/) that recovery reconciles from, so they need no
fsync of their own.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from service.errors import LedgerUnavailable
from service.ledger.base import (
    COLUMNS,
    DELIVERY_COLUMNS,
    UNFINISHED,
    DeliveryRecord,
    JobRecord,
    OutboxRecord,
    check_fields,
    decode_history,
    encode_history,
)
from service.ledger.reach import Reachability, one_line
from service.ledger.sqlite_arrivals import SqliteArrivals
from service.ledger.sqlite_outbox import SqliteOutbox, insert_events
from service.ledger.sqlite_pages import SqlitePages
from service.ledger.sqlite_replicas import SqliteReplicas
from service.ledger.sqlite_writer import WriterThread

__all__ = ["SqliteLedger"]

_UNFINISHED = "(" + ", ".join(f"'{s}'" for s in UNFINISHED) + ")"
_OPEN_DELIVERIES = "('pending', 'delivering', 'waiting')"


def _row_to_record(row: sqlite3.Row) -> JobRecord:
    values = dict(zip(row.keys(), tuple(row), strict=True))
    values["history"] = decode_history(values["history"])
    values["name"] = bytes(values["name"])
    values["relative_path"] = bytes(values["relative_path"])
    return JobRecord(**values)


def _values(d: DeliveryRecord) -> list[Any]:
    return [getattr(d, c) for c in DELIVERY_COLUMNS]


def _record_values(record: JobRecord) -> list[Any]:
    values = [getattr(record, c) for c in COLUMNS]
    values[COLUMNS.index("history")] = encode_history(record.history)
    return values


def _delivery(row: sqlite3.Row) -> DeliveryRecord:
    values = dict(zip(row.keys(), tuple(row), strict=True))
    values["receipts"] = decode_history(values["receipts"])
    return DeliveryRecord(**values)


def _updates(changes: Sequence[tuple[str, Mapping[str, Any]]]) -> list[tuple[str, list[Any]]]:
    """Each job's UPDATE statement and its parameters."""
    statements = []
    for job_id, fields in changes:
        check_fields(fields)
        sql = f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?"
        statements.append((sql, [_encode(k, v) for k, v in fields.items()] + [job_id]))
    return statements


def _encode(column: str, value: Any) -> Any:
    return encode_history(value) if column == "history" else value


class SqliteLedger(SqliteOutbox, SqliteArrivals, SqliteReplicas, SqlitePages):
    """The ledger in one SQLite file, for a single replica on node-local storage."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self.reach = Reachability("not writable")
        self._writer = WriterThread(path, self.reach)

    async def open(self) -> None:
        try:
            await self._writer.open()
        except (sqlite3.OperationalError, OSError) as e:  # locked, read-only, no room
            raise LedgerUnavailable(one_line(e)) from e

    async def close(self) -> None:
        self._close_pages()
        await self._writer.close()

    # -- operations ----------------------------------------------------------------

    async def ping(self) -> None:
        """A real write (rolled into the batch's commit): a ledger that can no longer be
        written (disk full, read-only, immutable) fails here, not on the next claim.

        Permissions are checked when a file is opened, so the connection opened at start
        writes on after the file or its folder is made read-only; the next start could
        not open it, which is said here while it still can.
        """
        await self._writer.call(lambda c: c.execute("UPDATE filedock_schema SET version = version"))
        folder = self.path.parent
        if not (os.access(self.path, os.W_OK) and os.access(folder, os.W_OK | os.X_OK)):
            raise PermissionError(
                f"{self.path} or its folder is read-only for this user: written through the"
                " connection opened at start, it could not be opened again"
            )

    async def insert(self, records: Sequence[JobRecord]) -> None:
        if not records:
            return
        sql = f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        rows = [_record_values(r) for r in records]
        await self._writer.call(lambda c: c.executemany(sql, rows), durable=True)

    async def update(
        self,
        job_id: str,
        fields: Mapping[str, Any],
        *,
        expect_state: str | None = None,
        events: Sequence[OutboxRecord] = (),
    ) -> bool:
        ((sql, params),) = _updates([(job_id, fields)])
        if expect_state is not None:
            sql += " AND state = ?"
            params.append(expect_state)

        def op(c: sqlite3.Connection) -> int:
            changed: int = c.execute(sql, params).rowcount
            if changed:
                insert_events(c, events)
            return changed

        return bool(await self._writer.call(op))

    async def update_many(
        self,
        changes: Sequence[tuple[str, Mapping[str, Any]]],
        events: Sequence[OutboxRecord] = (),
    ) -> None:
        statements = _updates(changes)

        def op(c: sqlite3.Connection) -> None:
            for sql, params in statements:
                c.execute(sql, params)
            insert_events(c, events)

        if statements:
            await self._writer.call(op)

    async def delete(self, job_ids: Sequence[str]) -> None:
        ids = [(i,) for i in job_ids]

        def op(c: sqlite3.Connection) -> None:
            c.executemany("DELETE FROM deliveries WHERE job_id = ?", ids)
            c.executemany("DELETE FROM outbox WHERE job_id = ? AND state != 'pending'", ids)
            c.executemany("DELETE FROM jobs WHERE id = ?", ids)

        await self._writer.call(op)

    async def save_deliveries(
        self,
        deliveries: Sequence[DeliveryRecord],
        jobs: Sequence[tuple[str, Mapping[str, Any]]] = (),
        events: Sequence[OutboxRecord] = (),
    ) -> None:
        sql = (
            f"INSERT OR REPLACE INTO deliveries ({', '.join(DELIVERY_COLUMNS)})"
            f" VALUES ({', '.join('?' * len(DELIVERY_COLUMNS))})"
        )
        rows = [
            [
                encode_history(v) if c == "receipts" else v
                for c, v in zip(DELIVERY_COLUMNS, _values(d), strict=True)
            ]
            for d in deliveries
        ]
        statements = _updates(jobs)

        def op(c: sqlite3.Connection) -> None:
            c.executemany(sql, rows)
            for update, params in statements:
                c.execute(update, params)
            insert_events(c, events)

        await self._writer.call(op)

    async def deliveries(self, job_id: str) -> list[DeliveryRecord]:
        rows = await self._writer.call(
            lambda c: c.execute(
                "SELECT * FROM deliveries WHERE job_id = ? ORDER BY sink", (job_id,)
            ).fetchall()
        )
        return [_delivery(r) for r in rows]

    async def delivery_backlog(self) -> list[tuple[str, str, int, float | None]]:
        rows = await self._writer.call(
            lambda c: c.execute(
                "SELECT route, sink, count(*), min(created_at) FROM deliveries"
                f" WHERE state IN {_OPEN_DELIVERIES} GROUP BY route, sink"
            ).fetchall()
        )
        return [(r[0], r[1], int(r[2]), r[3]) for r in rows]

    async def get(self, job_id: str) -> JobRecord | None:
        row = await self._writer.call(
            lambda c: c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        )
        return _row_to_record(row) if row is not None else None

    async def query(
        self,
        *,
        states: Sequence[str] | None = None,
        route: str | None = None,
        limit: int | None = 100,
        oldest_first: bool = False,
    ) -> list[JobRecord]:
        where: list[str] = []
        params: list[Any] = []
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(states)
        if route is not None:
            where.append("route = ?")
            params.append(route)
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id " + ("ASC" if oldest_first else "DESC")
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        rows = await self._writer.call(lambda c: c.execute(sql, params).fetchall())
        return [_row_to_record(r) for r in rows]

    async def counts(self) -> dict[str, int]:
        rows = await self._writer.call(
            lambda c: c.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        )
        return {state: n for state, n in rows}

    async def take_due(self, now: float, limit: int, owner: str, lease_s: float) -> list[JobRecord]:
        def op(c: sqlite3.Connection) -> list[sqlite3.Row]:
            rows = c.execute(
                "SELECT * FROM jobs WHERE state IN ('waiting', 'delivering')"
                " AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
                (now, limit),
            ).fetchall()
            c.executemany(
                "UPDATE jobs SET state = CASE state WHEN 'waiting' THEN 'claimed' ELSE state END,"
                " next_attempt_at = CASE state WHEN 'waiting' THEN next_attempt_at END,"
                " owner = ?, lease_expires_at = ?, updated_at = ? WHERE id = ?",
                [(owner, now + lease_s, now, r["id"]) for r in rows],
            )
            return rows

        rows = await self._writer.call(op)
        records = [_row_to_record(r) for r in rows]
        for r in records:
            if r.state == "waiting":
                r.state = "claimed"
            else:
                r.next_attempt_at = None
            r.owner, r.lease_expires_at, r.updated_at = owner, now + lease_s, now
        return records

    async def take_orphans(
        self,
        now: float,
        owner: str,
        lease_s: float,
        *,
        gone: Sequence[str] = (),
        everyone: bool = False,
        leases: bool = True,
        mine: bool = False,
    ) -> list[JobRecord]:
        marks = ", ".join("?" * len(gone))

        def op(c: sqlite3.Connection) -> list[sqlite3.Row]:
            rows = c.execute(
                f"SELECT * FROM jobs WHERE state IN {_UNFINISHED} AND (? OR owner IS NOT ?)"
                f" AND (? OR owner IS NULL OR owner IN ({marks}) OR (? AND lease_expires_at < ?)"
                "      OR (? AND owner = ?))"
                " ORDER BY id",
                (mine, owner, everyone, *gone, leases, now, mine, owner),
            ).fetchall()
            c.executemany(
                "UPDATE jobs SET owner = ?, lease_expires_at = ? WHERE id = ?",
                [(owner, now + lease_s, r["id"]) for r in rows],
            )
            return rows

        records = [_row_to_record(r) for r in await self._writer.call(op)]
        for r in records:
            r.owner, r.lease_expires_at = owner, now + lease_s
        return records

    async def renew_leases(self, owner: str, until: float) -> None:
        await self._writer.call(
            lambda c: c.execute(
                f"UPDATE jobs SET lease_expires_at = ? WHERE owner = ? AND state IN {_UNFINISHED}",
                (until, owner),
            )
        )

    async def find_done_by_sha256(self, route: str, sha256: str, since: float) -> str | None:
        row = await self._writer.call(
            lambda c: c.execute(
                "SELECT id FROM jobs WHERE route = ? AND sha256 = ? AND state = 'done'"
                " AND outcome IS NOT 'duplicate' AND created_at >= ? ORDER BY id LIMIT 1",
                (route, sha256, since),
            ).fetchone()
        )
        return str(row[0]) if row is not None else None

    async def older_than(self, states: Sequence[str], before: float, limit: int) -> list[JobRecord]:
        marks = ", ".join("?" * len(states))
        rows = await self._writer.call(
            lambda c: c.execute(
                f"SELECT * FROM jobs WHERE state IN ({marks}) AND updated_at < ?"
                " ORDER BY updated_at, id LIMIT ?",
                (*states, before, limit),
            ).fetchall()
        )
        return [_row_to_record(r) for r in rows]
