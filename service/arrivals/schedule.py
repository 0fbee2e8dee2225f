"""An expectation's deadlines, read from its cron schedule in its time zone.

cronsim keeps a wall-clock time through the daylight-saving changes the way cron
does: a deadline at a time the spring change skips (02:30 in Europe/Berlin on the
last Sunday of March) falls at the first moment after the gap (03:00), and one at a
time the autumn change repeats falls once, at its first occurrence.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from cronsim import CronSim

from service.settings.expect import Expectation

__all__ = ["deadlines", "previous_deadline"]


def deadlines(expectation: Expectation, after: float) -> Iterator[float]:
    """The deadlines strictly after `after` (Unix seconds), in order, less the ones on
    a skipped date.

    >>> from service.settings import Expectation
    >>> weekdays = Expectation(name="orders", schedule="0 6 * * 1-5", timezone="Europe/Berlin")
    >>> friday_noon = datetime.fromisoformat("2026-03-27T12:00+01:00").timestamp()
    >>> it = deadlines(weekdays, friday_noon)
    >>> datetime.fromtimestamp(next(it), weekdays.zone).isoformat()
    '2026-03-30T06:00:00+02:00'
    """
    skipped = set(expectation.skip_dates)
    start = datetime.fromtimestamp(after, expectation.zone)
    for moment in CronSim(expectation.schedule, start):
        if moment.date() not in skipped:
            yield moment.timestamp()


def previous_deadline(expectation: Expectation, before: float) -> float | None:
    """The last deadline strictly before `before`, or None when the schedule has none."""
    skipped = set(expectation.skip_dates)
    start = datetime.fromtimestamp(before, expectation.zone)
    for moment in CronSim(expectation.schedule, start, reverse=True):
        if moment.date() not in skipped:
            return moment.timestamp()
    return None
