"""PostgreSQL: COPY in windows of chunks, and staging tables for the other modes."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Generator, Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Final

from service.errors import Retry
from service.importers.csv_sql.backends import _Backend, _first_line, _q
from service.importers.csv_sql.plan import Row, _Checked, _Plan
from service.settings import CsvColumn, CsvSqlImporterSettings

if TYPE_CHECKING:
    import psycopg

_PG_CONNECT_TIMEOUT_S: Final = 10
_PG_WINDOW_ROWS: Final = 8192  # rows one COPY streams before awaiting the server's verdict


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
