"""The SQLite ledger's replicas table: each start of the service registers an instance,
heartbeats it, and marks it stopped; `filedock replicas` and recovery read it back."""

from __future__ import annotations

import sqlite3
from typing import Any

from service.ledger.base import REPLICA_COLUMNS, UNFINISHED, ReplicaRecord
from service.ledger.sqlite_writer import WriterThread

__all__ = ["SqliteReplicas"]

_COLUMNS = ", ".join(REPLICA_COLUMNS)
_MARKS = ", ".join("?" * len(REPLICA_COLUMNS))
_UNFINISHED = "(" + ", ".join(f"'{s}'" for s in UNFINISHED) + ")"


def _values(r: ReplicaRecord) -> list[Any]:
    return [getattr(r, c) for c in REPLICA_COLUMNS]


class SqliteReplicas:
    """The replica operations of `SqliteLedger` (a mixin: it needs `_writer`)."""

    _writer: WriterThread

    async def register_replica(self, replica: ReplicaRecord) -> bool:
        sql = f"INSERT OR IGNORE INTO replicas ({_COLUMNS}) VALUES ({_MARKS})"
        values = _values(replica)
        added: int = await self._writer.call(lambda c: c.execute(sql, values).rowcount)
        return added > 0

    async def replica_heartbeat(self, replica: ReplicaRecord) -> None:
        sql = f"INSERT OR REPLACE INTO replicas ({_COLUMNS}) VALUES ({_MARKS})"
        values = _values(replica)
        values[REPLICA_COLUMNS.index("stopped_at")] = None
        await self._writer.call(lambda c: c.execute(sql, values))

    async def replica_stopped(self, instance: str, at: float) -> None:
        await self._writer.call(
            lambda c: c.execute(
                "UPDATE replicas SET stopped_at = ? WHERE instance = ?", (at, instance)
            )
        )

    async def replicas(self) -> list[ReplicaRecord]:
        def op(c: sqlite3.Connection) -> list[sqlite3.Row]:
            return c.execute(
                f"SELECT {_COLUMNS}, coalesce(held.n, 0) AS jobs FROM replicas"
                " LEFT JOIN (SELECT owner, count(*) AS n FROM jobs"
                f"            WHERE state IN {_UNFINISHED} GROUP BY owner) AS held"
                " ON held.owner = replicas.instance"
                " ORDER BY started_at DESC, instance"
            ).fetchall()

        rows = await self._writer.call(op)
        return [ReplicaRecord(**dict(zip(r.keys(), tuple(r), strict=True))) for r in rows]

    async def prune_replicas(self, before: float, limit: int) -> int:
        count: int = await self._writer.call(
            lambda c: (
                c.execute(
                    "DELETE FROM replicas WHERE instance IN (SELECT instance FROM replicas"
                    " WHERE heartbeat_at < ? ORDER BY heartbeat_at LIMIT ?)",
                    (before, limit),
                ).rowcount
            )
        )
        return count
