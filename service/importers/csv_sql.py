"""The built-in `csv-sql` importer: a CSV's rows into a SQL table, failed rows set aside.

Kofa's split: the rows that pass validation and the database are committed in one
transaction; the others go to `<stem>.pending<suffix>` with an `import_error` column,
ready to be fixed and dropped again. The job id is the idempotency key: the same
transaction records the job in `filedock_imports` (and its failed lines in
`filedock_import_errors`), so a re-run after a crash either finds no record and imports,
or finds it and only writes the output files again, from the recorded errors.

Memory does not grow with the file: the CSV is read a chunk of `chunk_rows` records at a
time, each chunk is validated column by column and written with one `executemany` or
`COPY`, and the output files are written as rows are decided.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import functools
import itertools
import operator
import os
import re
import sqlite3
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
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
_MAX_LINE: Final = 1 << 23  # characters read at once: a longer line is cut (its pieces fail)
_KEEP_RAW: Final = 4096  # characters of an unparsable record kept in the pending file
_LOG_ERRORS: Final = 20
_SQLITE_BUSY_S: Final = 30.0
_PG_CONNECT_TIMEOUT_S: Final = 10
_PG_WINDOW_ROWS: Final = 8192  # rows one COPY streams before awaiting the server's verdict

# The accepted shapes. Dates and date-times are the ISO 8601 forms SQLite's date functions
# and PostgreSQL both read; the rest of ISO 8601 (week dates, basic format) is refused.
_INT: Final = r"[+-]?[0-9]+"
_DECIMAL: Final = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_DATE: Final = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
_DATETIME: Final = (
    _DATE + r"(?:[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?(?:Z|[+-][0-9]{2}:[0-9]{2})?)?"
)
_BOOL: Final = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_BOOL_ANY_CASE: Final = {
    variant: value
    for text, value in _BOOL.items()
    for variant in (text, text.title(), text.upper())
}

Row = tuple[int, Sequence[Any]]  # (position in the chunk, the values of `_Plan.columns`)


# --- values --------------------------------------------------------------------------------


class _CellError(Exception):
    """A value broke its column's rules; the message is the reason."""


def _show(raw: str) -> str:
    return repr(raw if len(raw) <= 40 else raw[:37] + "...")


def _parse_int(text: str) -> int:
    if re.fullmatch(_INT, text) is None:
        raise _CellError(f"not an integer: {_show(text)}")
    value = int(text) if len(text) <= 21 else 1 << 63  # int() refuses 4300+ digits
    if not -(1 << 63) <= value < 1 << 63:
        raise _CellError(f"outside the 64-bit integer range: {_show(text)}")
    return value


def _parse_bool(text: str) -> bool:
    value = _BOOL.get(text.lower())
    if value is None:
        raise _CellError(f"not a boolean (true/false, 1/0, yes/no): {_show(text)}")
    return value


def _parse_date(text: str) -> str:
    try:
        if re.fullmatch(_DATE, text) is None:
            raise ValueError
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise _CellError(f"not an ISO date (YYYY-MM-DD): {_show(text)}") from None


def _parse_datetime(text: str) -> str:
    """Kept as written: a value without an offset is UTC (the PostgreSQL session is UTC)."""
    try:
        if re.fullmatch(_DATETIME, text) is None:
            raise ValueError
        datetime.fromisoformat(text)
    except ValueError:
        raise _CellError(f"not an ISO 8601 date-time: {_show(text)}") from None
    return text


def _decimal_parser(precision: int | None, scale: int | None) -> Callable[[str], str]:
    """Plain decimal notation, kept exact as text (no float ever sees it, no rounding)."""

    def parse(text: str) -> str:
        if re.fullmatch(_DECIMAL, text) is None:
            raise _CellError(f"not a decimal number: {_show(text)}")
        if precision is not None:
            whole, _, fraction = text.lstrip("+-").partition(".")
            if len(fraction.rstrip("0")) > (scale or 0):
                raise _CellError(f"more than {scale or 0} decimal places: {_show(text)}")
            if len(whole.lstrip("0")) > precision - (scale or 0):
                digits = precision - (scale or 0)
                raise _CellError(f"more than {digits} digits before the point: {_show(text)}")
        return format(Decimal(text), "f")

    return parse


