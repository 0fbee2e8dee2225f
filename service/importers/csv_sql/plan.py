"""The header's plan: how the file's columns feed the table, and each chunk once validated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from service.errors import Reject
from service.importers.csv_sql.reading import _Chunk
from service.importers.csv_sql.values import _Cell, _CellError, _converter, _fast_path
from service.settings import CsvSqlImporterSettings

ERROR_COLUMN: Final = "import_error"


Row = tuple[int, Sequence[Any]]  # (position in the chunk, the values of `_Plan.columns`)


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
