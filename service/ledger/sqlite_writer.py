"""The SQLite ledger's writer thread: it owns the one connection, creates the schema,
and runs every operation queued to it with group commit.

The thread takes everything queued, runs it in one transaction (each operation under
its own savepoint, so one failure does not undo the others) and commits once. A
caller's coroutine returns only after the commit; an operation marked durable (a
claim's insert) also waits for an fsync of the WAL.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from service.ledger.base import SCHEMA_VERSION
from service.ledger.reach import Reachability

__all__ = ["WriterThread"]

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
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT NOT NULL,
    sink TEXT NOT NULL,
    route TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    error_class TEXT,
    error TEXT,
    receipts TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (job_id, sink)
);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries (state, route, sink);
CREATE TABLE IF NOT EXISTS outbox (
    event_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    type TEXT NOT NULL,
    route TEXT NOT NULL,
    job_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    error TEXT,
    created_at REAL NOT NULL,
    sent_at REAL,
    owner TEXT,
    lease_expires_at REAL,
    PRIMARY KEY (event_id, channel)
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS arrival_windows (
    route TEXT NOT NULL,
    expectation TEXT NOT NULL,
    deadline REAL NOT NULL,
    start REAL NOT NULL,
    judgement TEXT NOT NULL,
    files INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    until REAL NOT NULL,
    judged_at REAL NOT NULL,
    judged_by TEXT,
    PRIMARY KEY (route, expectation, deadline)
);
CREATE INDEX IF NOT EXISTS jobs_route_detected ON jobs (route, detected_at);
CREATE INDEX IF NOT EXISTS jobs_state_id ON jobs (state, id);
CREATE INDEX IF NOT EXISTS jobs_route_id ON jobs (route, id, state);
CREATE INDEX IF NOT EXISTS jobs_failed ON jobs (route, error_class, id) WHERE state = 'failed';

CREATE TABLE IF NOT EXISTS replicas (
    instance TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    version TEXT NOT NULL,
    boot_id TEXT,
    pid_ns TEXT,
    pid_start INTEGER,
    stopped_at REAL
);
CREATE INDEX IF NOT EXISTS replicas_heartbeat ON replicas (heartbeat_at);
"""


class WriterThread:
    """One SQLite file's connection, in a thread of its own; `reach` learns from each
    batch whether the file can be written."""

    def __init__(self, path: Path, reach: Reachability) -> None:
        self.path = path
        self.reach = reach
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
            elif version[0] < SCHEMA_VERSION:  # each step only adds tables: made above
                conn.execute("UPDATE filedock_schema SET version = ?", (SCHEMA_VERSION,))
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
            if isinstance(e, sqlite3.OperationalError | OSError):
                self.reach.failed(e)
            _notify(loop, _settle, ready, None, e)
            return
        self.reach.answered()
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
        except (sqlite3.Error, OSError) as e:  # the batch as a whole: the file cannot be written
            self.reach.failed(e)
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite has rolled back by itself (an I/O error): the thread goes on
            return [(fut, None, e) for _, fut, _ in batch]
        self.reach.answered()
        return results

    def _fsync_wal(self) -> None:
        fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def call(self, op: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        if self._thread is None or self._loop is None:
            raise RuntimeError("the ledger is not open")
        fut: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((op, fut, durable))
        return await fut


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