def _converter(column: CsvColumn, *, required: bool) -> Callable[[str], Any]:
    """One value's checks and conversion: an empty value is NULL (or `required`)."""
    parse: Callable[[str], Any] | None = {
        "str": None,
        "int": _parse_int,
        "decimal": _decimal_parser(column.precision, column.scale),
        "bool": _parse_bool,
        "date": _parse_date,
        "datetime": _parse_datetime,
    }[column.type]
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


def _all_shaped(line: str) -> Callable[[Sequence[str]], bool]:
    """Whether every value has the shape: one regex over the joined column, in C."""
    column = re.compile(f"(?:{line})(?:\n(?:{line}))*")

    def check(values: Sequence[str]) -> bool:
        joined = "\n".join(values)
        # a value holding a line break would pass as two: count them
        return column.fullmatch(joined) is not None and joined.count("\n") == len(values) - 1

    return check


def _canonical_decimal(column: CsvColumn) -> str:
    """The decimals `_decimal_parser` returns unchanged, within the column's digits."""
    if column.precision is None:
        return r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?"
    scale = column.scale or 0
    whole = column.precision - scale
    integer = f"(?:0|[1-9][0-9]{{0,{whole - 1}}})" if whole > 0 else "0"
    return "-?" + integer + (f"(?:\\.[0-9]{{1,{scale}}})?" if scale else "")


_NOT_INT_TEXT: Final = re.compile(r"[^0-9+-]")


def _int_characters(values: Sequence[str]) -> bool:
    """Only digits and signs: `int()` then checks the rest of `_INT`. This refuses what
    `int()` takes beyond it (other digits, `1_000`), and spaces, which the rules would see."""
    return _NOT_INT_TEXT.search("".join(values)) is None


def _int64s(values: Sequence[str]) -> list[int]:
    ints = list(map(int, values))
    if ints and not (-(1 << 63) <= min(ints) and max(ints) < 1 << 63):
        raise ValueError("outside the 64-bit range")
    return ints


def _consume(parse: Callable[[str], object]) -> Callable[[Sequence[str]], Sequence[Any]]:
    def check(values: Sequence[str]) -> Sequence[str]:
        deque(map(parse, values), maxlen=0)  # raises on the first invalid value
        return values

    return check


def _fast_path(column: CsvColumn) -> Callable[[Sequence[str]], Sequence[Any] | None]:
    """A whole column of a chunk at C speed; None sends it through `_converter` value by value.

    It accepts only values `_converter` accepts, and converts them to the same values.
    """
    shape = {
        "str": None,
        "int": _int_characters,
        "decimal": _all_shaped(_canonical_decimal(column)),
        "bool": None,
        "date": _all_shaped(_DATE),
        "datetime": _all_shaped(_DATETIME),
    }[column.type]
    convert: Callable[[Sequence[str]], Sequence[Any]] = {
        "str": lambda values: values,
        "int": _int64s,
        "decimal": lambda values: values,
        "bool": lambda values: list(map(_BOOL_ANY_CASE.__getitem__, values)),
        "date": _consume(date.fromisoformat),
        "datetime": _consume(datetime.fromisoformat),
    }[column.type]
    checks: list[Callable[[Sequence[str]], bool]] = []
    if column.max_length is not None:
        limit = column.max_length
        checks.append(lambda values: max(map(len, values)) <= limit)
    if column.pattern is not None:
        match = re.compile(column.pattern).fullmatch
        checks.append(lambda values: all(map(match, values)))
    if column.choices is not None:
        checks.append(frozenset(column.choices).issuperset)

    def fast(values: Sequence[str]) -> Sequence[Any] | None:
        if shape is not None and not shape(values):
            return None
        if not all(check(values) for check in checks):
            return None
        try:
            return convert(values)
        except (ValueError, KeyError):
            return None

    return fast


@dataclass
class _Cell:
    """One target column fed by one input column."""

    index: int  # in the input row
    name: str
    one: Callable[[str], Any]
    fast: Callable[[Sequence[str]], Sequence[Any] | None]
    required: bool

    def column(self, values: Sequence[str]) -> Sequence[Any] | None:
        if "" in values:
            if self.required:
                return None
            present = [v for v in values if v]
            converted = self.fast(present) if present else []
            if converted is None:
                return None
            it = iter(converted)
            return [next(it) if v else None for v in values]
        return self.fast(values)


