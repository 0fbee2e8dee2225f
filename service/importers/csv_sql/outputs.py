"""The output files: `<stem>.finished<suffix>` and `<stem>.pending<suffix>`."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final, TextIO

from service.importers.base import ImportJob
from service.importers.csv_sql.plan import ERROR_COLUMN, _Plan
from service.settings import CsvSqlImporterSettings

_LOG_ERRORS: Final = 20


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
