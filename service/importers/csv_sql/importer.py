"""One import attempt, and `CsvSqlImporter`, which runs it in a worker thread."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread

from service.errors import Reject, Retry
from service.importers.base import ImportJob, Result
from service.importers.csv_sql.backends import _Backend, _first_line, _Recorded, _SqliteBackend
from service.importers.csv_sql.outputs import _Outputs
from service.importers.csv_sql.plan import _Checked, _Plan, _plan
from service.importers.csv_sql.postgres import _PostgresBackend
from service.importers.csv_sql.reading import _choose_encoding, _Chunk, _Source
from service.settings import CsvSqlImporterSettings

__all__ = ["CsvSqlImporter"]


def _connect(settings: CsvSqlImporterSettings) -> _Backend:
    if settings.database_url.startswith("sqlite:///"):
        return _SqliteBackend(settings)
    return _PostgresBackend(settings)


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