# --- reading -------------------------------------------------------------------------------


class _RawLines:
    """The source's physical lines again, read forward on demand: the text of a record the
    CSV parser could not read goes to the pending file as it was. Requests come in line
    order, so one extra pass at most, and only for files with unreadable records."""

    def __init__(self, path: Path, encoding: str) -> None:
        self._path, self._encoding = path, encoding
        self._file: TextIO | None = None
        self._number = 0

    def text(self, first: int, last: int) -> str:
        if self._file is None:
            self._file = open(  # closed by close()
                self._path, encoding=self._encoding, errors="surrogateescape", newline=""
            )
        readline, kept, size = self._file.readline, list[str](), 0
        while self._number < last and (line := readline(_MAX_LINE)):
            self._number += 1
            if self._number >= first and size < _KEEP_RAW:
                kept.append(line)
                size += len(line)
        text = "".join(kept)
        return text.rstrip("\r\n") if len(text) <= _KEEP_RAW else text[:_KEEP_RAW]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@dataclass
class _Chunk:
    """Consecutive records, column-wise: no Python object per record beyond its fields."""

    lines: list[int]  # where each record starts
    fields: list[list[str]]
    problems: dict[int, str]  # position -> why the record is unreadable

    def __len__(self) -> int:
        return len(self.fields)


class _Source:
    """One pass over the CSV: the header, then chunks of non-blank records.

    `csv.reader` pulls lines straight from `readline` (no Python code per line), at most
    `_MAX_LINE` characters at a time: a file without line breaks cannot fill the memory.
    """

    def __init__(
        self, path: Path, settings: CsvSqlImporterSettings, encoding: str, *, check_decoding: bool
    ) -> None:
        self.encoding = encoding
        self._check = check_decoding
        self._file = open(  # closed on __exit__
            path, encoding=encoding, errors="surrogateescape", newline="", buffering=1 << 20
        )
        lines = iter(functools.partial(self._file.readline, _MAX_LINE), "")
        self._reader = csv.reader(
            lines, delimiter=settings.delimiter, quotechar=settings.quotechar, strict=True
        )
        self._raw = _RawLines(path, encoding)
        self.width = 0

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()
        self._raw.close()

    def header(self) -> list[str]:
        """The first non-blank record, stripped; `Reject` when there is none or it is broken."""
        while True:
            first = self._reader.line_num + 1
            try:
                fields = next(self._reader)
            except StopIteration:
                raise Reject("empty file: no header") from None
            except csv.Error as e:
                raise Reject(f"line {first}: the header is unreadable: {e}") from None
            if self._check and _undecodable(fields):
                raise Reject(f"line {first}: the header has bytes that are not {self.encoding}")
            if any(name.strip() for name in fields):
                self.width = len(fields)
                return [name.strip() for name in fields]

    def read(self, size: int) -> _Chunk:
        """Up to `size` records after the header; blank lines are skipped and not counted."""
        chunk = _Chunk([], [], {})
        while len(chunk) < size and not self._batch(chunk, size - len(chunk)):
            pass
        if self._check and _undecodable(itertools.chain.from_iterable(chunk.fields)):
            for n, fields in enumerate(chunk.fields):
                if n not in chunk.problems and _undecodable(fields):
                    chunk.problems[n] = f"bytes that are not valid {self.encoding}"
        return chunk

    def _batch(self, chunk: _Chunk, want: int) -> bool:
        """Read up to `want` records into the chunk, in C; whether the file has ended.

        `list.extend` keeps the records read before a `csv.Error`. Each record takes one
        line unless a quoted field holds line breaks: only then are lines counted here.
        """
        reader, width = self._reader, self.width
        start, batch, error = reader.line_num, list[list[str]](), None
        try:
            batch.extend(itertools.islice(reader, want))
        except csv.Error as e:
            error = e
        read = len(batch)
        lines: Sequence[int]
        if error is None and reader.line_num - start == read:
            lines = range(start + 1, start + 1 + read)
        else:
            lines = _first_lines(start, batch)
        after = lines[-1] + _line_breaks(batch[-1]) if batch else start
        if set(map(len, batch)) - {width}:  # blank lines (or rows of another width)
            kept = [n for n, fields in enumerate(batch) if not _blank(fields, width)]
            lines, batch = [lines[n] for n in kept], [batch[n] for n in kept]
        chunk.lines.extend(lines)
        chunk.fields.extend(batch)
        if error is None:
            return read < want
        reason = str(error)
        if reason == "unexpected end of data":
            reason = "unterminated quoted field (it runs to the end of the file)"
        chunk.problems[len(chunk)] = f"malformed CSV: {reason}"
        chunk.lines.append(after + 1)
        chunk.fields.append([self._raw.text(after + 1, reader.line_num)])
        return False

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        """(first line, fields) of each record."""
        while chunk := self.read(1000):
            yield from zip(chunk.lines, chunk.fields, strict=True)


