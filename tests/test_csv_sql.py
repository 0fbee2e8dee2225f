"""The `csv-sql` importer against real files and real databases (SQLite, PostgreSQL).

Every test runs on both databases: PostgreSQL needs FILEDOCK_TEST_POSTGRES_URL (it skips
without it locally, and fails under CI=true). Each test gets its own table and job ids.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import ValidationError

from service.errors import Reject, Retry
from service.importers.base import ImportJob, Result
from service.importers.csv_sql import CsvSqlImporter
from service.settings import CsvSqlImporterSettings
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Db:
    """A database and a fresh table name for one test; drops what the test left."""

    url: str
    table: str
    tmp: Path
    jobs: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)

    def new_table(self) -> None:
        self.tables.append(self.table)
        self.table = f"t_{uuid.uuid4().hex[:12]}"

    def count(self) -> int | None:
        """The table's rows, or None when it does not exist."""
        exists = (
            f"SELECT count(*) FROM sqlite_master WHERE name = '{self.table}'"
            if self.sqlite
            else f"SELECT count(*) FROM pg_class WHERE oid = to_regclass('{self.table}')"
        )
        if not self.fetch(exists)[0][0]:
            return None
        return int(self.fetch("SELECT count(*) FROM {t}")[0][0])

    def recorded(self, job_id: str) -> int:
        return int(
            self.fetch(f"SELECT count(*) FROM filedock_imports WHERE job_id = '{job_id}'")[0][0]
        )

    @property
    def sqlite(self) -> bool:
        return self.url.startswith("sqlite:")

    def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        sql = sql.replace("{t}", self.table)
        if self.sqlite:
            with contextlib.closing(sqlite3.connect(self.url.removeprefix("sqlite:///"))) as c:
                return c.execute(sql).fetchall()
        import psycopg

        with psycopg.connect(self.url) as conn:
            return conn.execute(sql.encode()).fetchall()

    def run(self, sql: str) -> None:
        sql = sql.replace("{t}", self.table)
        if self.sqlite:
            with contextlib.closing(sqlite3.connect(self.url.removeprefix("sqlite:///"))) as c:
                c.executescript(sql)
            return
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.encode())

    def rows(self, columns: str = "*", order: str = "1") -> list[tuple[Any, ...]]:
        return self.fetch(f"SELECT {columns} FROM {{t}} ORDER BY {order}")

    def settings(self, **overrides: Any) -> CsvSqlImporterSettings:
        values: dict[str, Any] = {
            "kind": "csv-sql",
            "database_url": self.url,
            "table": self.table,
            "columns": {"id": {"type": "int"}, "name": {"type": "str", "required": True}},
            "key": ["id"],
        }
        values.update(overrides)
        return CsvSqlImporterSettings(**values)

    def job(self, path: Path, job_id: str | None = None, out: str = "out") -> ImportJob:
        job_id = job_id or f"test-{uuid.uuid4().hex}"
        self.jobs.append(job_id)
        return ImportJob(
            id=job_id,
            route="orders",
            path=path,
            name=path.name.encode(),
            relative_path=path.name.encode(),
            out_dir=self.tmp / out,
            temp_dir=self.tmp / "temp",
            attempt=1,
            size=path.stat().st_size,
            sha256="0" * 64,
        )


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    table = f"t_{uuid.uuid4().hex[:12]}"
    if request.param == "sqlite":
        yield Db(f"sqlite:///{tmp_path / 'target.sqlite3'}", table, tmp_path)
        return
    url: str = request.getfixturevalue("postgres_url")
    database = Db(url, table, tmp_path)
    try:
        yield database
    finally:
        for name in [*database.tables, database.table]:
            database.run(f"DROP TABLE IF EXISTS {name}")
        for job_id in database.jobs:
            with contextlib.suppress(Exception):
                database.run(
                    f"DELETE FROM filedock_imports WHERE job_id = '{job_id}';"
                    f" DELETE FROM filedock_import_errors WHERE job_id = '{job_id}'"
                )


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


async def run(settings: CsvSqlImporterSettings, job: ImportJob) -> Result:
    return await CsvSqlImporter(settings, limiter=anyio.CapacityLimiter(2))(job)


def read_csv(path: Path, encoding: str = "utf-8-sig") -> list[list[str]]:
    import csv

    with open(path, newline="", encoding=encoding) as f:
        return list(csv.reader(f))


# --- modes ---------------------------------------------------------------------------------


