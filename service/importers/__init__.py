"""Importers: the `Importer` protocol and the built-ins, chosen by `kind`."""

from __future__ import annotations

import anyio

from service.importers.base import Importer, ImportJob, Result
from service.settings import (
    CommandImporterSettings,
    CsvSqlImporterSettings,
    PythonImporterSettings,
    Route,
)

__all__ = ["ImportJob", "Importer", "Result", "build_importer"]


def build_importer(route: Route, *, limiter: anyio.CapacityLimiter) -> Importer:
    """The importer of a route; `limiter` bounds the worker threads of blocking importers."""
    s = route.importer
    if isinstance(s, CommandImporterSettings):
        from service.importers.command import CommandImporter

        return CommandImporter(s)
    if isinstance(s, PythonImporterSettings):
        from service.importers.python import PythonImporter

        return PythonImporter(s, limiter=limiter)
    if isinstance(s, CsvSqlImporterSettings):
        from service.importers.csv_sql import CsvSqlImporter

        return CsvSqlImporter(s, limiter=limiter)
    raise AssertionError(f"unknown importer kind {s!r}")
