"""Arrival expectations: each route's `expect:` schedules, and their windows judged."""

from service.arrivals.judge import Judge, arrival_event, judge_window, local_time
from service.arrivals.schedule import deadlines, previous_deadline

__all__ = [
    "Judge",
    "arrival_event",
    "deadlines",
    "judge_window",
    "local_time",
    "previous_deadline",
]
