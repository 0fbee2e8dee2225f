"""The archive's dated folders (`YYYY/MM/DD`): which began before a cutoff, and which
are empty and wholly older than it, to be removed (or listed, for a dry run).
Blocking: the reaper runs these in threads."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

__all__ = ["Day", "old_days", "prune", "prune_plan", "subdirs"]

_DAY: Final = 86400.0
_YEAR = re.compile(r"^\d{4}\Z")
_TWO_DIGITS = re.compile(r"^\d{2}\Z")


@dataclass(frozen=True)
class Day:
    path: Path
    end: float
    month_end: float
    year_end: float


def subdirs(path: Path, pattern: re.Pattern[str]) -> list[str]:
    """Names of real directories (never symlinks) in `path` matching `pattern`, sorted."""
    try:
        with os.scandir(path) as it:
            names = [
                e.name for e in it if pattern.match(e.name) and e.is_dir(follow_symlinks=False)
            ]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(names)


def _utc(year: int, month: int = 1, day: int = 1) -> float:
    return datetime(year, month, day, tzinfo=UTC).timestamp()


def old_days(root: Path, cutoff: float) -> list[Day]:
    """The `YYYY/MM/DD` folders of the archive that began before `cutoff`, oldest first."""
    days: list[Day] = []
    for y in subdirs(root, _YEAR):
        year = int(y)
        if year < 1970 or _utc(year) >= cutoff:
            continue
        year_end = _utc(year + 1)
        for m in subdirs(root / y, _TWO_DIGITS):
            month = int(m)
            if not 1 <= month <= 12 or _utc(year, month) >= cutoff:
                continue
            month_end = _utc(year + 1) if month == 12 else _utc(year, month + 1)
            for d in subdirs(root / y / m, _TWO_DIGITS):
                try:
                    start = _utc(year, month, int(d))
                except ValueError:
                    continue  # not a date (02/31): not ours to judge
                if start < cutoff:
                    days.append(Day(root / y / m / d, start + _DAY, month_end, year_end))
    return days


def _empty_periods(days: list[Day], cutoff: float) -> list[Path]:
    """Day, month and year folders wholly older than `cutoff`, children before parents."""
    months = {d.path.parent: d.month_end for d in days}
    years = {d.path.parent.parent: d.year_end for d in days}
    return (
        [d.path for d in days if d.end <= cutoff]
        + sorted(p for p, end in months.items() if end <= cutoff)
        + sorted(p for p, end in years.items() if end <= cutoff)
    )


def prune(days: list[Day], cutoff: float) -> list[Path]:
    pruned: list[Path] = []
    for path in _empty_periods(days, cutoff):
        try:
            path.rmdir()  # only when empty: whatever is left in it stays
        except OSError:
            continue
        pruned.append(path)
    return pruned


def prune_plan(days: list[Day], gone: set[Path], cutoff: float) -> list[Path]:
    """What `_prune` would remove once the paths in `gone` are deleted."""
    gone = set(gone)
    plan: list[Path] = []
    for path in _empty_periods(days, cutoff):
        try:
            if all(path / name in gone for name in os.listdir(path)):
                plan.append(path)
                gone.add(path)
        except OSError:
            continue
    return plan