async def test_create_imports_rows_and_duplicate_keys_are_row_errors(db: Db) -> None:
    settings = db.settings()
    first = await run(settings, db.job(write(db.tmp / "a.csv", "id,name\n1,ada\n2,bob\n")))
    assert first.outcome == "imported" and first.pending is None
    assert first.detail["rows_imported"] == 2
    src = write(db.tmp / "b.csv", "id,name\n3,cy\n1,again\n3,twice\n4,dee\n")
    result = await run(settings, db.job(src))
    assert result.outcome == "partial"
    assert db.rows() == [(1, "ada"), (2, "bob"), (3, "cy"), (4, "dee")]
    pending = read_csv(db.tmp / "out" / "b.pending.csv")
    assert pending == [
        ["id", "name", "import_error"],
        ["1", "again", "line 3: key id=1 already exists"],
        ["3", "twice", "line 4: key id=3 already exists"],
    ]


async def test_create_without_key_inserts_every_row(db: Db) -> None:
    settings = db.settings(key=[])
    src = write(db.tmp / "a.csv", "id,name\n1,ada\n1,ada\n")
    result = await run(settings, db.job(src))
    assert result.detail["rows_imported"] == 2
    assert db.rows() == [(1, "ada"), (1, "ada")]


async def test_update_needs_the_key_and_sets_only_the_columns_in_the_file(db: Db) -> None:
    columns = {"id": {"type": "int"}, "name": {"type": "str"}, "qty": {"type": "int"}}
    await run(
        db.settings(columns=columns),
        db.job(write(db.tmp / "a.csv", "id,name,qty\n1,a,10\n2,b,20\n")),
    )
    settings = db.settings(columns=columns, mode="update")
    src = write(db.tmp / "u.csv", "id,qty\n2,21\n9,90\n1,11\n1,12\n")
    result = await run(settings, db.job(src))
    assert result.outcome == "partial"
    assert result.detail["rows_imported"] == 3 and result.detail["rows_failed"] == 1
    assert db.rows() == [(1, "a", 12), (2, "b", 21)]  # name untouched; the last 1 wins
    assert read_csv(db.tmp / "out" / "u.pending.csv")[1] == [
        "9",
        "90",
        "line 3: key id=9 not found",
    ]


async def test_upsert_inserts_and_updates_in_file_order(db: Db) -> None:
    await run(db.settings(), db.job(write(db.tmp / "a.csv", "id,name\n1,a\n")))
    settings = db.settings(mode="upsert")
    src = write(db.tmp / "u.csv", "id,name\n1,A\n2,b\n2,B\n3,c\n")
    result = await run(settings, db.job(src))
    assert result.outcome == "imported" and result.detail["rows_imported"] == 4
    assert db.rows() == [(1, "A"), (2, "B"), (3, "c")]


async def test_remove_deletes_by_key_and_a_missing_key_is_a_row_error(db: Db) -> None:
    await run(db.settings(), db.job(write(db.tmp / "a.csv", "id,name\n1,a\n2,b\n3,c\n")))
    settings = db.settings(mode="remove")
    src = write(db.tmp / "r.csv", "id\n1\n7\n3\n3\n")
    result = await run(settings, db.job(src))
    assert result.outcome == "partial"
    assert (result.detail["rows_imported"], result.detail["rows_failed"]) == (2, 2)
    assert db.rows() == [(2, "b")]
    errors = [row[-1] for row in read_csv(db.tmp / "out" / "r.pending.csv")[1:]]
    assert errors == ["line 3: key id=7 not found", "line 5: key id=3 not found"]


async def test_create_and_upsert_need_a_unique_key_on_an_existing_table(db: Db) -> None:
    db.run("CREATE TABLE {t} (id BIGINT, name TEXT)")
    for mode in ("create", "upsert"):
        with pytest.raises(Reject, match="primary key or unique index"):
            await run(
                db.settings(mode=mode, create_table=False),
                db.job(write(db.tmp / "a.csv", "id,name\n1,a\n")),
            )
    db.run("CREATE UNIQUE INDEX {t}_id ON {t} (id)")
    result = await run(db.settings(mode="upsert", create_table=False), db.job(db.tmp / "a.csv"))
    assert result.detail["rows_imported"] == 1


async def test_a_missing_table_without_create_table_is_rejected(db: Db) -> None:
    with pytest.raises(Reject, match="does not exist"):
        await run(
            db.settings(create_table=False), db.job(write(db.tmp / "a.csv", "id,name\n1,a\n"))
        )


