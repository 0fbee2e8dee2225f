"""The SQL of an import, the bookkeeping tables and DDL both databases share, and SQLite."""

from __future__ import annotations

import sqlite3
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Final

from service.errors import Reject, Retry
from service.importers.base import ImportJob
from service.importers.csv_sql.plan import Row, _Checked, _Plan, _required
from service.settings import CsvColumn, CsvSqlImporterSettings

_SQLITE_BUSY_S: Final = 30.0


def _q(name: str) -> str:
    """A quoted SQL identifier (settings also check names are plain identifiers)."""
    return '"' + name.replace('"', '""') + '"'


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass(frozen=True)
class _Recorded:
    rows_imported: int
    rows_failed: int
    rows_total: int
    finished_at: str


class _Backend:
    """The SQL of one import; subclasses bring the driver (sqlite3, psycopg)."""

    param: ClassVar[str]
    now: ClassVar[str]
    types: ClassVar[dict[str, str]]
    row_errors: tuple[type[Exception], ...]  # the database refuses a row, not the import
    window: int = 1  # chunks streamed before the database's verdict is awaited

    def __init__(self, settings: CsvSqlImporterSettings) -> None:
        self.settings = settings
        self.mode = settings.mode
        self.table = _q(settings.table)
        self.columns: list[str] = []
        self.key: list[int] = []
        self._streamed: list[_Checked] = []

    # the driver
    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def begin(self) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def rollback(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def is_transient(self, error: BaseException) -> bool:
        raise NotImplementedError

    def is_duplicate(self, error: Exception) -> bool:
        """Whether a refusal is a unique violation."""
        raise NotImplementedError

    def table_exists(self, name: str) -> bool:
        raise NotImplementedError

    def column_names(self) -> list[str] | None:
        """The target table's columns, or None when it does not exist."""
        raise NotImplementedError

    def unique_keys(self) -> list[set[str]]:
        """The column sets of the target's primary key and full unique indexes."""
        raise NotImplementedError

    def _prepare_writes(self, plan: _Plan) -> None:
        raise NotImplementedError

    def _write(self, rows: list[Row]) -> dict[int, str]:
        """Apply rows in order; the keys not found (update, remove) by position.

        Raises one of `row_errors` when the database refuses any of them.
        """
        raise NotImplementedError

    def record_errors(self, job_id: str, errors: list[tuple[int, str]]) -> None:
        raise NotImplementedError

    def recorded_errors(self, job_id: str) -> Generator[tuple[int, str], None, None]:
        raise NotImplementedError

    # the SQL both share
    def ddl(self) -> list[tuple[str, str]]:
        """(table, CREATE statement) for the bookkeeping tables and, if asked, the target."""
        big, ts = self.types["int"], self.types["datetime"]
        statements = [
            ("filedock_imports", "CREATE TABLE filedock_imports (job_id TEXT PRIMARY KEY,"
             " route TEXT NOT NULL, table_name TEXT NOT NULL, sha256 TEXT NOT NULL,"
             f" encoding TEXT NOT NULL, rows_imported {big} NOT NULL, rows_failed {big} NOT NULL,"
             f" rows_total {big} NOT NULL, finished_at {ts} NOT NULL)"),
            ("filedock_import_errors", "CREATE TABLE filedock_import_errors"
             f" (job_id TEXT NOT NULL, line {big} NOT NULL, error TEXT NOT NULL,"
             " PRIMARY KEY (job_id, line))"),
        ]  # fmt: skip
        if self.settings.create_table:
            statements.append((self.settings.table, self._create_table()))
        return statements

    def _create_table(self) -> str:
        settings = self.settings
        parts = [
            f"{_q(name)} {self._type(column)}{' NOT NULL' if _required(settings, name) else ''}"
            for name, column in settings.columns.items()
        ]
        if settings.key:
            parts.append(f"PRIMARY KEY ({', '.join(_q(k) for k in settings.key)})")
        return f"CREATE TABLE {self.table} ({', '.join(parts)})"

    def _type(self, column: CsvColumn) -> str:
        return self.types[column.type]

    def prepare(self) -> None:
        """The bookkeeping tables (and the target table), in a transaction of their own.

        Only missing tables are created: a role without the CREATE privilege can import
        into tables made for it.
        """
        self.begin()
        for name, statement in self.ddl():
            if not self.table_exists(name):
                self.execute(statement)
        self.commit()

    def lookup(self, job_id: str) -> _Recorded | None:
        rows = self.execute(
            "SELECT rows_imported, rows_failed, rows_total, finished_at FROM filedock_imports"
            f" WHERE job_id = {self.param}",
            (job_id,),
        )
        if not rows:
            return None
        imported, failed, total, at = rows[0]
        at = at.isoformat() if isinstance(at, datetime) else str(at)
        return _Recorded(int(imported), int(failed), int(total), at)

    def record_job(self, job: ImportJob, encoding: str, imported: int, failed: int) -> None:
        p = self.param
        self.execute(
            "INSERT INTO filedock_imports (job_id, route, table_name, sha256, encoding,"
            " rows_imported, rows_failed, rows_total, finished_at)"
            f" VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {self.now})",
            (job.id, job.route, self.settings.table, job.sha256, encoding, imported, failed,
             imported + failed),
        )  # fmt: skip

    def start(self, plan: _Plan) -> None:
        """Check the table can take the file's columns in this mode; prepare the writes."""
        name = self.settings.table
        existing = self.column_names()
        if existing is None:
            raise Reject(f"table {name!r} does not exist (create it, or set create_table: true)")
        missing = [c for c in plan.columns if c not in existing]
        if missing:
            raise Reject(f"table {name!r} has no column {', '.join(missing)}")
        key = set(self.settings.key)
        if key and self.mode in ("create", "upsert") and key not in self.unique_keys():
            raise Reject(
                f"table {name!r} needs a primary key or unique index on exactly"
                f" ({', '.join(self.settings.key)}) for mode {self.mode}"
            )
        self.columns, self.key = plan.columns, plan.key
        self._prepare_writes(plan)

    def stream(self, checked: _Checked) -> None:
        """Send a chunk's rows; their verdict comes from the next `settle`."""
        self._streamed.append(checked)

    def settle(self) -> list[dict[int, str]]:
        """The failed rows of each chunk streamed since the last call, in order."""
        parts, self._streamed = self._streamed, []
        return [self.apply(checked.rows) if checked.count else {} for checked in parts]

    def apply(self, rows: list[Row]) -> dict[int, str]:
        """Apply a chunk in one go; the failed rows' reasons by position.

        When the database refuses the chunk (a duplicate key, a constraint the settings do
        not know), halve it until the refused rows stand alone: a few refusals cost a few
        more statements, not one statement per row.
        """
        errors: dict[int, str] = {}
        pending = [rows]
        while pending:
            part = pending.pop()
            self.execute("SAVEPOINT filedock_chunk")
            try:
                errors.update(self._write(part))
            except self.row_errors as e:
                self.execute("ROLLBACK TO SAVEPOINT filedock_chunk")
                self.execute("RELEASE SAVEPOINT filedock_chunk")
                if len(part) == 1:
                    errors[part[0][0]] = self._refusal(e, part[0][1])
                else:  # the first half goes first: rows keep their order
                    half = len(part) // 2
                    pending += [part[half:], part[:half]]
                continue
            self.execute("RELEASE SAVEPOINT filedock_chunk")
        return errors

    def _refusal(self, error: Exception, values: Sequence[Any]) -> str:
        if self.mode == "create" and self.key and self.is_duplicate(error):
            match = " AND ".join(f"{_q(self.columns[i])} = {self.param}" for i in self.key)
            found = self.execute(
                f"SELECT 1 FROM {self.table} WHERE {match}", [values[i] for i in self.key]
            )
            if found:
                return f"key {self._key_text(values)} already exists"
        return f"refused by the database: {_first_line(error)}"

    def _key_text(self, values: Sequence[Any]) -> str:
        return ", ".join(f"{self.columns[i]}={values[i]!r}" for i in self.key)

    def _not_found(self, rows: list[Row], found: set[int]) -> dict[int, str]:
        return {n: f"key {self._key_text(v)} not found" for n, v in rows if n not in found}


class _SqliteBackend(_Backend):
    param = "?"
    now = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
    # decimals are text: exact (a NUMERIC column would turn them into floats)
    types: ClassVar[dict[str, str]] = {
        "str": "TEXT", "int": "INTEGER", "decimal": "TEXT",
        "bool": "INTEGER", "date": "TEXT", "datetime": "TEXT",
    }  # fmt: skip
    row_errors = (sqlite3.IntegrityError, sqlite3.DataError)
    _TRANSIENT: Final = ("locked", "busy", "unable to open", "disk i/o", "full")

    def __init__(self, settings: CsvSqlImporterSettings) -> None:
        super().__init__(settings)
        path = settings.database_url.removeprefix("sqlite:///")
        try:
            self.conn = sqlite3.connect(path, timeout=_SQLITE_BUSY_S, isolation_level=None)
        except sqlite3.OperationalError as e:
            raise Retry(f"cannot open {path}: {e}") from e
        self._sql = ""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")  # take the write lock now, not mid-import

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def close(self) -> None:
        self.conn.close()

    def is_transient(self, error: BaseException) -> bool:
        text = str(error).lower()
        return isinstance(error, sqlite3.OperationalError) and any(
            word in text for word in self._TRANSIENT
        )

    def is_duplicate(self, error: Exception) -> bool:
        return isinstance(error, sqlite3.IntegrityError) and "UNIQUE" in str(error)

    def table_exists(self, name: str) -> bool:
        sql = "SELECT 1 FROM main.sqlite_master WHERE type = 'table' AND name = ?"
        return bool(self.execute(sql, (name,)))

    def column_names(self) -> list[str] | None:
        rows = self.execute(f"PRAGMA main.table_info({self.table})")
        return [row[1] for row in rows] if rows else None

    def unique_keys(self) -> list[set[str]]:
        info = self.execute(f"PRAGMA main.table_info({self.table})")
        keys = [{row[1] for row in info if row[5]}]
        for _, index, unique, _, partial in self.execute(f"PRAGMA main.index_list({self.table})"):
            if unique and not partial:
                keys.append({row[2] for row in self.execute(f"PRAGMA index_info({_q(index)})")})
        return keys

    def _prepare_writes(self, plan: _Plan) -> None:
        # numbered parameters: every statement takes the values in `columns` order
        cols = [_q(c) for c in self.columns]
        at = {c: f"?{i}" for i, c in enumerate(self.columns, 1)}
        where = " AND ".join(f"{_q(self.columns[i])} = {at[self.columns[i]]}" for i in self.key)
        sets = [f"{_q(c)} = {at[c]}" for c in self.columns if c not in self.settings.key]
        insert = f"INSERT INTO {self.table} ({', '.join(cols)}) VALUES ({', '.join(at.values())})"
        if self.mode == "create":
            self._sql = insert
        elif self.mode == "upsert":
            keys = ", ".join(_q(k) for k in self.settings.key)
            action = f"DO UPDATE SET {', '.join(sets)}" if sets else "DO NOTHING"
            self._sql = f"{insert} ON CONFLICT ({keys}) {action}"
        elif self.mode == "update":
            self._sql = (
                f"UPDATE {self.table} SET {', '.join(sets)} WHERE {where}"
                if sets
                else f"SELECT count(*) FROM {self.table} WHERE {where}"
            )
        else:
            self._sql = f"DELETE FROM {self.table} WHERE {where}"

    def _write(self, rows: list[Row]) -> dict[int, str]:
        if self.mode in ("create", "upsert"):
            self.conn.executemany(self._sql, [values for _, values in rows])
            return {}
        # update and remove: a statement per row, to know which keys were not found
        execute, found = self.conn.execute, set()
        counting = self._sql.startswith("SELECT")
        for n, values in rows:
            cursor = execute(self._sql, values)
            if (cursor.fetchone()[0] if counting else cursor.rowcount) > 0:
                found.add(n)
        return self._not_found(rows, found)

    def record_errors(self, job_id: str, errors: list[tuple[int, str]]) -> None:
        self.conn.executemany(
            "INSERT INTO filedock_import_errors (job_id, line, error) VALUES (?, ?, ?)",
            [(job_id, line, message) for line, message in errors],
        )

    def recorded_errors(self, job_id: str) -> Generator[tuple[int, str], None, None]:
        cursor = self.conn.execute(
            "SELECT line, error FROM filedock_import_errors WHERE job_id = ? ORDER BY line",
            (job_id,),
        )
        for line, message in cursor:
            yield int(line), str(message)
