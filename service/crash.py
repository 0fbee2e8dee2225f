"""Test-only crash points: `FILEDOCK_TEST_CRASH_AT=point:nth` makes the process SIGKILL
itself the nth time it passes `point`. Inert unless that variable is set.

The reliability suite uses them to prove that a crash at any step of the
protocol leaves the invariants intact after a restart. Points: mid_claim (between
the claim's mkdir and rename), after_vet, after_claim, before_import, after_import,
mid_archive, after_archive_rename, after_ledger_done, mid_fail, before_delivery (an
attempt counted, nothing sent), mid_delivery (a sink's temp file or multipart upload
begun, not published), after_delivery (the remote holds the bytes, the ledger
does not know yet), after_event_sent (a channel took events, the outbox does not
know yet).
"""

from __future__ import annotations

import errno
import os
import signal
import threading

__all__ = ["FSYNC_POINTS", "POINTS", "crash_point", "fsync_fault", "kill_parent_too"]

POINTS = frozenset(
    {
        "mid_claim",
        "after_vet",
        "after_claim",
        "before_import",
        "after_import",
        "mid_archive",
        "after_archive_rename",
        "after_ledger_done",
        "mid_fail",
        "before_delivery",
        "mid_delivery",
        "after_delivery",
        "after_event_sent",
    }
)


class _Trigger:
    """`VAR=point:nth` from the environment: fires the nth time `point` is passed."""

    def __init__(self, var: str, points: frozenset[str]) -> None:
        self.var = var
        self.point: str | None = None
        self.nth = 0
        self.count = 0
        spec = os.environ.get(var, "")
        if spec:
            point, _, nth = spec.partition(":")
            if point not in points:
                raise ValueError(f"{var}: unknown point {point!r}; known: {sorted(points)}")
            self.point, self.nth = point, int(nth or "1")

    def fires(self, name: str) -> bool:
        if self.point != name:
            return False
        with _lock:
            self.count += 1
            return self.count == self.nth


_lock = threading.Lock()
_crash = _Trigger("FILEDOCK_TEST_CRASH_AT", POINTS)
_also_kill: int | None = None


def kill_parent_too() -> None:
    """Called in the archiver's worker process: a crash point there is a crash of the
    service, so it kills the service (the parent) first."""
    global _also_kill
    _also_kill = os.getppid()


def crash_point(name: str) -> None:
    """SIGKILL this process here when the test setting asks for it; otherwise nothing."""
    if _crash.fires(name):
        if _also_kill is not None:
            os.kill(_also_kill, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


# `FILEDOCK_TEST_FAIL_FSYNC=point:nth`: the nth barrier at `point` fails with EIO, as a
# failing disk would. Points: build (the archive copy, before its rename), publish
# (after the rename). Inert unless set; test-only.
FSYNC_POINTS = frozenset({"build", "publish"})
_fsync = _Trigger("FILEDOCK_TEST_FAIL_FSYNC", FSYNC_POINTS)


def fsync_fault(name: str) -> None:
    """Raise EIO here the nth time when the test setting asks for it; otherwise nothing."""
    if _fsync.fires(name):
        raise OSError(errno.EIO, os.strerror(errno.EIO), "(FILEDOCK_TEST_FAIL_FSYNC)")