async def test_rows_the_database_refuses_are_row_errors(db: Db) -> None:
    """A constraint the settings do not know: the refused rows are found by halving."""
    db.run("CREATE TABLE {t} (id BIGINT PRIMARY KEY, name TEXT NOT NULL CHECK (name <> 'bad'))")
    names = ["bad" if i in (3, 17, 18, 40) else f"n{i}" for i in range(50)]
    src = write(db.tmp / "a.csv", "id,name\n" + "".join(f"{i},{n}\n" for i, n in enumerate(names)))
    result = await run(db.settings(create_table=False, chunk_rows=16), db.job(src))
    assert (result.detail["rows_imported"], result.detail["rows_failed"]) == (46, 4)
    assert [r[0] for r in db.rows("id")] == [i for i, n in enumerate(names) if n != "bad"]
    pending = read_csv(db.tmp / "out" / "a.pending.csv")[1:]
    assert [row[0] for row in pending] == ["3", "17", "18", "40"]
    assert all("refused by the database" in row[2] and "check" in row[2].lower() for row in pending)


async def test_a_refusal_early_in_a_long_stream_costs_only_that_row(db: Db) -> None:
    """PostgreSQL streams many chunks in one COPY; the server refuses it while rows still flow."""
    rows = 30_000
    lines = "".join(f"{i},n{i}\n" for i in range(rows))
    src = write(db.tmp / "a.csv", "id,name\n0,early\n3,dup\n" + lines + "7,late dup\n")
    result = await run(db.settings(chunk_rows=1000), db.job(src))
    assert (result.detail["rows_imported"], result.detail["rows_failed"]) == (rows, 3)
    assert db.fetch("SELECT count(*), count(DISTINCT id) FROM {t}") == [(rows, rows)]
    assert db.fetch("SELECT name FROM {t} WHERE id IN (0, 3, 7) ORDER BY id") == [
        ("early",),
        ("dup",),
        ("n7",),
    ]
    errors = [row[-1] for row in read_csv(db.tmp / "out" / "a.pending.csv")[1:]]
    assert errors == [
        "line 4: key id=0 already exists",
        "line 7: key id=3 already exists",
        f"line {rows + 4}: key id=7 already exists",
    ]


# --- types and constraints -----------------------------------------------------------------

CASES: list[tuple[dict[str, Any], str, Any]] = [
    # (column, raw value, the stored value, or an error string starting with "!")
    ({"type": "int"}, "42", 42),
    ({"type": "int"}, " -7 ", -7),
    ({"type": "int"}, "+007", 7),
    ({"type": "int"}, "9223372036854775807", 9223372036854775807),
    ({"type": "int"}, "9223372036854775808", "!outside the 64-bit integer range"),
    ({"type": "int"}, "4.2", "!not an integer: '4.2'"),
    ({"type": "int"}, "", None),
    ({"type": "int", "required": True}, "", "!required"),
    ({"type": "decimal"}, "1.50", "1.50"),
    ({"type": "decimal"}, "-0.000000001", "-0.000000001"),
    ({"type": "decimal"}, "+.5", "0.5"),
    ({"type": "decimal"}, "12345678901234567890.123456789", "12345678901234567890.123456789"),
    ({"type": "decimal"}, "1e3", "!not a decimal number"),
    ({"type": "decimal", "precision": 5, "scale": 2}, "123.45", "123.45"),
    ({"type": "decimal", "precision": 5, "scale": 2}, "1.234", "!more than 2 decimal places"),
    ({"type": "decimal", "precision": 5, "scale": 2}, "1234.5", "!more than 3 digits before"),
    ({"type": "bool"}, "yes", True),
    ({"type": "bool"}, "No", False),
    ({"type": "bool"}, "TRUE", True),
    ({"type": "bool"}, "0", False),
    ({"type": "bool"}, "maybe", "!not a boolean"),
    ({"type": "date"}, "2024-02-29", date(2024, 2, 29)),
    ({"type": "date"}, "2023-02-29", "!not an ISO date"),
    ({"type": "date"}, "20240501", "!not an ISO date"),
    ({"type": "datetime"}, "2024-05-01T10:00:00+02:00", datetime(2024, 5, 1, 8, tzinfo=UTC)),
    ({"type": "datetime"}, "2024-05-01 10:00", datetime(2024, 5, 1, 10, tzinfo=UTC)),
    ({"type": "datetime"}, "2024-05-01T10:00:00.25Z", datetime(2024, 5, 1, 10, 0, 0, 250000, UTC)),
    ({"type": "datetime"}, "2024-13-01T00:00", "!not an ISO 8601 date-time"),
    ({"type": "datetime"}, "yesterday", "!not an ISO 8601 date-time"),
    ({"type": "str", "max_length": 3}, "abc", "abc"),
    ({"type": "str", "max_length": 3}, "abcd", "!longer than 3 characters"),
    ({"type": "str", "pattern": "[A-Z]{2}[0-9]+"}, "AB12", "AB12"),
    ({"type": "str", "pattern": "[A-Z]{2}[0-9]+"}, "AB12x", "!does not match the pattern"),
    ({"type": "str", "choices": ["red", "green"]}, "red", "red"),
    ({"type": "str", "choices": ["red", "green"]}, "blue", "!not one of the choices"),
    ({"type": "str"}, "", None),
    ({"type": "str"}, " keeps spaces ", " keeps spaces "),
    ({"type": "str", "required": True}, "", "!required"),
]
# a value that fails each column: it sends the whole column down the value-by-value path
SPOILER = {"int": "x", "decimal": "x", "bool": "x", "date": "x", "datetime": "x"}