def _blank(fields: list[str], width: int) -> bool:
    return not fields or (len(fields) == 1 and width > 1 and not fields[0].strip())


def _line_breaks(fields: list[str]) -> int:
    """The line breaks inside a record's quoted fields, as `readline` splits lines."""
    return sum(f.count("\n") + f.count("\r") - f.count("\r\n") for f in fields)


def _first_lines(start: int, rows: list[list[str]]) -> list[int]:
    """The line each record starts on, the line before the first being `start`."""
    lines, line = [], start
    for fields in rows:
        lines.append(line + 1)
        line += 1 + _line_breaks(fields)
    return lines


def _undecodable(texts: Iterable[str]) -> bool:
    """Whether there are lone surrogates: the bytes `surrogateescape` kept undecoded."""
    joined = "".join(texts)
    if joined.isascii():
        return False
    try:
        joined.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _choose_encoding(path: Path, settings: CsvSqlImporterSettings) -> tuple[str, bool]:
    """The first encoding that decodes the whole file, and whether rows still need checking.

    The file is decoded once ahead, in C, without keeping it: a clean file then needs no
    check per row. When every candidate fails, the first one is used, and the records
    with undecodable bytes become row errors.
    """
    for encoding in [settings.encoding, *settings.fallback_encodings]:
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
    cells: list[_Cell]
    drop: int | None  # position of an input `import_error` column
    ignored: list[str] = field(default_factory=list)

    def validate(self, rows: list[list[str]]) -> tuple[list[Sequence[Any]], dict[int, str], bool]:
        """The values column by column, the reasons of the rows that fail (by position), and
        whether every value was canonical (then the raw text says the same as the values)."""
        if not rows:
            return [[] for _ in self.cells], {}, True
        inputs = list(zip(*rows, strict=True))
        columns: list[Sequence[Any]] = []
        problems: dict[int, list[str]] = {}
        canonical = True
        for cell in self.cells:
            values = cell.column(inputs[cell.index])
            if values is None:
                canonical = False
                values = self._one_by_one(cell, inputs[cell.index], problems)
            columns.append(values)
        return columns, {n: "; ".join(reasons) for n, reasons in problems.items()}, canonical

    @staticmethod
    def _one_by_one(cell: _Cell, raw: Sequence[str], problems: dict[int, list[str]]) -> list[Any]:
        values: list[Any] = []
        for n, text in enumerate(raw):
            try:
                values.append(cell.one(text))
            except _CellError as e:
                values.append(None)
                problems.setdefault(n, []).append(f"{cell.name}: {e}")
        return values

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
    if not used:
        raise Reject(f"the header feeds no column of the table (header: {header!r})")
    cells = []
    for name in used:
        column, required = settings.columns[name], _required(settings, name)
        one = _converter(column, required=required)
        cells.append(_Cell(fed[name], name, one, _fast_path(column), required))
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
        self._finished: Any = None  # csv writers (their type is private to the csv module)
        self._pending: Any = None
        self.first_errors: list[str] = []
        for path in (self.finished, self.pending):
            _part(path).unlink(missing_ok=True)  # left by an attempt that crashed

    def good(self, fields: list[str]) -> None:
        if self._finished is not None:
            self._finished.writerow(self._plan.finished_row(fields))

    def good_many(self, rows: Iterable[list[str]]) -> None:
        if self._finished is not None:
            self._finished.writerows(map(self._plan.finished_row, rows))

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
        f = open(  # closed by close() or discard()
            _part(path), "w", encoding=self._encoding, errors="surrogateescape", newline=""
        )
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
        os.replace(_part(self.pending), self.pending)
        fd = os.open(self.out_dir, os.O_RDONLY)
        try:
            os.fsync(fd)  # the renames survive a crash
        finally:
            os.close(fd)
        return self.pending

    def discard(self) -> None:
        """Remove what was not published (after a failure, or an unwanted finished file)."""
        for f in self._files:
            f.close()
        for path in (self.finished, self.pending):
            _part(path).unlink(missing_ok=True)


