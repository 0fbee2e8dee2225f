"""The SQLite ledger's arrival windows: what an expectation counts (`arrivals`) and
the windows judged, each written once with its events."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from service.ledger.base import WINDOW_COLUMNS, Arrival, OutboxRecord, WindowRecord
from service.ledger.sqlite_outbox import insert_events
from service.ledger.sqlite_writer import WriterThread

__all__ = ["SqliteArrivals"]

_INSERT = (
    f"INSERT OR IGNORE INTO arrival_windows ({', '.join(WINDOW_COLUMNS)})"
    f" VALUES ({', '.join('?' * len(WINDOW_COLUMNS))})"
)


class SqliteArrivals:
    """The arrival operations of `SqliteLedger` (a mixin: it needs `_writer`)."""

    _writer: WriterThread

    async def arrivals(self, route: str, after: float, until: float) -> list[Arrival]:
        rows = await self._writer.call(
            lambda c: c.execute(
                "SELECT id, relative_path, detected_at, state FROM jobs"
                " WHERE route = ? AND detected_at > ? AND detected_at <= ?"
                " ORDER BY detected_at, id",
                (route, after, until),
            ).fetchall()
        )
        return [Arrival(r[0], bytes(r[1]), r[2], r[3]) for r in rows]

    async def record_window(
        self, window: WindowRecord, events: Sequence[OutboxRecord] = ()
    ) -> bool:
        values = [getattr(window, c) for c in WINDOW_COLUMNS]

        def op(c: sqlite3.Connection) -> bool:
            if c.execute(_INSERT, values).rowcount != 1:
                return False
            insert_events(c, events)
            return True

        return bool(await self._writer.call(op))

    async def windows(self, route: str, expectation: str, limit: int) -> list[WindowRecord]:
        rows = await self._writer.call(
            lambda c: c.execute(
                "SELECT * FROM arrival_windows WHERE route = ? AND expectation = ?"
                " ORDER BY deadline DESC LIMIT ?",
                (route, expectation, limit),
            ).fetchall()
        )
        return [WindowRecord(**dict(zip(r.keys(), tuple(r), strict=True))) for r in rows]

    async def prune_windows(self, before: float, limit: int) -> int:
        return int(
            await self._writer.call(
                lambda c: (
                    c.execute(
                        """DELETE FROM arrival_windows WHERE rowid IN (
                           SELECT w.rowid FROM arrival_windows w
                           WHERE w.judged_at < ? AND EXISTS (
                               SELECT 1 FROM arrival_windows n
                               WHERE n.route = w.route AND n.expectation = w.expectation
                                 AND n.deadline > w.deadline)
                           LIMIT ?)""",
                        (before, limit),
                    ).rowcount
                )
            )
        )