def normalized(value: Any, kind: str) -> Any:
    """A stored value as Python sees it, whichever the database."""
    if value is None:
        return None
    if kind == "decimal":
        return format(Decimal(str(value)), "f")
    if kind == "bool":
        return bool(value)
    if kind == "date" and isinstance(value, str):
        return date.fromisoformat(value)
    if kind == "datetime":
        value = datetime.fromisoformat(value) if isinstance(value, str) else value
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


def spoiler(column: dict[str, Any]) -> str | None:
    if column["type"] in SPOILER:
        return SPOILER[column["type"]]
    if "max_length" in column:
        return "x" * (column["max_length"] + 1)
    if "pattern" in column or "choices" in column:
        return "!"
    return None


@pytest.mark.parametrize(("column", "raw", "expected"), CASES, ids=lambda v: repr(v)[:30])
async def test_types_and_constraints(
    db: Db, column: dict[str, Any], raw: str, expected: Any
) -> None:
    """Each value alone (the column-at-once path), then beside a bad value (one by one)."""
    columns = {"id": {"type": "int"}, "v": column}
    bad = spoiler(column)
    for n, extra in enumerate([None, bad] if bad is not None else [None]):
        if n:
            db.new_table()
        lines = ["id,v", f'1,"{raw}"'] + ([f"2,{extra}"] if extra is not None else [])
        src = write(db.tmp / f"{n}.csv", "\n".join(lines) + "\n")
        job = db.job(src, out=f"out{n}")
        if isinstance(expected, str) and expected.startswith("!"):
            with pytest.raises(Reject) as caught:
                await run(db.settings(columns=columns), job)
            assert f"line 2: v: {expected[1:]}" in caught.value.reason
            continue
        result = await run(db.settings(columns=columns), job)
        assert result.detail["rows_imported"] == 1
        stored = db.fetch("SELECT v FROM {t} WHERE id = 1")[0][0]
        assert normalized(stored, column["type"]) == expected


SAMPLES = [
    *["1", "-5", "+007", " 5", "5 ", "1_0", "\u0661", "--1", "1-", "+"],
    *["9223372036854775807", "9223372036854775808", "-9223372036854775808"],
    *["1.50", "+.5", ".5", "1.", "-0", "00.1", "1e3", "0.10", "123.456", "1234.5"],
    *["yes", "No", "TRUE", " true", "t", "2024-02-29", "2023-02-29", "20240501", "2024-W01-1"],
    *["2024-05-01T10:00:00+02:00", "2024-05-01 10:00", "2024-05-01T10:00:00.25Z"],
    *["2024-05-01T10:00:00+0200", "2024-05-01T10:00:00.1234567", "2024-05-01"],
    *[" x ", "abc", "AB12", "red", "5"],
]
SAMPLE_COLUMNS = [
    *[{"type": kind} for kind in ("int", "decimal", "bool", "date", "datetime", "str")],
    {"type": "decimal", "precision": 5, "scale": 2},
    {"type": "str", "max_length": 3},
    {"type": "str", "pattern": "[A-Z]{2}[0-9]+"},
    {"type": "int", "choices": ["5"]},
    {"type": "int", "pattern": r"\s5"},  # a rule that sees the spaces the int rules strip
]


@pytest.mark.parametrize("column", SAMPLE_COLUMNS, ids=lambda c: "-".join(map(str, c.values())))
def test_the_column_at_once_path_agrees_with_the_value_by_value_path(
    column: dict[str, Any],
) -> None:
    """Whatever a whole column passes at C speed, each value passes alone, as the same value."""
    from service.importers.csv_sql import _CellError, _converter, _fast_path
    from service.settings import CsvColumn

    spec = CsvColumn(**column)
    fast, one = _fast_path(spec), _converter(spec, required=False)
    for value in SAMPLES:
        converted = fast([value])
        if converted is None:
            continue
        try:
            expected = one(value)
        except _CellError as e:
            raise AssertionError(f"{value!r}: the fast path took it, the value path: {e}") from e
        assert list(converted) == [expected], value
    every = [v for v in SAMPLES if fast([v]) is not None]  # and all of them at once
    together = fast(every)
    assert together is not None and list(together) == [one(v) for v in every]


