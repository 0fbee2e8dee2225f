"""The PostgreSQL ledger: several replicas share one database and never take the same job.

Each operation runs on a pooled connection in autocommit mode, as one statement or
one explicit transaction, so its coroutine returns only after the COMMIT. Picking up
due retries and orphaned jobs is a single `UPDATE … FROM (SELECT … FOR UPDATE SKIP
LOCKED)`: a row another replica is taking at that moment is skipped, not waited for,
and each job goes to exactly one replica. Advisory locks are scoped to the schema the
ledger lives in, so two deployments (or two tests) in one database stay apart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from service.errors import LedgerUnavailable
from service.ledger.base import (
    COLUMNS,
    DELIVERY_COLUMNS,
    UNFINISHED,
    DeliveryRecord,
    JobRecord,
    OutboxRecord,
    check_fields,
)
from service.ledger.postgres_arrivals import PostgresArrivals
from service.ledger.postgres_outbox import PostgresOutbox, insert_events
from service.ledger.postgres_pages import PostgresPages
from service.ledger.postgres_reads import PostgresReads, job_record
from service.ledger.postgres_replicas import PostgresReplicas
from service.ledger.postgres_schema import LOCK_KEY, migrate
from service.ledger.reach import Reachability, one_line

__all__ = ["PostgresLedger"]

_UNFINISHED: Final = list(UNFINISHED)
# The errors that mean no connection (none to be had, or the one in use was cut); a
# pool's timeout is one of them.
_UNREACHABLE: Final = (psycopg.OperationalError, psycopg.InterfaceError)
# How long the pool keeps trying to replace a lost connection before it gives up and
# leaves the next request to start a new attempt at once. Its own backoff doubles from
# 1 s without a cap: after a 30 s outage, the first connection would come up to 30 s
# after the server is back; this way, within about a second.
_RECONNECT_S: Final = 2.0
_PING_WAIT_S: Final = 1.0  # the ping waits this long for a pooled connection
_CLOSE_S: Final = 2.0  # a stop waits this long for the pool's reconnection attempts


def _param(column: str, value: Any) -> Any:
    return Jsonb(value) if column in ("history", "receipts") else value


async def _durable_commits(conn: psycopg.AsyncConnection[Any]) -> None:
    """A commit must be on disk when it returns, whatever the server's default says."""
    cur = await conn.execute("SHOW synchronous_commit")
    row = await cur.fetchone()
    if row is not None and row[0] in ("off", "local"):
        await conn.execute("SET synchronous_commit TO on")


