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
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from service.ledger.base import (
    COLUMNS,
    DELIVERY_COLUMNS,
    SCHEMA_VERSION,
    UNFINISHED,
    DeliveryRecord,
    JobRecord,
    OutboxRecord,
    check_fields,
)
from service.ledger.postgres_arrivals import WINDOWS_SCHEMA, PostgresArrivals
from service.ledger.postgres_outbox import OUTBOX_SCHEMA, PostgresOutbox, insert_events
from service.ledger.postgres_pages import PAGES_SCHEMA, PostgresPages

__all__ = ["PostgresLedger"]

_UNFINISHED: Final = list(UNFINISHED)
_DELIVERIES: Final = (
    """CREATE TABLE deliveries (
        job_id text NOT NULL,
        sink text NOT NULL,
        route text NOT NULL,
        state text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at double precision,
        error_class text,
        error text,
        receipts jsonb NOT NULL DEFAULT '[]',
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        PRIMARY KEY (job_id, sink)
    )""",
    "CREATE INDEX deliveries_state ON deliveries (state, route, sink)",
)

# The current schema; the same columns as SQLite, with bytea names, Unix-second
# double precision times and the attempt history as jsonb.
_SCHEMA: Final[tuple[str, ...]] = (
    """CREATE TABLE jobs (
        id text PRIMARY KEY,
        route text NOT NULL,
        name bytea NOT NULL,
        relative_path bytea NOT NULL,
        state text NOT NULL,
        outcome text,
        attempts integer NOT NULL DEFAULT 0,
        size bigint,
        mtime_ns bigint,
        sha256 text,
        next_attempt_at double precision,
        error_class text,
        error text,
        detected_at double precision NOT NULL,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        archive_path text,
        failed_path text,
        duplicate_of text,
        owner text,
        lease_expires_at double precision,
        history jsonb NOT NULL DEFAULT '[]'
    )""",
    "CREATE INDEX jobs_state ON jobs (state, next_attempt_at)",
    "CREATE INDEX jobs_route_sha ON jobs (route, sha256)",
    "CREATE INDEX jobs_updated ON jobs (updated_at)",
    "CREATE INDEX jobs_owner ON jobs (owner) WHERE owner IS NOT NULL",
    *_DELIVERIES,
    *OUTBOX_SCHEMA,
    *WINDOWS_SCHEMA,
    *PAGES_SCHEMA,
)
# Steps from version n to n + 1, applied in order under the migration lock.
_MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    1: _DELIVERIES,
    2: OUTBOX_SCHEMA,
    3: WINDOWS_SCHEMA,
    4: PAGES_SCHEMA,
}

# A lock key is the 64-bit hash of "<schema>:<name>", computed by the server.
_LOCK_KEY: Final = "hashtextextended(coalesce(current_schema(), '') || ':' || %s, 0)"


def _record(row: DictRow) -> JobRecord:
    values = dict(row)
    values["name"] = bytes(values["name"])
    values["relative_path"] = bytes(values["relative_path"])
    values["history"] = list(values["history"] or [])
    return JobRecord(**values)


def _param(column: str, value: Any) -> Any:
    return Jsonb(value) if column in ("history", "receipts") else value


def _delivery(row: DictRow) -> DeliveryRecord:
    values = dict(row)
    values["receipts"] = list(values["receipts"] or [])
    return DeliveryRecord(**values)


async def _durable_commits(conn: psycopg.AsyncConnection[Any]) -> None:
    """A commit must be on disk when it returns, whatever the server's default says."""
    cur = await conn.execute("SHOW synchronous_commit")
    row = await cur.fetchone()
    if row is not None and row[0] in ("off", "local"):
        await conn.execute("SET synchronous_commit TO on")