async def test_decimals_stay_exact_in_sqlite_and_postgresql(db: Db) -> None:
    columns = {"id": {"type": "int"}, "amount": {"type": "decimal"}}
    values = ["0.1", "0.2", "1.10", "-3.000", "99999999999999999999.99"]
    src = write(
        db.tmp / "a.csv", "id,amount\n" + "".join(f"{i},{v}\n" for i, v in enumerate(values))
    )
    await run(db.settings(columns=columns), db.job(src))
    assert [Decimal(str(v)) for (v,) in db.rows("amount", "id")] == [Decimal(v) for v in values]
    stored = db.fetch("SELECT amount FROM {t} WHERE id = 1")[0][0]
    assert str(stored) == "0.2"


# --- the finished/pending split ------------------------------------------------------------

MIXED = """id,name,qty,comment
1,ada,3,first
2,bob,x,bad qty
3,,4,no name
4,"multi
line",5,ok
5,eve,6,extra,field
6,fay,7,ok
"""


def mixed_settings(db: Db, **overrides: Any) -> CsvSqlImporterSettings:
    columns = {
        "id": {"type": "int"},
        "name": {"type": "str", "required": True},
        "qty": {"type": "int"},
    }
    return db.settings(columns=columns, **overrides)


async def test_mixed_rows_split_into_finished_and_pending(db: Db) -> None:
    src = write(db.tmp / "orders.csv", MIXED)
    result = await run(mixed_settings(db, chunk_rows=2), db.job(src))
    assert result.outcome == "partial"
    assert result.detail == result.detail | {"rows_imported": 3, "rows_failed": 3, "rows_total": 6}
    assert result.detail["ignored_headers"] == ["comment"]
    assert result.pending == db.tmp / "out" / "orders.pending.csv"
    assert result.message is not None and "3 of 6 rows failed" in result.message
    assert db.rows("id, name, qty") == [(1, "ada", 3), (4, "multi\nline", 5), (6, "fay", 7)]
    finished = read_csv(db.tmp / "out" / "orders.finished.csv")
    assert finished == [
        ["id", "name", "qty", "comment"],
        ["1", "ada", "3", "first"],
        ["4", "multi\nline", "5", "ok"],
        ["6", "fay", "7", "ok"],
    ]
    pending = read_csv(db.tmp / "out" / "orders.pending.csv")
    assert pending == [
        ["id", "name", "qty", "comment", "import_error"],
        ["2", "bob", "x", "bad qty", "line 3: qty: not an integer: 'x'"],
        ["3", "", "4", "no name", "line 4: name: required"],
        ["5", "eve", "6", "extra", "line 7: expected 4 fields, found 5", "field"],
    ]
    assert sorted(p.name for p in (db.tmp / "out").iterdir()) == [
        "orders.finished.csv",
        "orders.pending.csv",
    ]
    assert result.log is not None and b"line 3: qty: not an integer" in result.log


async def test_all_rows_good_writes_no_output_files(db: Db) -> None:
    src = write(db.tmp / "orders.csv", "id,name\n1,a\n2,b\n")
    result = await run(db.settings(), db.job(src))
    assert result.outcome == "imported" and result.pending is None
    assert result.detail["finished_file"] is None
    assert not (db.tmp / "out").exists() or not list((db.tmp / "out").iterdir())


async def test_the_fixed_pending_file_imports_exactly_the_failed_rows(db: Db) -> None:
    settings = mixed_settings(db)
    await run(settings, db.job(write(db.tmp / "orders.csv", MIXED)))
    pending = (db.tmp / "out" / "orders.pending.csv").read_text(encoding="utf-8-sig")
    fixed = (
        pending.replace("2,bob,x,", "2,bob,8,")
        .replace("3,,4,", "3,cy,4,")
        .replace(',"line 7: expected 4 fields, found 5",field', ",still has the old error")
    )
    (db.tmp / "fixed").mkdir()
    src = write(db.tmp / "fixed" / "orders.pending.csv", fixed)
    result = await run(settings, db.job(src, out="out2"))
    assert result.outcome == "imported"
    assert result.detail["rows_imported"] == 3 and result.detail["rows_failed"] == 0
    assert db.rows("id, name, qty") == [
        (1, "ada", 3),
        (2, "bob", 8),
        (3, "cy", 4),
        (4, "multi\nline", 5),
        (5, "eve", 6),
        (6, "fay", 7),
    ]


