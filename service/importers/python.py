"""The `python` importer: a callable loaded by dotted path, `package.module:callable`.

The callable receives the `ImportJob` (and the route's `options` as keyword
arguments). It may be async, or sync (then it runs in a worker thread of the
imports' own limiter). It returns a `Result`, a dict (kept as the manifest's
importer detail) or None; it raises `Retry` or `Reject` to steer the job.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
from collections.abc import Callable
from typing import Any

import anyio

from service.errors import ConfigError
from service.importers.base import ImportJob, Result
from service.settings import PythonImporterSettings

__all__ = ["PythonImporter", "load_callable"]


def load_callable(dotted: str) -> Callable[..., Any]:
    """Import `package.module:attr.path`, with the cause chained when it fails."""
    module_name, _, attr_path = dotted.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"importer callable {dotted!r}: cannot import {module_name!r}: {e}"
        ) from e
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as e:
            raise ConfigError(f"importer callable {dotted!r}: no attribute {attr!r}") from e
    if not callable(obj):
        raise ConfigError(f"importer callable {dotted!r} is not callable")
    return obj  # type: ignore[no-any-return]


class PythonImporter:
    def __init__(self, settings: PythonImporterSettings, *, limiter: anyio.CapacityLimiter) -> None:
        self.settings = settings
        self.func = load_callable(settings.callable)
        self.limiter = limiter
        self.is_async = inspect.iscoroutinefunction(self.func) or inspect.iscoroutinefunction(
            getattr(self.func, "__call__", None)  # noqa: B004 - async callable objects
        )

    async def __call__(self, job: ImportJob) -> Result:
        options = self.settings.options
        if self.is_async:
            value = await self.func(job, **options)
        else:
            value = await anyio.to_thread.run_sync(
                functools.partial(self.func, job, **options),
                limiter=self.limiter,
                abandon_on_cancel=True,
            )
        detail = {"kind": "python", "callable": self.settings.callable}
        if isinstance(value, Result):
            value.detail = _plain({**detail, **value.detail})
            return value
        if isinstance(value, dict):
            return Result(detail=_plain({**detail, **value}))
        return Result(detail=detail)


def _plain(detail: dict[str, Any]) -> dict[str, Any]:
    """The importer's facts as the manifest will hold them: what JSON cannot hold (a
    `Decimal`, a `datetime`, an object) becomes its `str()`. Plain data also crosses to
    the archive worker process, where an object might not unpickle."""
    plain: dict[str, Any] = json.loads(json.dumps(detail, default=str))
    return plain
