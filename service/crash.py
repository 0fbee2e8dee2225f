"""Test-only crash points: `FILEDOCK_TEST_CRASH_AT=point:nth` makes the process SIGKILL
itself the nth time it passes `point`. Inert unless that variable is set.

The reliability suite uses them to prove that a crash at any step of the
protocol leaves the invariants intact after a restart. Points: after_vet,
after_claim, before_import, after_import, mid_archive, after_archive_rename,
after_ledger_done, mid_fail.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["POINTS", "crash_point"]

POINTS = frozenset(
    {
        "after_vet",
        "after_claim",
        "before_import",
        "after_import",
        "mid_archive",
        "after_archive_rename",
        "after_ledger_done",
        "mid_fail",
    }
)


def _parse(spec: str) -> tuple[str, int] | None:
    if not spec:
        return None
    point, _, nth = spec.partition(":")
    if point not in POINTS:
        raise ValueError(
            f"FILEDOCK_TEST_CRASH_AT: unknown point {point!r}; known: {sorted(POINTS)}"
        )
    return point, int(nth or "1")


_target = _parse(os.environ.get("FILEDOCK_TEST_CRASH_AT", ""))
_count = 0
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """SIGKILL this process here when the test setting asks for it; otherwise nothing."""
    global _count
    if _target is None or _target[0] != name:
        return
    with _lock:
        _count += 1
        if _count == _target[1]:
            os.kill(os.getpid(), signal.SIGKILL)
