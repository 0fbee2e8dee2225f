"""The built-in `csv-sql` importer: a CSV's rows into a SQL table, failed rows set aside.

Kofa's split: the rows that pass validation and the database are committed in one
transaction; the others go to `<stem>.pending<suffix>` with an `import_error` column,
ready to be fixed and dropped again. The job id is the idempotency key: the same
transaction records the job in `filedock_imports` (and its failed lines in
`filedock_import_errors`), so a re-run after a crash either finds no record and imports,
or finds it and only writes the output files again, from the recorded errors.

Memory does not grow with the file: the CSV is read a line at a time, rows go to the
database in chunks of `chunk_rows` (each loaded into a staging table and applied with a
few set-wise statements), and the output files are written as rows are decided.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import os
import re
import sqlite3
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Final, TextIO

import anyio
import anyio.from_thread
import anyio.to_thread

from service.errors import Reject, Retry
from service.importers.base import ImportJob, Result
from service.settings import CsvColumn, CsvSqlImporterSettings

if TYPE_CHECKING:
    import psycopg

__all__ = ["ERROR_COLUMN", "CsvSqlImporter"]

ERROR_COLUMN: Final = "import_error"
_MAX_RECORD: Final = 1 << 20  # characters in one record: bounds memory on a file without newlines
_KEEP_RAW: Final = 4096  # characters of an over-long record kept in the pending file
_LOG_ERRORS: Final = 20
_SQLITE_BUSY_S: Final = 30.0
_PG_CONNECT_TIMEOUT_S: Final = 10
_INT_RE: Final = re.compile(r"[+-]?[0-9]+")
_DECIMAL_RE: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})

Row = tuple[int, list[Any]]  # (position in the chunk, converted values)


# --- values --------------------------------------------------------------------------------


class _CellError(Exception):
    """A value broke its column's rules; the message is the reason."""


def _show(raw: str) -> str:
    return repr(raw if len(raw) <= 40 else raw[:37] + "...")


def _parse_int(text: str) -> int:
    if _INT_RE.fullmatch(text) is None:
        raise _CellError(f"not an integer: {_show(text)}")
    value = int(text) if len(text) <= 21 else 1 << 63  # int() refuses 4300+ digits
    if not -(1 << 63) <= value < 1 << 63:
        raise _CellError(f"outside the 64-bit integer range: {_show(text)}")
    return value


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _CellError(f"not a boolean (true/false, 1/0, yes/no): {_show(text)}")


def _parse_date(text: str) -> str:
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise _CellError(f"not an ISO date (YYYY-MM-DD): {_show(text)}") from None


def _parse_datetime(text: str) -> str:
    """ISO 8601, stored in UTC; a value without an offset is taken as UTC."""
    try:
        value = datetime.fromisoformat(text)
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (ValueError, OverflowError):
        raise _CellError(f"not an ISO 8601 date-time: {_show(text)}") from None
    return value.isoformat()


def _decimal_parser(precision: int | None, scale: int | None) -> Callable[[str], str]:
    """Plain decimal notation, kept exact as text (no float ever sees it, no rounding)."""

    def parse(text: str) -> str:
        if _DECIMAL_RE.fullmatch(text) is None:
            raise _CellError(f"not a decimal number: {_show(text)}")
        if precision is not None:
            whole, _, fraction = text.lstrip("+-").partition(".")
            places = len(fraction.rstrip("0"))
            if places > (scale or 0):
                raise _CellError(f"more than {scale or 0} decimal places: {_show(text)}")
            if len(whole.lstrip("0")) > precision - (scale or 0):
                digits = precision - (scale or 0)
                raise _CellError(f"more than {digits} digits before the point: {_show(text)}")
        return format(Decimal(text), "f")

    return parse


_PARSERS: Final[dict[str, Callable[[str], Any]]] = {
    "int": _parse_int,
    "bool": _parse_bool,
    "date": _parse_date,
    "datetime": _parse_datetime,
}


