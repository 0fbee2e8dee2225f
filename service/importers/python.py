"""The `python` importer: a callable loaded by dotted path, `package.module:callable`.

The callable receives the `ImportJob` (and the route's `options` as keyword
arguments). It may be async, or sync (then it runs in a worker thread of the
imports' own limiter; when several jobs wait, quick imports share a thread call, see
`run_group`). It returns a `Result`, a dict (kept as the manifest's
importer detail) or None; it raises `Retry` or `Reject` to steer the job.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from service.errors import ConfigError
from service.importers.base import ImportJob, Outcome, Result
from service.settings import PythonImporterSettings

__all__ = ["GROUP_BUDGET_S", "PythonImporter", "load_callable"]

GROUP_BUDGET_S = 0.05  # a worker thread's call starts no further import after this


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
        return self._result(value)

    async def run_group(self, jobs: Sequence[ImportJob], timeout_s: float) -> list[Outcome]:
        """A sync callable's imports, in turn, several to a worker thread's call.

        A call starts a further job only within `GROUP_BUDGET_S` of its own start: quick
        imports share the cost of a thread hand-off, a slow one runs alone.
        Each job has its whole `timeout_s` (and up to the budget more); when it runs
        out, the thread is abandoned as `__call__` abandons it, and the jobs after the
        one that hung go on in a fresh call.
        """
        outcomes: list[Outcome] = []
        while len(outcomes) < len(jobs):
            call = _GroupCall(jobs[len(outcomes) :], self._run_one)
            try:
                with anyio.fail_after(timeout_s + GROUP_BUDGET_S):
                    await anyio.to_thread.run_sync(
                        call, limiter=self.limiter, abandon_on_cancel=True
                    )
            except TimeoutError:
                outcomes += call.stop()
            else:
                outcomes += call.outcomes
        return outcomes

    def _run_one(self, job: ImportJob) -> Outcome:
        try:
            return Outcome(self._result(self.func(job, **self.settings.options)))
        except Exception as e:
            return Outcome(error=e)

    def _result(self, value: Any) -> Result:
        detail = {"kind": "python", "callable": self.settings.callable}
        if isinstance(value, Result):
            value.detail = _plain({**detail, **value.detail})
            return value
        if isinstance(value, dict):
            return Result(detail=_plain({**detail, **value}))
        return Result(detail=detail)


class _GroupCall:
    """One worker thread's share of a group: jobs in turn while within the budget.

    The lock orders the thread's steps against `stop`, so a job is either finished
    (its outcome kept) or charged the timeout, never both nor neither.
    """

    def __init__(self, jobs: Sequence[ImportJob], run_one: Callable[[ImportJob], Outcome]):
        self.jobs, self.run_one = jobs, run_one
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._running_since: float | None = None

    def __call__(self) -> None:
        first = time.monotonic()
        for job in self.jobs:
            with self._lock:
                if self._stopped or (self.outcomes and time.monotonic() - first > GROUP_BUDGET_S):
                    return
                started = self._running_since = time.monotonic()
            outcome = self.run_one(job)
            outcome.elapsed_s = time.monotonic() - started
            with self._lock:
                if self._stopped:
                    return  # it ran out of time meanwhile: `stop` charged it the timeout
                self._running_since = None
                self.outcomes.append(outcome)

    def stop(self) -> list[Outcome]:
        """Time is up: the outcomes so far, and a timeout for the job that was running
        (or for the first job, if the call never got a thread)."""
        with self._lock:
            self._stopped = True
            out = list(self.outcomes)
            if self._running_since is not None:
                out.append(
                    Outcome(error=TimeoutError(), elapsed_s=time.monotonic() - self._running_since)
                )
            elif not out:
                out.append(Outcome(error=TimeoutError()))
        return out


def _plain(detail: dict[str, Any]) -> dict[str, Any]:
    """The importer's facts as the manifest will hold them: what JSON cannot hold (a
    `Decimal`, a `datetime`, an object) becomes its `str()`. Plain data also crosses to
    the archive worker process, where an object might not unpickle."""
    plain: dict[str, Any] = json.loads(json.dumps(detail, default=str))
    return plain