class PostgresLedger(PostgresOutbox, PostgresArrivals, PostgresPages):
    """The ledger in a PostgreSQL database, for one or several replicas.

    Args:
        url: a libpq URL (`postgresql://user@host:5432/db?options=-csearch_path%3Dfd`);
            the tables go to the first schema of the search path.
        min_size: connections the pool keeps open.
        max_size: most connections the pool opens.
        connect_timeout_s: how long to wait for a new connection (and for the
            pool to give one out) before failing.
    """

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 4,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.url = url
        self._min_size = min_size
        self._max_size = max_size
        self._timeout_s = connect_timeout_s
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def open(self) -> None:
        # The schema first, on a connection of its own: a wrong URL or a missing
        # database fails at once with the server's own words, not a pool timeout.
        async with await self._connect() as conn:
            await self._migrate(conn)
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
        )
        try:
            await pool.open(wait=True, timeout=self._timeout_s)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @property
    def _connect_timeout(self) -> int:
        return max(2, round(self._timeout_s))  # libpq's unit is whole seconds, at least 2

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            self.url, autocommit=True, connect_timeout=self._connect_timeout
        )
        await _durable_commits(conn)
        return conn

    async def _migrate(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Create or upgrade the schema; replicas starting together take turns on a lock."""
        async with conn.transaction():
            await conn.execute(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})", ("filedock_schema",))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS filedock_schema (version integer NOT NULL)"
            )
            cur = await conn.execute("SELECT max(version) FROM filedock_schema")
            row = await cur.fetchone()
            version: int | None = row[0] if row is not None else None
            if version is None:
                for statement in _SCHEMA:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO filedock_schema (version) VALUES (%s)", (SCHEMA_VERSION,)
                )
                return
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the ledger at {_redacted(self.url)} has schema {version}, newer than"
                    f" this filedock ({SCHEMA_VERSION}): upgrade filedock"
                )
            for step in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    await conn.execute(statement)
            if version < SCHEMA_VERSION:
                await conn.execute("UPDATE filedock_schema SET version = %s", (SCHEMA_VERSION,))

    def _connection(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        if self._pool is None:
            raise RuntimeError("the ledger is not open")
        return self._pool.connection()

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
            cur = await conn.execute(f"SELECT pg_try_advisory_lock({_LOCK_KEY})", (key,))
            row = await cur.fetchone()
            held = bool(row and row[0])
            try:
                yield held
            finally:
                if held and not conn.closed:
                    try:
                        await conn.execute(f"SELECT pg_advisory_unlock({_LOCK_KEY})", (key,))
                    except psycopg.Error:
                        pass  # closing the connection below releases it as well
        finally:
            await conn.close()

    # -- operations ----------------------------------------------------------------

    async def ping(self) -> None:
        await self._execute("SELECT 1")

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
        return _record(rows[0]) if rows else None

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
        return [_record(r) for r in await self._fetch(query, params)]

    async def counts(self) -> dict[str, int]:
        rows = await self._fetch("SELECT state, count(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: int(r["n"]) for r in rows}

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
        records = [_record(r) for r in rows]
        records.sort(key=lambda r: (r.next_attempt_at or 0.0, r.id))
        return records

    async def take_orphans(
        self, now: float, owner: str, lease_s: float, *, include_own: bool = True
    ) -> list[JobRecord]:
        rows = await self._fetch(
            """UPDATE jobs SET owner = %(owner)s, lease_expires_at = %(until)s
               FROM (SELECT id FROM jobs
                     WHERE state = ANY(%(unfinished)s)
                       AND ((%(own)s AND owner = %(owner)s)
                            OR (owner IS DISTINCT FROM %(owner)s
                                AND (owner IS NULL OR lease_expires_at < %(now)s)))
                     ORDER BY id
                     FOR UPDATE SKIP LOCKED) AS orphan
               WHERE jobs.id = orphan.id
               RETURNING jobs.*""",
            {
                "owner": owner,
                "own": include_own,
                "until": float(now + lease_s),
                "now": float(now),
                "unfinished": _UNFINISHED,
            },
        )
        return sorted((_record(r) for r in rows), key=lambda r: r.id)

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
        return [_record(r) for r in rows]


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


def _redacted(url: str) -> str:
    """The URL without a password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<invalid url>"
    host, db = info.get("host", ""), info.get("dbname", "")
    return f"postgresql://{host}/{db}"