def _converter(column: CsvColumn, *, required: bool) -> Callable[[str], Any]:
    """One column's check and conversion: an empty value is NULL (or `required`)."""
    parse = (
        _decimal_parser(column.precision, column.scale)
        if column.type == "decimal"
        else _PARSERS.get(column.type)
    )
    strip = column.type != "str"
    max_length = column.max_length
    match = re.compile(column.pattern).fullmatch if column.pattern is not None else None
    choices = frozenset(column.choices) if column.choices is not None else None

    def convert(raw: str) -> Any:
        text = raw.strip() if strip else raw
        if not text:
            if required:
                raise _CellError("required")
            return None
        if max_length is not None and len(text) > max_length:
            raise _CellError(f"longer than {max_length} characters: {_show(text)}")
        if match is not None and match(text) is None:
            raise _CellError(f"does not match the pattern {column.pattern!r}: {_show(text)}")
        if choices is not None and text not in choices:
            raise _CellError(f"not one of the choices: {_show(text)}")
        return text if parse is None else parse(text)

    return convert


# --- reading -------------------------------------------------------------------------------


class _TooLong(Exception):
    """A record grew past `_MAX_RECORD` characters (e.g. a file without line breaks)."""


class _Lines:
    """The file's physical lines for `csv.reader`: counted, bounded, checked, remembered.

    A class, not a generator: an exception raised here reaches the caller of the reader
    and leaves both usable (the reader starts a fresh record on its next call).
    """

    def __init__(self, text: TextIO, *, check_decoding: bool) -> None:
        self._readline = text.readline
        self._text = text
        self._check = check_decoding
        self.number = 0
        self.raw: list[str] = []
        self.size = 0
        self.undecodable = False

    def start_record(self) -> None:
        self.raw = []
        self.size = 0
        self.undecodable = False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self._readline(_MAX_RECORD - self.size + 1)
        if not line:
            raise StopIteration
        self.number += 1
        self.size += len(line)
        if self.size > _MAX_RECORD:
            self.raw.append(line[:_KEEP_RAW])
            if line[-1] not in "\r\n":  # drop the rest of this line, a piece at a time
                while (rest := self._readline(_MAX_RECORD)) and rest[-1] not in "\r\n":
                    pass
            raise _TooLong
        if self._check and not line.isascii():
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: bytes the encoding could not decode
                self.undecodable = True
        self.raw.append(line)
        return line


Record = tuple[int, list[str], str | None]  # (first line, fields, why it is malformed)


class _Source:
    """One pass over the CSV: the header, then the non-blank records with their first line."""

    def __init__(
        self, path: Path, settings: CsvSqlImporterSettings, encoding: str, *, check_decoding: bool
    ) -> None:
        self.encoding = encoding
        self._file = open(
            path, encoding=encoding, errors="surrogateescape", newline="", buffering=1 << 20
        )
        self.lines = _Lines(self._file, check_decoding=check_decoding)
        self._reader = csv.reader(
            self.lines, delimiter=settings.delimiter, quotechar=settings.quotechar, strict=True
        )
        self.width = 0

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next(self) -> Record | None:
        lines = self.lines
        lines.start_record()
        first = lines.number + 1
        try:
            fields = next(self._reader)
        except StopIteration:
            return None
        except csv.Error as e:
            reason = str(e)
            if reason == "unexpected end of data":
                reason = "unterminated quoted field (it runs to the end of the file)"
            return first, [_raw_text(lines.raw)], f"malformed CSV: {reason}"
        except _TooLong:
            return first, [_raw_text(lines.raw)], f"record longer than {_MAX_RECORD} characters"
        if lines.undecodable:
            return first, fields, f"bytes that are not valid {self.encoding}"
        return first, fields, None

    def header(self) -> list[str]:
        """The first non-blank record, stripped; `Reject` when there is none or it is broken."""
        while (record := self._next()) is not None:
            line, fields, problem = record
            if problem is not None:
                raise Reject(f"line {line}: the header is unreadable: {problem}")
            if any(name.strip() for name in fields):
                self.width = len(fields)
                return [name.strip() for name in fields]
        raise Reject("empty file: no header")

    def records(self) -> Iterator[Record]:
        """The records after the header; blank lines are skipped and not counted."""
        width = self.width
        while (record := self._next()) is not None:
            fields = record[1]
            if len(fields) != width and record[2] is None:
                if not fields or (len(fields) == 1 and width > 1 and not fields[0].strip()):
                    continue
            yield record


def _raw_text(lines: list[str]) -> str:
    text = "".join(lines)
    return text.rstrip("\r\n") if len(text) <= _KEEP_RAW else text[:_KEEP_RAW]


