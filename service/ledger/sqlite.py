"""The embedded SQLite ledger: WAL, one writer thread with group commit.

Every operation is queued to a single thread that owns the connection. The thread
takes everything queued, runs it in one transaction (each operation under its own
savepoint, so one failure does not undo the others) and commits once. A caller's
coroutine returns only after the commit.

Durability follows the protocol's ordering rather than fsyncing every commit
(PERF-NOTES.md): WAL with `synchronous=NORMAL` survives any crash of the process;
against power loss, the claim's row (`insert`) must be on disk before the claim
rename, so a batch holding an insert fsyncs the WAL before its callers resume.
Later transitions follow durable filesystem steps (the archive, the move to
failed/) that recovery reconciles from, so they need no fsync of their own.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from service.ledger.base import (
    COLUMNS,
    SCHEMA_VERSION,
    JobRecord,
    check_fields,
    decode_history,
    encode_history,
)

__all__ = ["SqliteLedger"]

T = TypeVar("T")
_Op = Callable[[sqlite3.Connection], Any]
_Item = tuple[_Op, "asyncio.Future[Any]", bool]  # operation, its caller, needs an fsync
_MAX_BATCH = 512

_SCHEMA = """
CREATE TABLE IF NOT EXISTS filedock_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    route TEXT NOT NULL,
    name BLOB NOT NULL,
    relative_path BLOB NOT NULL,
    state TEXT NOT NULL,
    outcome TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    size INTEGER,
    mtime_ns INTEGER,
    sha256 TEXT,
    next_attempt_at REAL,
    error_class TEXT,
    error TEXT,
    detected_at REAL NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    archive_path TEXT,
    failed_path TEXT,
    duplicate_of TEXT,
    owner TEXT,
    lease_expires_at REAL,
    history TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_route_sha ON jobs (route, sha256);