async def test_no_valid_row_rejects_after_writing_the_pending_file(db: Db) -> None:
    src = write(db.tmp / "orders.csv", "id,name\nx,a\n2,\n")
    job = db.job(src)
    with pytest.raises(
        Reject, match=r"no row imported: all 2 rows failed; they are in orders\.pending\.csv"
    ):
        await run(db.settings(), job)
    assert [p.name for p in (db.tmp / "out").iterdir()] == ["orders.pending.csv"]
    assert len(read_csv(db.tmp / "out" / "orders.pending.csv")) == 3
    assert db.recorded(job.id) == 0
    # nothing was recorded: `filedock retry` of the same job imports again once fixed
    write(src, "id,name\n1,a\n2,b\n")
    result = await run(db.settings(), job)
    assert result.detail["rows_imported"] == 2


# --- idempotency ---------------------------------------------------------------------------


async def test_the_same_job_twice_leaves_the_table_alone_and_rewrites_the_files(db: Db) -> None:
    settings = mixed_settings(db, chunk_rows=2)
    src = write(db.tmp / "orders.csv", MIXED)
    first = await run(settings, db.job(src, job_id=f"test-{uuid.uuid4().hex}"))
    out = db.tmp / "out"
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    for p in out.iterdir():
        p.unlink()
    again = await run(settings, db.job(src, job_id=db.jobs[-1]))
    assert db.rows("id") == [(1,), (4,), (6,)]
    assert again.outcome == "partial" and again.pending == first.pending
    for key in ("rows_imported", "rows_failed", "rows_total"):
        assert again.detail[key] == first.detail[key]
    assert again.detail["replayed_from"] is not None and first.detail["replayed_from"] is None
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert again.message == first.message


CHILD = """
import sys, anyio
sys.path.insert(0, {root!r})
from pathlib import Path
from service.importers.base import ImportJob
from service.importers.csv_sql import CsvSqlImporter
from service.settings import CsvSqlImporterSettings

settings = CsvSqlImporterSettings.model_validate_json(Path(sys.argv[1]).read_text())
job = ImportJob(id=sys.argv[2], route="orders", path=Path(sys.argv[3]), name=b"big.csv",
                relative_path=b"big.csv", out_dir=Path(sys.argv[4]), temp_dir=Path(sys.argv[4]),
                attempt=1, size=0, sha256="0" * 64)
anyio.run(CsvSqlImporter(settings, limiter=anyio.CapacityLimiter(1)), job)
print("finished")
"""


async def test_a_crash_mid_import_leaves_nothing_and_the_rerun_imports_once(db: Db) -> None:
    """A real importer process killed with SIGKILL inside its transaction, then a re-run."""
    rows = 300_000
    src = db.tmp / "big.csv"
    with open(src, "w") as f:
        f.write("id,name\nnot-a-number,first row fails: the finished file starts at once\n")
        f.writelines(f"{i},name {i}\n" for i in range(rows))
    settings = db.settings(chunk_rows=500)
    config = write(db.tmp / "settings.json", settings.model_dump_json())
    script = write(db.tmp / "child.py", textwrap.dedent(CHILD.format(root=str(ROOT))))
    job = db.job(src)
    part = db.tmp / "out" / ".big.finished.csv.part"
    child = subprocess.Popen(
        [sys.executable, str(script), str(config), job.id, str(src), str(db.tmp / "out")],
        stdout=subprocess.DEVNULL,
    )
    try:
        # rows are in the transaction once their chunk is in the finished file
        wait_for(lambda: part.exists() and part.stat().st_size > 200_000, what="rows written")
        assert child.poll() is None, "the import ended before it could be killed"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert db.count() == 0 and db.recorded(job.id) == 0  # nothing was committed
    result = await run(settings, job)
    again = await run(settings, job)
    for outcome in (result, again):
        assert (outcome.detail["rows_imported"], outcome.detail["rows_failed"]) == (rows, 1)
    assert db.fetch("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM {t}") == [
        (rows, rows, 0, rows - 1)
    ]
    assert not part.exists()
    with open(db.tmp / "out" / "big.finished.csv", newline="") as f:
        assert sum(1 for _ in f) == rows + 1