def _choose_encoding(path: Path, settings: CsvSqlImporterSettings) -> tuple[str, bool]:
    """The first encoding that decodes the whole file, and whether rows still need checking.

    With no fallback there is nothing to choose: undecodable bytes become row errors.
    When every candidate fails, the first one is used, with the same row errors.
    """
    candidates = [settings.encoding, *settings.fallback_encodings]
    if len(candidates) == 1:
        return settings.encoding, True
    for encoding in candidates:
        decoder = codecs.getincrementaldecoder(encoding)()
        try:
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    decoder.decode(block)
                decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            continue
        return encoding, False
    return settings.encoding, True


# --- the header's plan -----------------------------------------------------------------------


@dataclass
class _Plan:
    """How the file's columns feed the table, decided once from its header."""

    header: list[str]  # the output files' header: the input's, without `import_error`
    width: int  # fields in an input row
    columns: list[str]  # target columns fed by this file, in the configured order
    key: list[int]  # positions of the key columns in `columns`
    cells: list[tuple[int, str, Callable[[str], Any]]]
    drop: int | None  # position of an input `import_error` column
    ignored: list[str] = field(default_factory=list)

    def validate(self, fields: list[str]) -> tuple[list[Any] | None, str | None]:
        values: list[Any] = []
        problems: list[str] | None = None
        for index, name, convert in self.cells:
            try:
                values.append(convert(fields[index]))
            except _CellError as e:
                if problems is None:
                    problems = []
                problems.append(f"{name}: {e}")
        if problems is not None:
            return None, "; ".join(problems)
        return values, None

    def finished_row(self, fields: list[str]) -> list[str]:
        drop = self.drop
        return fields if drop is None else fields[:drop] + fields[drop + 1 :]

    def pending_row(self, fields: list[str], message: str) -> list[str]:
        """The row with its error in the `import_error` column; extra fields follow it."""
        if self.drop is not None and len(fields) == self.width:
            fields = self.finished_row(fields)
        n = len(self.header)
        return [*fields[:n], *[""] * (n - len(fields)), message, *fields[n:]]


def _plan(settings: CsvSqlImporterSettings, header: list[str]) -> _Plan:
    fed: dict[str, int] = {}
    ignored: list[str] = []
    drop: int | None = None
    for index, name in enumerate(header):
        target = settings.header_map.get(name, name if name in settings.columns else None)
        if name == ERROR_COLUMN:
            drop = index
        elif target is None:
            ignored.append(name)
        elif target in fed:
            raise Reject(f"the header feeds column {target!r} twice (header: {header!r})")
        else:
            fed[target] = index
    needed = set(settings.key)
    if settings.mode in ("create", "upsert"):
        needed |= {name for name, column in settings.columns.items() if column.required}
    missing = sorted(needed - fed.keys())
    if missing:
        raise Reject(f"the header has no column for {', '.join(missing)} (header: {header!r})")
    used = settings.key if settings.mode == "remove" else [c for c in settings.columns if c in fed]
    cells = [
        (fed[name], name, _converter(settings.columns[name], required=_required(settings, name)))
        for name in used
    ]
    return _Plan(
        header=[name for index, name in enumerate(header) if index != drop],
        width=len(header),
        columns=list(used),
        key=[used.index(k) for k in settings.key],
        cells=cells,
        drop=drop,
        ignored=ignored,
    )


def _required(settings: CsvSqlImporterSettings, name: str) -> bool:
    return settings.columns[name].required or name in settings.key


# --- output files ----------------------------------------------------------------------------


