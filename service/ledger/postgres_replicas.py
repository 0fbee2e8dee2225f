"""The PostgreSQL ledger's replicas table: each start of the service registers an
instance, heartbeats it, and marks it stopped; `filedock replicas` and recovery read it
back. The table arrives with schema version 4."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.rows import DictRow

from service.ledger.base import REPLICA_COLUMNS, UNFINISHED, ReplicaRecord

__all__ = ["REPLICAS_SCHEMA", "PostgresReplicas"]

REPLICAS_SCHEMA: Final = (
    """CREATE TABLE replicas (
        instance text PRIMARY KEY,
        name text NOT NULL,
        host text NOT NULL,
        pid integer NOT NULL,
        started_at double precision NOT NULL,
        heartbeat_at double precision NOT NULL,
        version text NOT NULL,
        boot_id text,
        pid_ns text,
        pid_start bigint,
        stopped_at double precision
    )""",
    "CREATE INDEX replicas_heartbeat ON replicas (heartbeat_at)",
)
_COLUMNS: Final = sql.SQL(", ").join(map(sql.Identifier, REPLICA_COLUMNS))
_VALUES: Final = sql.SQL(", ").join(sql.Placeholder() * len(REPLICA_COLUMNS))
_INSERT: Final = sql.SQL("INSERT INTO replicas ({}) VALUES ({})").format(_COLUMNS, _VALUES)
_UPSERT: Final = _INSERT + sql.SQL(" ON CONFLICT (instance) DO UPDATE SET {}").format(
    sql.SQL(", ").join(
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
        for c in REPLICA_COLUMNS
        if c != "instance"
    )
)


def _values(r: ReplicaRecord) -> list[Any]:
    return [getattr(r, c) for c in REPLICA_COLUMNS]


class PostgresReplicas:
    """The replica operations of `PostgresLedger` (a mixin: it needs `_fetch`,
    `_execute` and `_connection`)."""

    async def _fetch(self, query: Any, params: Any = None) -> list[DictRow]:
        raise NotImplementedError

    async def _execute(self, query: Any, params: Any = None) -> int:
        raise NotImplementedError

    def _connection(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        raise NotImplementedError

    async def register_replica(self, replica: ReplicaRecord) -> bool:
        query = _INSERT + sql.SQL(" ON CONFLICT (instance) DO NOTHING")
        return await self._execute(query, _values(replica)) > 0

    async def replica_heartbeat(self, replica: ReplicaRecord) -> None:
        values = _values(replica)
        values[REPLICA_COLUMNS.index("stopped_at")] = None
        await self._execute(_UPSERT, values)

    async def replica_stopped(self, instance: str, at: float) -> None:
        await self._execute(
            "UPDATE replicas SET stopped_at = %s WHERE instance = %s", (float(at), instance)
        )

    async def replicas(self) -> list[ReplicaRecord]:
        query = sql.SQL(
            """SELECT {}, coalesce(held.n, 0) AS jobs FROM replicas
               LEFT JOIN (SELECT owner, count(*) AS n FROM jobs
                          WHERE state = ANY(%s) GROUP BY owner) AS held
                 ON held.owner = replicas.instance
               ORDER BY started_at DESC, instance"""
        ).format(_COLUMNS)
        rows = await self._fetch(query, (list(UNFINISHED),))
        return [ReplicaRecord(**dict(r)) for r in rows]

    async def prune_replicas(self, before: float, limit: int) -> int:
        return await self._execute(
            """DELETE FROM replicas WHERE instance IN (
                   SELECT instance FROM replicas WHERE heartbeat_at < %s
                   ORDER BY heartbeat_at LIMIT %s)""",
            (float(before), limit),
        )
