"""Test-only crash points: `FILEDOCK_TEST_CRASH_AT=point:nth` makes the process SIGKILL
itself the nth time it passes `point`. Inert unless that variable is set.

The reliability suite uses them to prove that a crash at any step of the
protocol leaves the invariants intact after a restart. Points: mid_claim (between
the claim's mkdir and rename), after_vet, after_claim, before_import, after_import,
mid_archive, after_archive_rename, after_ledger_done, mid_fail.
"""

from __future__ import annotations

import errno
import os
import signal
import threading

__all__ = ["FSYNC_POINTS", "POINTS", "crash_point", "fsync_fault"]

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


# `FILEDOCK_TEST_FAIL_FSYNC=point:nth`: the nth barrier at `point` fails with EIO, as a
# failing disk would. Points: build (the archive copy, before its rename), publish
# (after the rename). Inert unless set; test-only.
FSYNC_POINTS = frozenset({"build", "publish"})


def _parse_fsync(spec: str) -> tuple[str, int] | None:
    if not spec:
        return None
    point, _, nth = spec.partition(":")
    if point not in FSYNC_POINTS:
        raise ValueError(f"FILEDOCK_TEST_FAIL_FSYNC: unknown point {point!r}")
    return point, int(nth or "1")


_fsync_target = _parse_fsync(os.environ.get("FILEDOCK_TEST_FAIL_FSYNC", ""))
_fsync_count = 0


def fsync_fault(name: str) -> None:
    """Raise EIO here the nth time when the test setting asks for it; otherwise nothing."""
    global _fsync_count
    if _fsync_target is None or _fsync_target[0] != name:
        return
    with _lock:
        _fsync_count += 1
        if _fsync_count == _fsync_target[1]:
            raise OSError(errno.EIO, os.strerror(errno.EIO), "(FILEDOCK_TEST_FAIL_FSYNC)")
