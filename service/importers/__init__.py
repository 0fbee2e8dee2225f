"""Importers: the `Importer` protocol and the built-ins, chosen by `kind`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.importers.base import Importer, ImportJob, Result

if TYPE_CHECKING:  # the archive worker unpickles a `Result`: no pydantic there
    import anyio

    from service.settings import Route

__all__ = ["ImportJob", "Importer", "Result", "build_importer"]


def build_importer(route: Route, *, limiter: anyio.CapacityLimiter) -> Importer:
    """The importer of a route; `limiter` bounds the worker threads of blocking importers."""
    s = route.importer
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
