"""The PostgreSQL ledger's schema: the tables of the current version, the steps from each
older version, and the migration that applies them once, whichever replica starts first."""

from __future__ import annotations

from typing import Any, Final

import psycopg

from service.ledger.base import SCHEMA_VERSION
from service.ledger.postgres_arrivals import WINDOWS_SCHEMA
from service.ledger.postgres_outbox import OUTBOX_SCHEMA
from service.ledger.postgres_pages import PAGES_SCHEMA
from service.ledger.postgres_replicas import REPLICAS_SCHEMA

__all__ = ["LOCK_KEY", "MIGRATIONS", "SCHEMA", "migrate"]

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
SCHEMA: Final[tuple[str, ...]] = (
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
    *REPLICAS_SCHEMA,
    *PAGES_SCHEMA,
)
# Steps from version n to n + 1, applied in order under the migration lock.
MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    1: _DELIVERIES,
    2: OUTBOX_SCHEMA,
    3: WINDOWS_SCHEMA,
    4: REPLICAS_SCHEMA,
    5: PAGES_SCHEMA,
}

# A lock key is the 64-bit hash of "<schema>:<name>", computed by the server.
LOCK_KEY: Final = "hashtextextended(coalesce(current_schema(), '') || ':' || %s, 0)"


async def migrate(conn: psycopg.AsyncConnection[Any], url: str) -> None:
    """Create or upgrade the schema; replicas starting together take turns on a lock."""
    async with conn.transaction():
        await conn.execute(f"SELECT pg_advisory_xact_lock({LOCK_KEY})", ("filedock_schema",))
        await conn.execute("CREATE TABLE IF NOT EXISTS filedock_schema (version integer NOT NULL)")
        cur = await conn.execute("SELECT max(version) FROM filedock_schema")
        row = await cur.fetchone()
        version: int | None = row[0] if row is not None else None
        if version is None:
            for statement in SCHEMA:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO filedock_schema (version) VALUES (%s)", (SCHEMA_VERSION,)
            )
            return
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the ledger at {_redacted(url)} has schema {version}, newer than"
                f" this filedock ({SCHEMA_VERSION}): upgrade filedock"
            )
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                await conn.execute(statement)
        if version < SCHEMA_VERSION:
            await conn.execute("UPDATE filedock_schema SET version = %s", (SCHEMA_VERSION,))


def _redacted(url: str) -> str:
    """The URL without a password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<invalid url>"
    host, db = info.get("host", ""), info.get("dbname", "")
    return f"postgresql://{host}/{db}"