async def test_a_cancelled_import_rolls_back(db: Db) -> None:
    """Cancelled mid-transaction (once rows are in it), nothing is committed."""
    src = db.tmp / "big.csv"
    with open(src, "w") as f:
        f.write("id,name\nnot-a-number,first row fails: the finished file starts at once\n")
        f.writelines(f"{i},n{i}\n" for i in range(1_000_000))
    job = db.job(src)
    part = db.tmp / "out" / ".big.finished.csv.part"
    importer = CsvSqlImporter(db.settings(chunk_rows=200), limiter=anyio.CapacityLimiter(1))
    results: list[Result] = []

    async def go() -> None:
        results.append(await importer(job))

    async with anyio.create_task_group() as tg:
        tg.start_soon(go)
        with anyio.fail_after(30):  # rows are in the transaction once they are in the file
            while not (part.exists() and part.stat().st_size > 100_000) and not results:
                await anyio.sleep(0.002)
        tg.cancel_scope.cancel()
    assert not results, "the import finished before it could be cancelled"
    assert db.count() in (None, 0)
    assert db.count() is None or db.recorded(job.id) == 0


async def test_the_importer_waits_for_its_limiter(db: Db) -> None:
    limiter = anyio.CapacityLimiter(1)
    importer = CsvSqlImporter(db.settings(), limiter=limiter)
    job = db.job(write(db.tmp / "a.csv", "id,name\n1,a\n"))
    results: list[Result] = []

    async def go() -> None:
        results.append(await importer(job))

    async with anyio.create_task_group() as tg:
        await limiter.acquire()
        tg.start_soon(go)
        await anyio.wait_all_tasks_blocked()
        assert limiter.statistics().tasks_waiting == 1 and not results
        limiter.release()
    assert results[0].detail["rows_imported"] == 1


# --- encodings and malformed files ---------------------------------------------------------


async def test_utf8_with_bom(db: Db) -> None:
    src = write(db.tmp / "a.csv", "\ufeffid,name\n1,Zoë\n".encode())
    result = await run(db.settings(), db.job(src))
    assert result.detail["encoding"] == "utf-8-sig"
    assert db.rows() == [(1, "Zoë")]


async def test_latin1_fallback(db: Db) -> None:
    src = write(db.tmp / "a.csv", "id,name\n1,Zoë\n2,Müller\n".encode("latin-1"))
    result = await run(db.settings(fallback_encodings=["latin-1"]), db.job(src))
    assert result.detail["encoding"] == "latin-1"
    assert db.rows() == [(1, "Zoë"), (2, "Müller")]


async def test_undecodable_bytes_are_row_errors_and_kept_byte_for_byte(db: Db) -> None:
    raw = b"id,name\n1,ok\n2,M\xfcller\n3,fine\n"
    src = write(db.tmp / "a.csv", raw)
    result = await run(db.settings(), db.job(src))
    assert (result.detail["rows_imported"], result.detail["rows_failed"]) == (2, 1)
    pending = (db.tmp / "out" / "a.pending.csv").read_bytes()
    assert pending.startswith(b"\xef\xbb\xbfid,name,import_error\r\n2,M\xfcller,line 3: ")
    assert b"not valid utf-8-sig" in pending


async def test_malformed_csv_rows_carry_their_line_numbers(db: Db) -> None:
    text = 'id,name\n1,"a\nb"\n2,"x"y\n3,c\n4\n5,"unterminated\n6,f\n'
    src = write(db.tmp / "a.csv", text)
    result = await run(db.settings(), db.job(src))
    assert db.rows() == [(1, "a\nb"), (3, "c")]
    pending = read_csv(db.tmp / "out" / "a.pending.csv")[1:]
    assert [row[-1] for row in pending] == [
        "line 4: malformed CSV: ',' expected after '\"'",
        "line 6: expected 2 fields, found 1",
        "line 7: malformed CSV: unterminated quoted field (it runs to the end of the file)",
    ]
    assert pending[0][0] == '2,"x"y'  # an unparsable record is kept as it was
    assert pending[2][0] == '5,"unterminated\n6,f'
    assert result.detail["rows_failed"] == 3