class _Outputs:
    """`<stem>.finished<suffix>` and `<stem>.pending<suffix>`, written as rows are decided.

    Nothing is written while every row succeeds (the archived source says it all). At the
    first failed row both files start, and the finished file is backfilled by reading the
    rows before it again: all of them were imported. Files are written under a temporary
    name and renamed by `publish`, after the database commit.
    """

    def __init__(
        self,
        job: ImportJob,
        settings: CsvSqlImporterSettings,
        plan: _Plan,
        encoding: str,
        backfill: Callable[[int], Iterator[list[str]]],
    ) -> None:
        stem, suffix = job.path.stem, job.path.suffix or ".csv"
        self.out_dir = job.out_dir
        self.finished = job.out_dir / f"{stem}.finished{suffix}"
        self.pending = job.out_dir / f"{stem}.pending{suffix}"
        self._settings = settings
        self._plan = plan
        self._encoding = encoding
        self._backfill = backfill
        self._files: list[TextIO] = []
        self._finished: Any = None  # csv writers (the type is private to the csv module)
        self._pending: Any = None
        self.first_errors: list[str] = []
        for path in (self.finished, self.pending):
            _part(path).unlink(missing_ok=True)  # left by an attempt that crashed

    def good(self, fields: list[str]) -> None:
        if self._finished is not None:
            self._finished.writerow(self._plan.finished_row(fields))

    def bad(self, line: int, fields: list[str], message: str) -> None:
        if self._pending is None:
            self._start(line)
        if len(self.first_errors) < _LOG_ERRORS:
            self.first_errors.append(message)
        if not message.isascii():  # the message must survive the source's encoding
            message = message.encode(self._encoding, "backslashreplace").decode(self._encoding)
        self._pending.writerow(self._plan.pending_row(fields, message))

    def _start(self, line: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._finished = self._open(self.finished)
        self._pending = self._open(self.pending)
        self._finished.writerow(self._plan.header)
        self._pending.writerow([*self._plan.header, ERROR_COLUMN])
        for fields in self._backfill(line):
            self._finished.writerow(self._plan.finished_row(fields))

    def _open(self, path: Path) -> Any:
        f = open(_part(path), "w", encoding=self._encoding, errors="surrogateescape", newline="")
        self._files.append(f)
        settings = self._settings
        return csv.writer(f, delimiter=settings.delimiter, quotechar=settings.quotechar)

    def close(self) -> None:
        """Flush and fsync: the files are complete before the database commits."""
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())
            f.close()

    def publish(self, *, finished: bool = True) -> Path | None:
        """Rename the files to their final names; the pending file's path, if there is one."""
        if self._pending is None:
            return None
        if finished:
            os.replace(_part(self.finished), self.finished)
        else:
            _part(self.finished).unlink(missing_ok=True)
        os.replace(_part(self.pending), self.pending)
        fd = os.open(self.out_dir, os.O_RDONLY)
        try:
            os.fsync(fd)  # the renames survive a crash
        finally:
            os.close(fd)
        return self.pending

    def discard(self) -> None:
        for f in self._files:
            f.close()
        for path in (self.finished, self.pending):
            _part(path).unlink(missing_ok=True)


def _part(path: Path) -> Path:
    return path.with_name(f".{path.name}.part")


# --- databases -------------------------------------------------------------------------------