def _part(path: Path) -> Path:
    return path.with_name(f".{path.name}.part")


# --- databases -------------------------------------------------------------------------------


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


class _PostgresBackend(_Backend):
    param = "%s"
    now = "now()"
    types: ClassVar[dict[str, str]] = {
        "str": "TEXT", "int": "BIGINT", "decimal": "NUMERIC",
        "bool": "BOOLEAN", "date": "DATE", "datetime": "TIMESTAMPTZ",
    }  # fmt: skip
    _STAGE: Final = "pg_temp.filedock_stage"

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
        # a date-time without an offset is UTC, as in SQLite's date functions
        self.conn.execute(b"SET TIME ZONE 'UTC'")
        self.conn.commit()
        self._copy = b""
        self._statement = b""
        self.window = max(1, _PG_WINDOW_ROWS // settings.chunk_rows)
        self._pick: Callable[[list[str]], tuple[str, ...]] = lambda fields: ()
        self._window: contextlib.ExitStack | None = None
        self._copier: Any = None
        self._refused = False

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

    def is_duplicate(self, error: Exception) -> bool:
        return isinstance(error, self._pg.errors.UniqueViolation)

    def table_exists(self, name: str) -> bool:
        return bool(self.execute("SELECT to_regclass(%s) IS NOT NULL", (_q(name),))[0][0])

    def column_names(self) -> list[str] | None:
        if not self.table_exists(self.settings.table):
            return None
        cursor = self.conn.execute(f"SELECT * FROM {self.table} WHERE false".encode())
        return [d.name for d in cursor.description or ()]

    def unique_keys(self) -> list[set[str]]:
        rows = self.execute(
            "SELECT array_agg(a.attname::text) FROM pg_index i JOIN pg_attribute a"
            " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            " WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indpred IS NULL"
            " GROUP BY i.indexrelid",
            (self.table,),
        )
        return [set(columns) for (columns,) in rows]

    def _prepare_writes(self, plan: _Plan) -> None:
        cols = ", ".join(_q(c) for c in self.columns)
        indexes = [cell.index for cell in plan.cells]
        self._pick = lambda fields: tuple(fields[i] for i in indexes)
        if len(indexes) > 1:  # itemgetter: the same in C
            self._pick = operator.itemgetter(*indexes)
        if self.mode == "create":
            self._copy = f"COPY {self.table} ({cols}) FROM STDIN".encode()
            return
        # the other modes go through a staging table with the target's own column types
        self.execute(
            f"CREATE TEMP TABLE filedock_stage ON COMMIT DROP AS"
            f" SELECT {cols} FROM {self.table} WITH NO DATA"
        )
        self.execute(f"ALTER TABLE {self._STAGE} ADD COLUMN _n integer")
        self._copy = f"COPY {self._STAGE} (_n, {cols}) FROM STDIN".encode()
        keys = ", ".join(_q(k) for k in self.settings.key)
        match = " AND ".join(f"t.{_q(k)} = s.{_q(k)}" for k in self.settings.key)
        others = [c for c in self.columns if c not in self.settings.key]
        sets = ", ".join(f"{_q(c)} = s.{_q(c)}" for c in others)
        stage, t = self._STAGE, self.table
        if self.mode == "upsert":
            excluded = ", ".join(f"{_q(c)} = EXCLUDED.{_q(c)}" for c in others)
            action = f"DO UPDATE SET {excluded}" if others else "DO NOTHING"
            sql = (
                f"INSERT INTO {t} ({cols}) SELECT {cols} FROM {stage} ORDER BY _n"
                f" ON CONFLICT ({keys}) {action}"
            )
        elif self.mode == "update" and sets:
            sql = f"UPDATE {t} AS t SET {sets} FROM {stage} AS s WHERE {match} RETURNING s._n"
        elif self.mode == "update":
            sql = f"SELECT s._n FROM {stage} s WHERE EXISTS (SELECT 1 FROM {t} t WHERE {match})"
        else:
            sql = f"DELETE FROM {t} AS t USING {stage} AS s WHERE {match} RETURNING s._n"
        self._statement = sql.encode()

    def stream(self, checked: _Checked) -> None:
        """In mode create, one COPY carries a window of chunks: the server works on them
        while the next ones are read and checked, as a plain COPY of the file would. The
        rows go as COPY text, joined in C when the input text can go as it is."""
        super().stream(checked)
        if self.mode != "create" or self._refused:
            return
        text = self._raw_text(checked.raw) if checked.raw is not None else None
        try:
            if self._window is None:
                self.execute("SAVEPOINT filedock_window")
                self._window = contextlib.ExitStack()
                copy = f"{self._copy.decode()} WITH (NULL '')".encode()
                cursor = self.conn.cursor()
                writer = self._pg.copy.LibpqWriter(cursor, flush_threshold=1 << 16)
                self._copier = self._window.enter_context(cursor.copy(copy, writer=writer))
            self._copier.write(text if text is not None else _copy_text(checked.rows))
        except self.row_errors:
            self._refused = True

    def _raw_text(self, raw: list[list[str]]) -> str | None:
        """The rows' fields as COPY text (an empty field is NULL), or None if any needs
        escaping: a backslash, a tab or a line break."""
        text = "\n".join(map("\t".join, map(self._pick, raw))) + "\n" if raw else ""
        # a value holding a separator would add one: count them
        if text.count("\t") != len(raw) * (len(self.columns) - 1) or text.count("\n") != len(raw):
            return None
        return None if "\\" in text or "\r" in text else text

    def settle(self) -> list[dict[int, str]]:
        if self.mode != "create":
            return super().settle()
        refused, self._refused = self._refused, False
        if self._window is not None:
            window, self._window = self._window, None
            try:
                window.close()  # ends the COPY: the server's verdict on the whole window
            except self.row_errors:
                refused = True
            if not refused:
                self.execute("RELEASE SAVEPOINT filedock_window")
                parts, self._streamed = self._streamed, []
                return [{} for _ in parts]
            self.execute("ROLLBACK TO SAVEPOINT filedock_window")
            self.execute("RELEASE SAVEPOINT filedock_window")
        return super().settle()  # chunk by chunk, halving the refused ones

    def _write(self, rows: list[Row]) -> dict[int, str]:
        if self.mode == "create":
            with self.conn.cursor().copy(self._copy) as copy:
                for _, values in rows:
                    copy.write_row(values)
            return {}
        # set-wise statements see a key once: rows repeating a key go in a later batch
        errors: dict[int, str] = {}
        for batch in _distinct_batches(rows, self.key):
            self.conn.execute(f"TRUNCATE {self._STAGE}".encode())
            with self.conn.cursor().copy(self._copy) as copy:
                for n, values in batch:
                    copy.write_row((n, *values))
            cursor = self.conn.execute(self._statement)
            if self.mode != "upsert":
                errors.update(self._not_found(batch, {n for (n,) in cursor.fetchall()}))
        return errors

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


_COPY_ESCAPES: Final = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(rows: list[Row]) -> str:
    """Values as COPY text with `NULL ''` (no value is an empty string: that is NULL)."""

    def text(value: Any) -> str:
        if value is None:
            return ""
        if value is True or value is False:
            return "t" if value else "f"
        return str(value).translate(_COPY_ESCAPES)

    return "".join("\t".join(map(text, values)) + "\n" for _, values in rows)


def _distinct_batches(rows: list[Row], key: list[int]) -> Iterator[list[Row]]:
    """Consecutive runs of rows in which no key repeats."""
    batch: list[Row] = []
    seen: set[tuple[Any, ...]] = set()
    for row in rows:
        k = tuple(row[1][i] for i in key)
        if k in seen:
            yield batch
            batch, seen = [], set()
        seen.add(k)
        batch.append(row)
    if batch:
        yield batch


def _connect(settings: CsvSqlImporterSettings) -> _Backend:
    if settings.database_url.startswith("sqlite:///"):
        return _SqliteBackend(settings)
    return _PostgresBackend(settings)


# --- one import ------------------------------------------------------------------------------


class _Checked:
    """A chunk after validation: the rows to write, and the reasons of those that failed.

    The values stay column by column until a backend asks for rows: a COPY of canonical
    text never needs them.
    """

    def __init__(
        self,
        chunk: _Chunk,
        invalid: dict[int, str],
        positions: Sequence[int],
        columns: list[Sequence[Any]],
        raw: list[list[str]] | None,
    ) -> None:
        self.chunk = chunk
        self.invalid = invalid  # position in the chunk -> reason
        self.raw = raw  # the rows' fields, when every value was canonical
        self.count = len(positions)
        self._positions, self._columns = positions, columns
        self._rows: list[Row] | None = None

    @property
    def rows(self) -> list[Row]:
        """(position in the chunk, values) of each row to write."""
        if self._rows is None:
            values = zip(*self._columns, strict=True)  # a plan always feeds some column
            self._rows = list(zip(self._positions, values, strict=True))
        return self._rows

    @rows.setter
    def rows(self, rows: list[Row]) -> None:
        self._rows = rows


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
            for line, fields in again:
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
        window: list[_Checked] = []
        while chunk := source.read(self.settings.chunk_rows):
            window.append(checked := self._check(plan, chunk))
            backend.stream(checked)
            if len(window) >= backend.window:
                self._settle(backend, outputs, window)
                window = []
                self.checkpoint()
        if window:
            self._settle(backend, outputs, window)
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

    def _check(self, plan: _Plan, chunk: _Chunk) -> _Checked:
        width = plan.width
        invalid = dict(chunk.problems)
        whole: Sequence[int]
        if not invalid and set(map(len, chunk.fields)) == {width}:
            whole, inputs = range(len(chunk)), chunk.fields  # the common case: no work per row
        else:
            for n, fields in enumerate(chunk.fields):
                if n not in invalid and len(fields) != width:
                    invalid[n] = f"expected {width} fields, found {len(fields)}"
            whole = [n for n in range(len(chunk)) if n not in invalid]
            inputs = [chunk.fields[n] for n in whole]
        columns, failed, canonical = plan.validate(inputs)
        checked = _Checked(chunk, invalid, whole, columns, inputs if canonical else None)
        if failed:
            invalid.update((whole[i], reason) for i, reason in failed.items())
            checked.rows = [row for i, row in enumerate(checked.rows) if i not in failed]
        return checked

    def _settle(self, backend: _Backend, outputs: _Outputs, window: list[_Checked]) -> None:
        for checked, refused in zip(window, backend.settle(), strict=True):
            failed, chunk = checked.invalid | refused, checked.chunk
            if not failed:
                self.imported += len(chunk)
                outputs.good_many(chunk.fields)
                continue
            errors: list[tuple[int, str]] = []
            for n, (line, fields) in enumerate(zip(chunk.lines, chunk.fields, strict=True)):
                if n not in failed:
                    outputs.good(fields)
                    continue
                message = f"line {line}: {failed[n]}"
                outputs.bad(line, fields, message)
                errors.append((line, message))
            self.imported += len(chunk) - len(errors)
            self.failed += len(errors)
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
                while chunk := source.read(self.settings.chunk_rows):
                    for line, fields in zip(chunk.lines, chunk.fields, strict=True):
                        if failing is not None and failing[0] == line:
                            outputs.bad(line, fields, failing[1])
                            failing = next(errors, None)
                        else:
                            outputs.good(fields)
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
        """Import the job's CSV; a cancellation (the caller's timeout) rolls back at a chunk."""
        run = _Run(self.settings, job, anyio.from_thread.check_cancelled)
        return await anyio.to_thread.run_sync(run, limiter=self._limiter)

    def __repr__(self) -> str:
        settings = self.settings
        scheme = settings.database_url.split(":", 1)[0]
        return f"CsvSqlImporter(table={settings.table!r}, mode={settings.mode!r}, {scheme})"
