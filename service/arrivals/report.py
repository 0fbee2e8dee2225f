"""What `filedock expectations` and `filedock status` say of each expectation: its
schedule, its current window's deadline and its last windows' judgements."""

from __future__ import annotations

from typing import Any

from service.arrivals.judge import local_time
from service.arrivals.schedule import deadlines
from service.ledger import Ledger
from service.settings import Settings
from service.storage.names import rfc3339

__all__ = ["expectations_report", "render_expectations"]


async def expectations_report(
    settings: Settings, ledger: Ledger, now: float, *, last: int = 5
) -> list[dict[str, Any]]:
    """Per expectation, the `last` judged windows (newest first) and the deadline of the
    window now open (its grace may still be running)."""
    out = []
    for route in settings.routes:
        for e in route.expect:
            rows = await ledger.windows(route.name, e.name, last + 1)
            judged = [w for w in rows if w.judgement != "watching"][:last]
            after = rows[0].deadline if rows else now
            deadline = next(deadlines(e, after), None)
            out.append(
                {
                    "route": route.name,
                    "expectation": e.name,
                    "schedule": e.schedule,
                    "timezone": e.timezone,
                    "match": e.match or route.match,
                    "min_files": e.min_files,
                    "grace_s": e.grace_s,
                    "next_deadline": rfc3339(deadline),
                    "next_deadline_local": None if deadline is None else local_time(e, deadline),
                    "missing": bool(judged) and judged[0].judgement == "missing",
                    "windows": [
                        {**w.to_json(), "deadline_local": local_time(e, w.deadline)} for w in judged
                    ],
                }
            )
    return out


def render_expectations(report: list[dict[str, Any]]) -> list[str]:
    """The report as text lines: an expectation per line, its windows indented."""
    lines = []
    for x in report:
        every = f"{x['schedule']!r} ({x['timezone']})"
        need = f"{x['min_files']} x {x['match']!r}"
        grace = f", grace {x['grace_s']:g} s" if x["grace_s"] else ""
        lines.append(f"{x['route']}/{x['expectation']}: {need} by {every}{grace}")
        lines.append(f"    next deadline: {x['next_deadline_local'] or 'none'}")
        if not x["windows"]:
            lines.append("    no window judged yet")
        for w in x["windows"]:
            files = f"{w['files']} file" + ("" if w["files"] == 1 else "s")
            failed = f", {w['failed']} failed" if w["failed"] else ""
            lines.append(f"    {w['deadline_local']:<24} {w['judgement']:<8} {files}{failed}")
    return lines
