"""Importers: the `Importer` protocol and the built-ins, chosen by `kind`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.importers.base import GroupImporter, Importer, ImportJob, Outcome, Result

if TYPE_CHECKING:  # the archive worker unpickles a `Result`: no pydantic there
    import anyio

    from service.settings import Route

__all__ = [
    "GroupImporter",
    "ImportJob",
    "Importer",
    "Outcome",
    "Result",
    "build_importer",
    "group_importer",
]


def build_importer(route: Route, *, limiter: anyio.CapacityLimiter) -> Importer | None:
    """The importer of a route (none for `importer: none`); `limiter` bounds the worker
    threads of blocking importers."""
    s = route.importer
    if s == "none":
        return None
    if s.kind == "command":
        from service.importers.command import CommandImporter

        return CommandImporter(s)
    if s.kind == "python":
        from service.importers.python import PythonImporter

        return PythonImporter(s, limiter=limiter)
    if s.kind == "csv-sql":
        from service.importers.csv_sql import CsvSqlImporter

        return CsvSqlImporter(s, limiter=limiter)
    raise AssertionError(f"unknown importer kind {s!r}")


def group_importer(importer: Importer | None) -> GroupImporter | None:
    """`importer`, when it can take several jobs in one go: a sync python callable,
    whose quick imports then share a worker thread's call. A command or an async
    callable gains nothing, and csv-sql's imports are transactions of their own."""
    from service.importers.python import PythonImporter

    if isinstance(importer, PythonImporter) and not importer.is_async:
        return importer
    return None