def _q(name: str) -> str:
    """A quoted SQL identifier (names are also checked to be plain identifiers by settings)."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class _Recorded:
    rows_imported: int
    rows_failed: int
    rows_total: int
    finished_at: str


@dataclass(frozen=True)
class _Statements:
    """The set-wise SQL applying one staged chunk in the configured mode."""

    errors: str | None  # positions of staged rows that fail on the table's content
    reason: str
    apply: list[str]


class _Backend:
    """The SQL of one import; subclasses bring the driver (sqlite3, psycopg)."""

    stage: str
    param: str
    now: str
    types: ClassVar[dict[str, str]]
    row_errors: tuple[type[Exception], ...]

    def __init__(self, settings: CsvSqlImporterSettings) -> None:
        self.settings = settings
        self.table = _q(settings.table)
        self.statements = _Statements(None, "", [])
        self.key: list[int] = []
        self.columns: list[str] = []

    # driver primitives
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

    def column_names(self) -> list[str] | None:
        """The target table's columns, or None when it does not exist."""
        raise NotImplementedError

    def _create_stage(self, columns: list[str]) -> None:
        raise NotImplementedError

    def _load_stage(self, rows: list[Row]) -> None:
        raise NotImplementedError

    def record_errors(self, job_id: str, errors: list[tuple[int, str]]) -> None:
        raise NotImplementedError

    def recorded_errors(self, job_id: str) -> Generator[tuple[int, str], None, None]:
        raise NotImplementedError

    # shared SQL
    def table_exists(self, name: str) -> bool:
        raise NotImplementedError

    def ddl(self) -> list[tuple[str, str]]:
        """(table, CREATE statement) for the bookkeeping tables and, if asked, the target."""
        big, ts = self.types["int"], self.types["datetime"]
        statements = [
            ("filedock_imports", "CREATE TABLE filedock_imports (job_id TEXT PRIMARY KEY,"
            " route TEXT NOT NULL, table_name TEXT NOT NULL, sha256 TEXT NOT NULL,"
            f" encoding TEXT NOT NULL, rows_imported {big} NOT NULL, rows_failed {big} NOT NULL,"
            f" rows_total {big} NOT NULL, finished_at {ts} NOT NULL)"),
            ("filedock_import_errors", "CREATE TABLE filedock_import_errors (job_id TEXT NOT NULL,"
            f" line {big} NOT NULL, error TEXT NOT NULL, PRIMARY KEY (job_id, line))"),
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
        """Check the table has the file's columns, create the staging table, build the SQL."""
        existing = self.column_names()
        if existing is None:
            raise Reject(
                f"table {self.settings.table!r} does not exist"
                " (create it, or set create_table: true)"
            )
        missing = [c for c in plan.columns if c not in existing]
        if missing:
            raise Reject(f"table {self.settings.table!r} has no column {', '.join(missing)}")
        self.columns, self.key = plan.columns, plan.key
        self._create_stage(plan.columns)
        self.statements = self._statements(plan.columns)

    def _statements(self, columns: list[str]) -> _Statements:
        t, s, mode = self.table, self.stage, self.settings.mode
        keys = ", ".join(_q(k) for k in self.settings.key)
        match = " AND ".join(f"t.{_q(k)} = s.{_q(k)}" for k in self.settings.key)
        cols = ", ".join(_q(c) for c in columns)
        s_cols = ", ".join(f"s.{_q(c)}" for c in columns)
        exists = f"SELECT s._n FROM {s} s WHERE EXISTS (SELECT 1 FROM {t} t WHERE {match})"
        absent = exists.replace("WHERE EXISTS", "WHERE NOT EXISTS")
        later = (
            f"SELECT d._n FROM (SELECT _n, row_number() OVER (PARTITION BY {keys} ORDER BY _n)"
            f" AS rn FROM {s}) d WHERE d.rn > 1"
        )
        earlier = later.replace("ORDER BY _n)", "ORDER BY _n DESC)")
        keep_last = f"DELETE FROM {s} WHERE _n IN ({earlier})"
        insert = f"INSERT INTO {t} ({cols}) SELECT {s_cols} FROM {s} s"
        sets = ", ".join(f"{_q(c)} = s.{_q(c)}" for c in columns if c not in self.settings.key)
        update = [f"UPDATE {t} AS t SET {sets} FROM {s} AS s WHERE {match}"] if sets else []
        if mode == "create" and not keys:
            return _Statements(None, "", [f"{insert} ORDER BY s._n"])
        if mode == "create":
            return _Statements(
                f"{exists} UNION {later}", "already exists", [f"{insert} ORDER BY s._n"]
            )
        if mode == "upsert":
            new = f"{insert} WHERE NOT EXISTS (SELECT 1 FROM {t} t WHERE {match}) ORDER BY s._n"
            return _Statements(None, "", [keep_last, *update, new])
        if mode == "update":
            return _Statements(absent, "not found", [keep_last, *update])
        remove = f"DELETE FROM {t} WHERE ({keys}) IN (SELECT {keys} FROM {s})"
        return _Statements(f"{absent} UNION {later}", "not found", [remove])

    def apply(self, rows: list[Row]) -> dict[int, str]:
        """Apply a chunk; the failed rows' positions and reasons.

        Set-wise first; when the database refuses the chunk (a constraint the settings do
        not know, a value out of a column's range), row by row to find the culprits.
        """
        self.execute("SAVEPOINT filedock_chunk")
        try:
            errors = self._apply(rows)
        except self.row_errors:
            self.execute("ROLLBACK TO SAVEPOINT filedock_chunk")
            errors = {}
            for row in rows:
                self.execute("SAVEPOINT filedock_row")
                try:
                    errors.update(self._apply([row]))
                except self.row_errors as e:
                    self.execute("ROLLBACK TO SAVEPOINT filedock_row")
                    errors[row[0]] = f"refused by the database: {_first_line(e)}"
                self.execute("RELEASE SAVEPOINT filedock_row")
        self.execute("RELEASE SAVEPOINT filedock_chunk")
        return errors

    def _apply(self, rows: list[Row]) -> dict[int, str]:
        self._load_stage(rows)
        errors: dict[int, str] = {}
        statements = self.statements
        if statements.errors is not None:
            found = self.execute(statements.errors)
            if found:
                values = dict(rows)
                for (n,) in found:
                    errors[n] = f"key {self._key_text(values[n])} {statements.reason}"
                self.execute(f"DELETE FROM {self.stage} WHERE _n IN ({statements.errors})")
        for statement in statements.apply:
            self.execute(statement)
        return errors

    def _key_text(self, values: list[Any]) -> str:
        return ", ".join(f"{self.columns[i]}={values[i]!r}" for i in self.key)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class _SqliteBackend(_Backend):
    stage = "temp.filedock_stage"
    param = "?"
    now = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
    # decimals, dates and times are text: exact, and ISO text sorts in time order
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
        self.conn.execute("PRAGMA temp_store = MEMORY")

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

    def table_exists(self, name: str) -> bool:
        sql = "SELECT 1 FROM main.sqlite_master WHERE type = 'table' AND name = ?"
        return bool(self.execute(sql, (name,)))

    def column_names(self) -> list[str] | None:
        try:
            cursor = self.conn.execute(f"SELECT * FROM main.{self.table} WHERE 0")
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return None
            raise
        return [d[0] for d in cursor.description]

    def _create_stage(self, columns: list[str]) -> None:
        cols = "".join(f", {_q(c)}" for c in columns)
        self.execute(f"CREATE TEMP TABLE filedock_stage (_n INTEGER PRIMARY KEY{cols})")
        marks = ", ".join("?" * (len(columns) + 1))
        self._insert = f"INSERT INTO {self.stage} VALUES ({marks})"

    def _load_stage(self, rows: list[Row]) -> None:
        self.conn.execute(f"DELETE FROM {self.stage}")
        self.conn.executemany(self._insert, [(n, *values) for n, values in rows])

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


class _PostgresBackend(_Backend):
    stage = "pg_temp.filedock_stage"
    param = "%s"
    now = "now()"
    types: ClassVar[dict[str, str]] = {
        "str": "TEXT", "int": "BIGINT", "decimal": "NUMERIC",
        "bool": "BOOLEAN", "date": "DATE", "datetime": "TIMESTAMPTZ",
    }  # fmt: skip

    def __init__(self, settings: CsvSqlImporterSettings) -> None:
        super().__init__(settings)
        import psycopg  # lazily: a SQLite-only deployment never loads the driver

        self._pg: ModuleType = psycopg
        self.row_errors = (psycopg.IntegrityError, psycopg.DataError)
        try:
            self.conn: psycopg.Connection[tuple[Any, ...]] = psycopg.connect(
                settings.database_url, connect_timeout=_PG_CONNECT_TIMEOUT_S
            )
        except psycopg.OperationalError as e:
            raise Retry(f"cannot connect to the database: {_first_line(e)}") from e

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = self.conn.execute(sql.encode(), params or None)
        return cursor.fetchall() if cursor.description is not None else []

    def begin(self) -> None:
        """psycopg opens a transaction with the first statement."""

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    def close(self) -> None:
        self.conn.close()

    def is_transient(self, error: BaseException) -> bool:
        return isinstance(error, (self._pg.OperationalError, self._pg.InterfaceError))

    def _type(self, column: CsvColumn) -> str:
        if column.type == "decimal" and column.precision is not None:
            return f"NUMERIC({column.precision}, {column.scale or 0})"
        return self.types[column.type]

    def prepare(self) -> None:
        # Two imports creating the same table at once: one of them loses with a
        # unique violation on the catalog; the table exists then, so run it again.
        for attempt in (1, 2):
            try:
                super().prepare()
                return
            except (self._pg.errors.UniqueViolation, self._pg.errors.DuplicateTable):
                self.rollback()
                if attempt == 2:
                    raise

    def table_exists(self, name: str) -> bool:
        return bool(self.execute("SELECT to_regclass(%s) IS NOT NULL", (_q(name),))[0][0])

    def column_names(self) -> list[str] | None:
        self.execute("SAVEPOINT filedock_probe")
        try:
            cursor = self.conn.execute(f"SELECT * FROM {self.table} WHERE false".encode())
        except self._pg.errors.UndefinedTable:
            self.execute("ROLLBACK TO SAVEPOINT filedock_probe")
            return None
        self.execute("RELEASE SAVEPOINT filedock_probe")
        return [d.name for d in cursor.description or ()]

    def _create_stage(self, columns: list[str]) -> None:
        # The target's own column types: COPY parses the values as the table would.
        cols = ", ".join(_q(c) for c in columns)
        self.execute(
            f"CREATE TEMP TABLE filedock_stage ON COMMIT DROP AS"
            f" SELECT {cols} FROM {self.table} WITH NO DATA"
        )
        self.execute(f"ALTER TABLE {self.stage} ADD COLUMN _n integer")
        self._copy = f"COPY {self.stage} (_n, {cols}) FROM STDIN".encode()

    def _load_stage(self, rows: list[Row]) -> None:
        self.execute(f"TRUNCATE {self.stage}")
        with self.conn.cursor().copy(self._copy) as copy:
            for n, values in rows:
                copy.write_row((n, *values))

    def record_errors(self, job_id: str, errors: list[tuple[int, str]]) -> None:
        if not errors:
            return
        sql = b"COPY filedock_import_errors (job_id, line, error) FROM STDIN"
        with self.conn.cursor().copy(sql) as copy:
            for line, message in errors:
                copy.write_row((job_id, line, message))

    def recorded_errors(self, job_id: str) -> Generator[tuple[int, str], None, None]:
        with self.conn.cursor(name="filedock_errors") as cursor:  # server-side: streamed
            cursor.itersize = 2000
            cursor.execute(
                b"SELECT line, error FROM filedock_import_errors WHERE job_id = %s ORDER BY line",
                (job_id,),
            )
            for line, message in cursor:
                yield int(line), str(message)


def _connect(settings: CsvSqlImporterSettings) -> _Backend:
    if settings.database_url.startswith("sqlite:///"):
        return _SqliteBackend(settings)
    return _PostgresBackend(settings)


# --- one import ------------------------------------------------------------------------------


@dataclass
class _Run:
    """One import attempt, in a worker thread: read, validate, write, record, commit."""

    settings: CsvSqlImporterSettings
    job: ImportJob
    checkpoint: Callable[[], None]
    encoding: str = ""
    check_decoding: bool = True
    imported: int = 0
    failed: int = 0

    def _source(self) -> _Source:
        return _Source(
            self.job.path, self.settings, self.encoding, check_decoding=self.check_decoding
        )

    def __call__(self) -> Result:
        self.encoding, self.check_decoding = _choose_encoding(self.job.path, self.settings)
        with self._source() as source:
            plan = _plan(self.settings, source.header())
            outputs = _Outputs(self.job, self.settings, plan, self.encoding, self._backfill)
            backend = _connect(self.settings)
            try:
                return self._with_database(backend, source, plan, outputs)
            except (Reject, Retry):
                raise
            except Exception as e:
                if backend.is_transient(e):
                    raise Retry(f"database error: {_first_line(e)}") from e
                raise
            finally:
                outputs.discard()
                backend.close()

    def _backfill(self, before: int) -> Iterator[list[str]]:
        with self._source() as again:
            again.header()
            for line, fields, _ in again.records():
                if line >= before:
                    return
                yield fields

    def _with_database(
        self, backend: _Backend, source: _Source, plan: _Plan, outputs: _Outputs
    ) -> Result:
        backend.prepare()
        backend.begin()
        recorded = backend.lookup(self.job.id)
        if recorded is not None:
            backend.rollback()
            return self._replay(backend, source, plan, outputs, recorded)
        backend.start(plan)
        self._import(backend, source, plan, outputs)
        if self.imported == 0 and self.failed > 0:
            backend.rollback()
            outputs.close()
            pending = outputs.publish(finished=False)
            assert pending is not None
            raise Reject(
                f"no row imported: all {self.failed} rows failed; they are in {pending.name}"
                f" (first: {outputs.first_errors[0][:300]})"
            )
        backend.record_job(self.job, self.encoding, self.imported, self.failed)
        outputs.close()
        backend.commit()
        return self._result(outputs, plan, outputs.publish(), replayed=None)

    def _import(self, backend: _Backend, source: _Source, plan: _Plan, outputs: _Outputs) -> None:
        chunk: list[tuple[int, list[str], list[Any] | None, str | None]] = []
        width, size = plan.width, self.settings.chunk_rows
        for line, fields, problem in source.records():
            values = None
            if problem is None:
                if len(fields) != width:
                    problem = f"expected {width} fields, found {len(fields)}"
                else:
                    values, problem = plan.validate(fields)
            chunk.append((line, fields, values, problem))
            if len(chunk) >= size:
                self._flush(backend, outputs, chunk)
                chunk = []
                self.checkpoint()
        if chunk:
            self._flush(backend, outputs, chunk)

    def _flush(
        self,
        backend: _Backend,
        outputs: _Outputs,
        chunk: list[tuple[int, list[str], list[Any] | None, str | None]],
    ) -> None:
        rows = [(n, values) for n, (_, _, values, _) in enumerate(chunk) if values is not None]
        refused = backend.apply(rows) if rows else {}
        errors: list[tuple[int, str]] = []
        for n, (line, fields, _, problem) in enumerate(chunk):
            problem = problem or refused.get(n)
            if problem is None:
                self.imported += 1
                outputs.good(fields)
            else:
                self.failed += 1
                message = f"line {line}: {problem}"
                outputs.bad(line, fields, message)
                errors.append((line, message))
        backend.record_errors(self.job.id, errors)

    def _replay(
        self,
        backend: _Backend,
        source: _Source,
        plan: _Plan,
        outputs: _Outputs,
        recorded: _Recorded,
    ) -> Result:
        """The job was committed before: leave the table alone, write the files again."""
        self.imported, self.failed = recorded.rows_imported, recorded.rows_failed
        pending = None
        if recorded.rows_failed:
            with contextlib.closing(backend.recorded_errors(self.job.id)) as errors:
                failing = next(errors, None)
                for n, (line, fields, _) in enumerate(source.records(), 1):
                    if failing is not None and failing[0] == line:
                        outputs.bad(line, fields, failing[1])
                        failing = next(errors, None)
                    else:
                        outputs.good(fields)
                    if n % self.settings.chunk_rows == 0:
                        self.checkpoint()
            outputs.close()
            pending = outputs.publish()
        return self._result(outputs, plan, pending, replayed=recorded.finished_at)

    def _result(
        self, outputs: _Outputs, plan: _Plan, pending: Path | None, replayed: str | None
    ) -> Result:
        total = self.imported + self.failed
        settings = self.settings
        detail: dict[str, Any] = {
            "rows_imported": self.imported,
            "rows_failed": self.failed,
            "rows_total": total,
            "table": settings.table,
            "mode": settings.mode,
            "encoding": self.encoding,
            "finished_file": outputs.finished.name if pending is not None else None,
            "pending_file": pending.name if pending is not None else None,
            "ignored_headers": plan.ignored,
            "replayed_from": replayed,
        }
        log = [
            f"csv-sql: table={settings.table} mode={settings.mode} encoding={self.encoding}",
            f"rows: imported={self.imported} failed={self.failed} total={total}",
        ]
        if replayed is not None:
            log.append(f"already imported at {replayed}: the table was left alone")
        if plan.ignored:
            log.append(f"headers ignored (no such column): {', '.join(plan.ignored)}")
        log += [f"error: {message[:300]}" for message in outputs.first_errors]
        if pending is None:
            return Result(outcome="imported", detail=detail, log=_log(log))
        first = outputs.first_errors[0][:300] if outputs.first_errors else "see the pending file"
        return Result(
            outcome="partial",
            detail=detail,
            log=_log(log),
            pending=pending,
            message=f"{self.failed} of {total} rows failed; they are in {pending.name}"
            f" (first: {first})",
        )


def _log(lines: list[str]) -> bytes:
    return "\n".join(lines).encode("utf-8", "backslashreplace") + b"\n"


class CsvSqlImporter:
    """The `csv-sql` importer of a route.

    Args:
        settings: the route's importer settings.
        limiter: the thread limiter the blocking work runs under (never anyio's default
            limiter: the service sizes its own).

    Example:
        ```python
        importer = CsvSqlImporter(route.importer, limiter=anyio.CapacityLimiter(4))
        result = await importer(job)  # Result(outcome="partial", pending=...) or raises
        ```
    """

    def __init__(self, settings: CsvSqlImporterSettings, *, limiter: anyio.CapacityLimiter) -> None:
        self.settings = settings
        self._limiter = limiter

    async def __call__(self, job: ImportJob) -> Result:
        """Import the job's CSV; cancelling (e.g. the caller's timeout) rolls back at a chunk."""
        run = _Run(self.settings, job, anyio.from_thread.check_cancelled)
        return await anyio.to_thread.run_sync(run, limiter=self._limiter)

    def __repr__(self) -> str:
        settings = self.settings
        scheme = settings.database_url.split(":", 1)[0]
        return f"CsvSqlImporter(table={settings.table!r}, mode={settings.mode!r}, {scheme})"
