"""An arrival expectation: which files a route is due to receive, and by when.

`schedule` is a cron expression read in `timezone` (`0 6 * * 1-5`: by 06:00 on
weekdays; with six fields the first is the second: `30 0 6 * * 1-5`). Each deadline closes a window
that began at the previous one; `skip_dates` are local dates whose deadline is not
kept (holidays), so their window runs on to the next deadline.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import Field, field_validator

from service.settings.sections import Section

__all__ = ["Expectation"]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class Expectation(Section):
    """`min_files` matching `match` (a glob on the path relative to `transfer/`; the
    route's own match when absent) arrive by each deadline of `schedule`, or within
    `grace_s` after it."""

    name: str = Field(pattern=_NAME)
    schedule: str = Field(min_length=1)
    timezone: str = "UTC"
    match: str | None = None
    min_files: int = Field(default=1, ge=1)
    grace_s: float = Field(default=0.0, ge=0)
    skip_dates: list[date] = Field(default_factory=list)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, expr: str) -> str:
        try:
            CronSim(expr, datetime(2000, 1, 1, tzinfo=UTC))
        except CronSimError as e:
            raise ValueError(
                f"invalid cron expression {expr!r}: {e} ([second] minute hour day month"
                " weekday, e.g. '0 6 * * 1-5')"
            ) from e
        return expr

    @field_validator("timezone")
    @classmethod
    def _zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(
                f"unknown time zone {name!r}; an IANA name such as 'Europe/Berlin' or 'UTC'"
            ) from e
        return name

    @field_validator("match")
    @classmethod
    def _relative_glob(cls, pattern: str | None) -> str | None:
        if pattern is not None and (pattern.startswith("/") or ".." in pattern.split("/")):
            raise ValueError("match is a glob on the path relative to transfer/, without / or ..")
        return pattern

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)