class PostgresLedger(
    PostgresOutbox, PostgresArrivals, PostgresReplicas, PostgresReads, PostgresPages
):
    """The ledger in a PostgreSQL database, for one or several replicas.

    Args:
        url: a libpq URL (`postgresql://user@host:5432/db?options=-csearch_path%3Dfd`);
            the tables go to the first schema of the search path.
        min_size: connections the pool keeps open.
        max_size: most connections the pool opens.
        connect_timeout_s: how long to wait for a new connection (and for the pool to
            give one out) before failing.
    """

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 4,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.url, self._min_size, self._max_size = url, min_size, max_size
        self._timeout_s = connect_timeout_s
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self.reach = Reachability("unreachable")

    # -- lifecycle -----------------------------------------------------------------

    async def open(self) -> None:
        """Raises `LedgerUnavailable` when the server cannot be reached or refuses the
        connection (with the server's own words), for the caller to try again."""
        try:
            await self._open()
        except _UNREACHABLE as e:
            raise LedgerUnavailable(one_line(e)) from e

    async def _open(self) -> None:
        # The schema first, on a connection of its own: a wrong URL or a missing
        # database fails with the server's own words, not a pool timeout.
        async with await self._connect() as conn:
            await migrate(conn, self.url)
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            self.url,
            min_size=self._min_size,
            max_size=self._max_size,
            open=False,
            name="filedock-ledger",
            timeout=self._timeout_s,
            kwargs={"autocommit": True, "connect_timeout": self._connect_timeout},
            configure=_durable_commits,
            # A connection broken by a server restart is replaced before use, so the
            # ledger comes back by itself once the database does.
            check=AsyncConnectionPool.check_connection,
            reconnect_timeout=_RECONNECT_S,
        )
        try:
            await pool.open(wait=True, timeout=self._timeout_s)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        self.reach.answered()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=_CLOSE_S)

    @property
    def _connect_timeout(self) -> int:
        return max(2, round(self._timeout_s))  # libpq's unit is whole seconds, at least 2

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        """A connection of its own, outside the pool."""
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=self._connect_timeout
            )
            await _durable_commits(conn)
        except _UNREACHABLE as e:
            self.reach.failed(e)
            raise
        return conn

    @asynccontextmanager
    async def _connection(
        self, timeout: float | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection; what became of it tells `reach` whether the ledger answers."""
        if self._pool is None:
            raise RuntimeError("the ledger is not open")
        try:
            async with self._pool.connection(timeout) as conn:
                yield conn
        except _UNREACHABLE as e:
            self.reach.failed(e, vague=isinstance(e, PoolTimeout))
            raise
        self.reach.answered()

    async def _fetch(self, query: Any, params: Any = None) -> list[DictRow]:
        async with self._connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, params)
            rows: list[DictRow] = await cur.fetchall()
            return rows

    async def _execute(self, query: Any, params: Any = None) -> int:
        async with self._connection() as conn, conn.cursor() as cur:
            await cur.execute(query, params)
            count: int = cur.rowcount
            return count

    @asynccontextmanager
    async def advisory_lock(self, key: str) -> AsyncIterator[bool]:
        """Try to take a lock shared by every replica of this ledger; yield whether we hold it.

        The lock lives on a dedicated connection (not a pooled one), held until the
        block ends; if that connection dies the server releases the lock, so a crashed
        replica never blocks the others. Never waits: a replica that does not get the
        lock simply skips the work this time.
        """
        conn = await self._connect()
        try:
            cur = await conn.execute(f"SELECT pg_try_advisory_lock({LOCK_KEY})", (key,))
            row = await cur.fetchone()
            held = bool(row and row[0])
            try:
                yield held
            finally:
                if held and not conn.closed:
                    try:
                        await conn.execute(f"SELECT pg_advisory_unlock({LOCK_KEY})", (key,))
                    except psycopg.Error:
                        pass  # closing the connection below releases it as well
        finally:
            await conn.close()

    # -- operations ----------------------------------------------------------------

    async def ping(self) -> None:
        """A pooled connection if one comes at once, else one of its own: the pool keeps
        its connection errors to its log, a connection of our own says why (and a busy
        pool is no reason to be unready)."""
        try:
            async with self._connection(_PING_WAIT_S) as conn:
                await conn.execute("SELECT 1")
            return
        except PoolTimeout:
            pass
        async with await self._connect() as conn:
            await conn.execute("SELECT 1")

    async def insert(self, records: Sequence[JobRecord]) -> None:
        if not records:
            return
        query = sql.SQL("INSERT INTO jobs ({}) VALUES ({})").format(
            sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
            sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS)),
        )
        rows = [[_param(c, getattr(r, c)) for c in COLUMNS] for r in records]
        async with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.executemany(query, rows)

    async def update(
        self,
        job_id: str,
        fields: Mapping[str, Any],
        *,
        expect_state: str | None = None,
        events: Sequence[OutboxRecord] = (),
    ) -> bool:
        check_fields(fields)
        query = sql.SQL("UPDATE jobs SET {} WHERE id = %s").format(
            sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in fields)
        )
        params = [_param(k, v) for k, v in fields.items()] + [job_id]
        if expect_state is not None:
            query += sql.SQL(" AND state = %s")
            params.append(expect_state)
        if not events:
            return await self._execute(query, params) > 0
        async with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute(query, params)
            changed = cur.rowcount > 0
            if changed:
                await insert_events(cur, events)
        return changed

    async def update_many(
        self,
        changes: Sequence[tuple[str, Mapping[str, Any]]],
        events: Sequence[OutboxRecord] = (),
    ) -> None:
        if not changes:
            return
        async with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            await _update_jobs(cur, changes)
            await insert_events(cur, events)

    async def delete(self, job_ids: Sequence[str]) -> None:
        if job_ids:
            async with self._connection() as conn, conn.transaction():
                await conn.execute(
                    "DELETE FROM deliveries WHERE job_id = ANY(%s)", (list(job_ids),)
                )
                await conn.execute(
                    "DELETE FROM outbox WHERE job_id = ANY(%s) AND state != 'pending'",
                    (list(job_ids),),
                )
                await conn.execute("DELETE FROM jobs WHERE id = ANY(%s)", (list(job_ids),))

    async def save_deliveries(
        self,
        deliveries: Sequence[DeliveryRecord],
        jobs: Sequence[tuple[str, Mapping[str, Any]]] = (),
        events: Sequence[OutboxRecord] = (),
    ) -> None:
        upsert = sql.SQL(
            "INSERT INTO deliveries ({}) VALUES ({}) ON CONFLICT (job_id, sink) DO UPDATE SET {}"
        ).format(
            sql.SQL(", ").join(map(sql.Identifier, DELIVERY_COLUMNS)),
            sql.SQL(", ").join(sql.Placeholder() * len(DELIVERY_COLUMNS)),
            sql.SQL(", ").join(
                sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
                for c in DELIVERY_COLUMNS
                if c not in ("job_id", "sink")
            ),
        )
        rows = [[_param(c, getattr(d, c)) for c in DELIVERY_COLUMNS] for d in deliveries]
        async with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            await _update_jobs(cur, jobs)
            if rows:
                await cur.executemany(upsert, rows)
            await insert_events(cur, events)

    async def take_due(self, now: float, limit: int, owner: str, lease_s: float) -> list[JobRecord]:
        rows = await self._fetch(
            """UPDATE jobs SET
                   state = CASE jobs.state WHEN 'waiting' THEN 'claimed' ELSE jobs.state END,
                   next_attempt_at = CASE jobs.state
                       WHEN 'waiting' THEN jobs.next_attempt_at END,
                   owner = %(owner)s, lease_expires_at = %(until)s, updated_at = %(now)s
               FROM (SELECT id FROM jobs
                     WHERE state IN ('waiting', 'delivering') AND next_attempt_at <= %(now)s
                     ORDER BY next_attempt_at, id LIMIT %(limit)s
                     FOR UPDATE SKIP LOCKED) AS due
               WHERE jobs.id = due.id
               RETURNING jobs.*""",
            {"owner": owner, "until": float(now + lease_s), "now": float(now), "limit": limit},
        )
        records = [job_record(r) for r in rows]
        records.sort(key=lambda r: (r.next_attempt_at or 0.0, r.id))
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
        rows = await self._fetch(
            """UPDATE jobs SET owner = %(owner)s, lease_expires_at = %(until)s
               FROM (SELECT id FROM jobs
                     WHERE state = ANY(%(unfinished)s)
                       AND (%(mine)s OR owner IS DISTINCT FROM %(owner)s)
                       AND (%(everyone)s OR owner IS NULL OR owner = ANY(%(gone)s)
                            OR (%(leases)s AND lease_expires_at < %(now)s)
                            OR (%(mine)s AND owner = %(owner)s))
                     ORDER BY id
                     FOR UPDATE SKIP LOCKED) AS orphan
               WHERE jobs.id = orphan.id
               RETURNING jobs.*""",
            {
                "owner": owner,
                "gone": list(gone),
                "everyone": everyone,
                "leases": leases,
                "mine": mine,
                "until": float(now + lease_s),
                "now": float(now),
                "unfinished": _UNFINISHED,
            },
        )
        return sorted((job_record(r) for r in rows), key=lambda r: r.id)

    async def renew_leases(self, owner: str, until: float) -> None:
        # Rows locked right now are being updated by this replica: alive, skip them
        # (waiting for them could deadlock against a batched update).
        await self._execute(
            """UPDATE jobs SET lease_expires_at = %s
               FROM (SELECT id FROM jobs WHERE owner = %s AND state = ANY(%s)
                     ORDER BY id FOR UPDATE SKIP LOCKED) AS mine
               WHERE jobs.id = mine.id""",
            (float(until), owner, _UNFINISHED),
        )


async def _update_jobs(
    cur: psycopg.AsyncCursor[Any], changes: Sequence[tuple[str, Mapping[str, Any]]]
) -> None:
    """Set each job's columns, in id order: one lock order for every transaction."""
    for job_id, fields in sorted(changes, key=lambda c: c[0]):
        check_fields(fields)
        query = sql.SQL("UPDATE jobs SET {} WHERE id = %s").format(
            sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in fields)
        )
        await cur.execute(query, [_param(k, v) for k, v in fields.items()] + [job_id])