CREATE INDEX IF NOT EXISTS jobs_updated ON jobs (updated_at);
"""
_UNFINISHED = "('claimed', 'importing', 'waiting', 'archiving')"


def _row_to_record(row: sqlite3.Row) -> JobRecord:
    values = dict(zip(row.keys(), tuple(row), strict=True))
    values["history"] = decode_history(values["history"])
    values["name"] = bytes(values["name"])
    values["relative_path"] = bytes(values["relative_path"])
    return JobRecord(**values)


def _record_values(record: JobRecord) -> list[Any]:
    values = [getattr(record, c) for c in COLUMNS]
    values[COLUMNS.index("history")] = encode_history(record.history)
    return values


def _encode(column: str, value: Any) -> Any:
    return encode_history(value) if column == "history" else value


class SqliteLedger:
    """The ledger in one SQLite file, for a single replica on node-local storage."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="filedock-ledger", daemon=True
        )
        self._thread.start()
        try:
            await ready
        except asyncio.CancelledError:
            self._queue.put(None)  # the thread stops, closing its connection, once connected
            self._thread = None
            raise
        except BaseException:
            self._thread = None  # the thread has ended: close() must not queue a stop for it
            raise

    async def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        thread, self._thread = self._thread, None
        await asyncio.get_running_loop().run_in_executor(None, thread.join)

    def _connect(self) -> sqlite3.Connection:
        # Two processes opening a new file at once (the service and a CLI command) can
        # get SQLITE_BUSY where SQLite skips the busy handler to avoid a deadlock
        # (switching to WAL): start over until the other one is done.
        deadline = time.monotonic() + 10.0
        while True:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                self._prepare(conn)
            except sqlite3.OperationalError as e:
                conn.close()
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
                continue
            except BaseException:
                conn.close()
                raise
            return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        # Schema and version in one write transaction, so that two processes creating
        # the file together do not both insert a version.
        conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA)
        try:
            version = conn.execute("SELECT version FROM filedock_schema").fetchone()
            if version is None:
                conn.execute("INSERT INTO filedock_schema (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version[0] > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has ledger schema {version[0]}, newer than this filedock "
                    f"({SCHEMA_VERSION}): upgrade filedock"
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _run(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        loop = self._loop
        try:
            conn = self._connect()
        except BaseException as e:  # report any failure to open, then stop the thread
            _notify(loop, _settle, ready, None, e)
            return
        _notify(loop, _settle, ready, None, None)
        try:
            self._serve(conn, loop)
        finally:
            conn.close()

    def _serve(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            batch: list[_Item] = []
            while item is not None:
                batch.append(item)
                if len(batch) >= _MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            else:
                stop = True
            if batch:
                results = self._run_batch(conn, batch)
                _notify(loop, _settle_all, results)

    def _run_batch(
        self, conn: sqlite3.Connection, batch: list[_Item]
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, fut, _ in batch:
                conn.execute("SAVEPOINT op")
                try:
                    value = op(conn)
                except Exception as e:
                    conn.execute("ROLLBACK TO op")
                    results.append((fut, None, e))
                else:
                    results.append((fut, value, None))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
            if any(durable for _, _, durable in batch):
                self._fsync_wal()
        except (sqlite3.Error, OSError) as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return [(fut, None, e) for _, fut, _ in batch]
        return results

    def _fsync_wal(self) -> None:
        fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def _call(self, op: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        if self._thread is None or self._loop is None:
            raise RuntimeError("the ledger is not open")
        fut: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((op, fut, durable))
        return await fut

    # -- operations ----------------------------------------------------------------

    async def ping(self) -> None:
        """A real write (rolled into the batch's commit): a ledger that can no longer be
        written (disk full, read-only, immutable) fails here, not on the next claim."""
        await self._call(lambda c: c.execute("UPDATE filedock_schema SET version = version"))

    async def insert(self, records: Sequence[JobRecord]) -> None:
        if not records:
            return
        sql = f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        rows = [_record_values(r) for r in records]
        await self._call(lambda c: c.executemany(sql, rows), durable=True)

    async def update(
        self, job_id: str, fields: Mapping[str, Any], *, expect_state: str | None = None
    ) -> bool:
        check_fields(fields)
        assignments = ", ".join(f"{k} = ?" for k in fields)
        params = [_encode(k, v) for k, v in fields.items()] + [job_id]
        sql = f"UPDATE jobs SET {assignments} WHERE id = ?"
        if expect_state is not None:
            sql += " AND state = ?"
            params.append(expect_state)
        changed: int = await self._call(lambda c: c.execute(sql, params).rowcount)
        return changed > 0

    async def update_many(self, changes: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        statements = []
        for job_id, fields in changes:
            check_fields(fields)
            sql = f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?"
            statements.append((sql, [_encode(k, v) for k, v in fields.items()] + [job_id]))

        def op(c: sqlite3.Connection) -> None:
            for sql, params in statements:
                c.execute(sql, params)

        if statements:
            await self._call(op)

    async def delete(self, job_ids: Sequence[str]) -> None:
        ids = [(i,) for i in job_ids]
        await self._call(lambda c: c.executemany("DELETE FROM jobs WHERE id = ?", ids))

    async def get(self, job_id: str) -> JobRecord | None:
        row = await self._call(
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
        rows = await self._call(lambda c: c.execute(sql, params).fetchall())
        return [_row_to_record(r) for r in rows]

    async def counts(self) -> dict[str, int]:
        rows = await self._call(
            lambda c: c.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        )
        return {state: n for state, n in rows}

    async def take_due(self, now: float, limit: int, owner: str, lease_s: float) -> list[JobRecord]:
        def op(c: sqlite3.Connection) -> list[sqlite3.Row]:
            rows = c.execute(
                "SELECT * FROM jobs WHERE state = 'waiting' AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at LIMIT ?",
                (now, limit),
            ).fetchall()
            c.executemany(
                "UPDATE jobs SET state = 'claimed', owner = ?, lease_expires_at = ?,"
                " updated_at = ? WHERE id = ?",
                [(owner, now + lease_s, now, r["id"]) for r in rows],
            )
            return rows

        rows = await self._call(op)
        records = [_row_to_record(r) for r in rows]
        for r in records:
            r.state, r.owner, r.lease_expires_at, r.updated_at = (
                "claimed",
                owner,
                now + lease_s,
                now,
            )
        return records

    async def take_orphans(
        self, now: float, owner: str, lease_s: float, *, include_own: bool = True
    ) -> list[JobRecord]:
        def op(c: sqlite3.Connection) -> list[sqlite3.Row]:
            rows = c.execute(
                f"SELECT * FROM jobs WHERE state IN {_UNFINISHED}"
                " AND ((? AND owner = ?)"
                "      OR (owner IS NOT ? AND (owner IS NULL OR lease_expires_at < ?)))"
                " ORDER BY id",
                (include_own, owner, owner, now),
            ).fetchall()
            c.executemany(
                "UPDATE jobs SET owner = ?, lease_expires_at = ? WHERE id = ?",
                [(owner, now + lease_s, r["id"]) for r in rows],
            )
            return rows

        records = [_row_to_record(r) for r in await self._call(op)]
        for r in records:
            r.owner, r.lease_expires_at = owner, now + lease_s
        return records

    async def renew_leases(self, owner: str, until: float) -> None:
        await self._call(
            lambda c: c.execute(
                f"UPDATE jobs SET lease_expires_at = ? WHERE owner = ? AND state IN {_UNFINISHED}",
                (until, owner),
            )
        )

    async def find_done_by_sha256(self, route: str, sha256: str, since: float) -> str | None:
        row = await self._call(
            lambda c: c.execute(
                "SELECT id FROM jobs WHERE route = ? AND sha256 = ? AND state = 'done'"
                " AND outcome IS NOT 'duplicate' AND created_at >= ? ORDER BY id LIMIT 1",
                (route, sha256, since),
            ).fetchone()
        )
        return str(row[0]) if row is not None else None

    async def older_than(self, states: Sequence[str], before: float, limit: int) -> list[JobRecord]:
        marks = ", ".join("?" * len(states))
        rows = await self._call(
            lambda c: c.execute(
                f"SELECT * FROM jobs WHERE state IN ({marks}) AND updated_at < ?"
                " ORDER BY updated_at, id LIMIT ?",
                (*states, before, limit),
            ).fetchall()
        )
        return [_row_to_record(r) for r in rows]


def _notify(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass  # the event loop has closed: nobody is waiting for the answer any more


def _settle(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


def _settle_all(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, value, error in results:
        _settle(fut, value, error)