@pytest.mark.parametrize("chunk_rows", [1, 2, 1000])
async def test_line_numbers_count_physical_lines(db: Db, chunk_rows: int) -> None:
    """CRLF, a lone CR and a blank line inside and between records, across chunk edges."""
    text = (
        'id,name\r\n1,"a\r\nb"\r\n\r\n2,"c\rd"\r\n3,x\r\nz,bad\r\n'
        '4,"q"x\r\n5,"e\n\nf",\r\n6,ok\r\n7,"no end\r\n'
    )
    src = write(db.tmp / "a.csv", text)
    await run(db.settings(chunk_rows=chunk_rows), db.job(src))
    assert db.rows() == [(1, "a\r\nb"), (2, "c\rd"), (3, "x"), (6, "ok")]
    errors = [row[2] for row in read_csv(db.tmp / "out" / "a.pending.csv")[1:]]
    assert errors == [
        "line 8: id: not an integer: 'z'",
        "line 9: malformed CSV: ',' expected after '\"'",
        "line 10: expected 2 fields, found 3",
        "line 14: malformed CSV: unterminated quoted field (it runs to the end of the file)",
    ]


async def test_blank_lines_are_skipped(db: Db) -> None:
    src = write(db.tmp / "a.csv", "\n\nid,name\r\n\r\n1,a\r\n \r\n2,b\r\n\r\n")
    result = await run(db.settings(), db.job(src))
    assert result.detail["rows_total"] == 2 and db.rows() == [(1, "a"), (2, "b")]


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"\n\n"], ids=["empty", "bom", "blank"])
async def test_an_empty_file_is_rejected(db: Db, content: bytes) -> None:
    with pytest.raises(Reject, match="empty file: no header"):
        await run(db.settings(), db.job(write(db.tmp / "a.csv", content)))


async def test_a_header_only_file_imports_zero_rows(db: Db) -> None:
    result = await run(db.settings(), db.job(write(db.tmp / "a.csv", "id,name\n")))
    assert result.outcome == "imported" and result.pending is None
    assert {k: result.detail[k] for k in ("rows_imported", "rows_failed", "rows_total")} == {
        "rows_imported": 0,
        "rows_failed": 0,
        "rows_total": 0,
    }


async def test_header_mapping_and_header_errors(db: Db) -> None:
    mapped = db.settings(header_map={"Order No": "id", "Customer": "name"})
    src = write(db.tmp / "a.csv", "Order No, Customer ,import_error\n1,ada,old error\n")
    result = await run(mapped, db.job(src))
    assert db.rows() == [(1, "ada")] and result.detail["ignored_headers"] == []
    with pytest.raises(Reject, match="the header has no column for name"):
        await run(db.settings(), db.job(write(db.tmp / "b.csv", "id,nom\n1,a\n")))
    with pytest.raises(Reject, match="feeds column 'id' twice"):
        await run(mapped, db.job(write(db.tmp / "c.csv", "Order No,id,name\n1,1,a\n")))


async def test_delimiter_and_quotechar(db: Db) -> None:
    settings = db.settings(delimiter=";", quotechar="'")
    src = write(db.tmp / "a.csv", "id;name\n1;'a;b'\n2;x\ny;z\n")
    await run(settings, db.job(src))
    assert db.rows() == [(1, "a;b"), (2, "x")]
    assert read_csv(db.tmp / "out" / "a.pending.csv")[0] == ["id;name;import_error"]


# --- transient failures and settings -------------------------------------------------------


async def test_an_unreachable_database_is_a_retry(tmp_path: Path) -> None:
    src = write(tmp_path / "a.csv", "id,name\n1,a\n")
    for url in ("postgresql://nobody@127.0.0.1:1/none", f"sqlite:///{tmp_path}/missing/dir/x.db"):
        db = Db(url, "orders", tmp_path)
        with pytest.raises(Retry):
            await run(db.settings(), db.job(src))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"database_url": "mysql://x"}, "database_url must be"),
        ({"database_url": "sqlite:///"}, "database_url must be"),
        ({"table": "filedock_imports"}, "reserved"),
        ({"encoding": "utf-9"}, "unknown encoding"),
        ({"fallback_encodings": ["latin-1", "nope"]}, "unknown encoding"),
        ({"delimiter": '"'}, "must differ"),
        ({"header_map": {"a": "id", "b": "id"}}, "two headers map to column 'id'"),
        ({"columns": {"id": {"type": "int", "scale": 2}}}, "precision and scale"),
        ({"columns": {"id": {"type": "decimal", "precision": 2, "scale": 3}}}, "exceed"),
        ({"columns": {"id": {"type": "int"}, "import_error": {}}}, "import_error"),
        ({"mode": "update", "key": []}, "needs key columns"),
    ],
)
def test_settings_refuse_what_cannot_work(overrides: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {
        "kind": "csv-sql",
        "database_url": "sqlite:///x.db",
        "table": "orders",
        "columns": {"id": {"type": "int"}},
        "key": ["id"],
    }
    with pytest.raises(ValidationError, match=message):
        CsvSqlImporterSettings(**(values | overrides))
