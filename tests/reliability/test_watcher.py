"""Watcher loss: scans are the truth, events only cut latency (docs/reliability.md).

- A burst from 8 writers renaming files in as fast as they can: every file is processed
  (a scan catches what the kernel's inotify queue dropped: `watcher_overflows_total`),
  and `watcher_missed_files_total` counts what the watcher lost with no overflow to
  explain it.
- A non-UTF-8 name is just a name to the inotify reader; it kills watchfiles' generator
  (`poll` mode): the watcher restarts and keeps working, and files arriving during the
  restart are not left behind.
- The inotify watch limit, or the instance limit, is exhausted: the service falls back to
  scanning, says so, and does not crash-loop. The limit is lowered in a user namespace of
  the service's own (`/proc/sys/user/max_inotify_*`): nothing machine-wide changes.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import Service

from reliability.support import (
    RelTree,
    in_userns_with_inotify_limit,
    metric,
    metrics,
    python_route,
    report,
    wait_for,
)

WRITER = r"""
import os, sys
root, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    tmp = f"{root}/.{prefix}-{i}.part"
    with open(tmp, "wb") as f:
        f.write(f"{prefix} {i}\n".encode())
    os.rename(tmp, f"{root}/{prefix}-{i:07d}.csv")
"""


def burst(tree: RelTree, *, total: int, writers: int = 8) -> None:
    tree.configure(
        [python_route("quick", concurrency=8)],
        watch_mode="events",
        scan_interval_s=5,
        min_free_bytes=0,
        max_concurrency=8,
    )
    service = tree.start()
    per = total // writers
    started = time.monotonic()
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tree.transfer), f"w{k}", str(per)])
        for k in range(writers)
    ]
    for p in procs:
        assert p.wait(timeout=600) == 0
    written_s = time.monotonic() - started
    wait_for(
        lambda: tree.settled(per * writers),
        timeout=max(120.0, total / 40),
        interval=1.0,
        what=f"all {per * writers} files to be processed",
    )
    elapsed = time.monotonic() - started
    missed = metric(service, "filedock_watcher_missed_files_total")
    overflows = metric(service, "filedock_watcher_overflows_total")
    detected = metric(service, "filedock_files_detected_total")
    restarts = metric(service, "filedock_watcher_restarts_total")
    assert service.stop() == 0
    dropped = {
        f"w{k}-{i:07d}.csv".encode(): f"w{k} {i}\n".encode()
        for k in range(writers)
        for i in range(per)
    }
    tree.check_invariants(dropped)
    report(
        "watcher_burst",
        files=len(dropped),
        writers=writers,
        written_s=round(written_s, 1),
        processed_s=round(elapsed, 1),
        watcher_missed=missed,
        inotify_overflows=overflows,
        detected=detected,
        watcher_restarts=restarts,
    )
    # The inotify reader loses events only by overflow, which is counted apart; far more
    # means the metric counts files the watcher did report but that waited for room.
    assert missed <= 0.01 * len(dropped), (
        f"watcher_missed_files_total={missed:g} for {len(dropped)} files: it counts files "
        "the watcher did report"
    )
    assert detected <= len(dropped) * 1.05, f"files_detected_total={detected:g}"


def test_burst_of_renames_every_file_processed(rtree: RelTree) -> None:
    burst(rtree, total=20_000)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_burst_of_200k_renames_every_file_processed(rtree: RelTree) -> None:
    burst(rtree, total=200_000)


# -- a name that is not UTF-8 ---------------------------------------------------------


def _mode(service: Service) -> str:
    values = metrics(service)
    return next(
        (
            m
            for m in ("events", "poll", "scan")
            if values.get(f'filedock_watcher_mode{{mode="{m}"}}') == 1.0
        ),
        "",
    )


def test_a_non_utf8_name_is_reported_by_the_inotify_watcher(rtree: RelTree) -> None:
    rtree.configure(
        [python_route("quick")], watch_mode="events", scan_interval_s=300, min_free_bytes=0
    )
    service = rtree.start()
    rtree.drop(b"\xff\xfe.csv", b"a name that is not UTF-8\n")
    rtree.drop("after.csv", b"after\n")
    # No scan runs for 300 s: only the watcher can have reported them.
    wait_for(lambda: rtree.settled(2), timeout=10, what="both files to be processed")
    assert metric(service, "filedock_watcher_restarts_total") == 0
    assert _mode(service) == "events"
    assert service.stop() == 0
    rtree.check_invariants(
        {b"\xff\xfe.csv": b"a name that is not UTF-8\n", b"after.csv": b"after\n"}
    )


def _kill_watcher(tree: RelTree) -> Service:
    """watchfiles (here in `poll` mode) dies on a name that is not UTF-8."""
    tree.configure(
        [python_route("quick")], watch_mode="poll", scan_interval_s=300, min_free_bytes=0
    )
    service = tree.start()
    tree.drop("warm-up.csv", b"warm\n")
    wait_for(lambda: tree.final_count() >= 1, timeout=10, what="the watcher to report a file")
    tree.drop(b"\xff\xfe.csv", b"a name that is not UTF-8\n")
    wait_for(
        lambda: metric(service, "filedock_watcher_restarts_total") >= 1,
        timeout=10,
        what="the watcher to die on the name",
    )
    wait_for(lambda: tree.final_count() >= 2, timeout=10, what="the bad name to be processed")
    return service


def test_watcher_killed_by_a_non_utf8_name_works_again_after_restart(rtree: RelTree) -> None:
    service = _kill_watcher(rtree)
    # The restarted watcher reports its first batch (or its 5 s timeout): poll again.
    wait_for(lambda: _mode(service) == "poll", timeout=20, what="the watcher to restart")
    files = {f"after-{i}.csv".encode(): f"{i}\n".encode() for i in range(20)}
    started = time.monotonic()
    for rel, content in files.items():
        rtree.drop(rel, content)
    wait_for(lambda: rtree.settled(len(files) + 2), timeout=5, what="prompt processing")
    latency = time.monotonic() - started
    restarts = metric(service, "filedock_watcher_restarts_total")
    assert service.stop() == 0
    rows = {bytes(r["name"]) for r in rtree.rows()}
    assert b"\xff\xfe.csv" in rows
    report(
        "watcher_non_utf8",
        restarts=restarts,
        files_after=len(files),
        all_processed_in_s=round(latency, 2),
    )


def test_files_arriving_while_the_watcher_restarts_are_not_left_behind(rtree: RelTree) -> None:
    service = _kill_watcher(rtree)
    files = {}
    for i in range(30):  # 3 s of files, across the watcher's restart backoff (1 s)
        rel = f"during-restart-{i}.csv".encode()
        files[rel] = f"{i}\n".encode()
        rtree.drop(rel, files[rel])
        time.sleep(0.1)  # pacing the writer
    try:
        wait_for(lambda: rtree.settled(len(files) + 2), timeout=10, what="prompt processing")
    finally:
        left = rtree.transfer_files()
        service.stop()
    assert left == 0


# -- the inotify watch limit -----------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "limit", "said"),
    [
        ("max_inotify_watches", 5, "watch limit"),  # the root is watched, subfolders not all
        ("max_inotify_instances", 0, "instance limit"),  # nothing can be watched at all
    ],
)
def test_inotify_limits_fall_back_to_scanning_without_a_crash_loop(
    rtree: RelTree, setting: str, limit: int, said: str
) -> None:
    prefix = in_userns_with_inotify_limit(setting, limit)
    rtree.configure(
        [python_route("quick")], watch_mode="events", scan_interval_s=2, min_free_bytes=0
    )
    for i in range(40):
        (rtree.transfer / f"dir-{i:02d}").mkdir()
    service = rtree.start_argv(prefix)
    files = {f"dir-{i:02d}/f.csv".encode(): f"{i}\n".encode() for i in range(40)}
    for rel, content in files.items():
        rtree.drop(rel, content)
    wait_for(lambda: rtree.settled(len(files)), timeout=30, what="scans to process every file")
    window_start, samples = time.monotonic(), []
    while time.monotonic() - window_start < 8:  # watch the restart counter for 8 s
        assert service.proc.poll() is None, service.log()[-3000:]
        samples.append(metric(service, "filedock_watcher_restarts_total"))
        time.sleep(1)  # sampling interval of the observation, not a synchronisation
    uptime = time.monotonic() - window_start + 2
    restarts = samples[-1]
    assert 1 <= restarts <= 5, f"{restarts} watcher restarts in ~{uptime:.0f}s: a crash loop"
    assert service.get("/healthz")[0] == 200
    assert _mode(service) == "scan"
    errors = [
        line
        for line in service.log_lines()
        if line["level"] in ("ERROR", "WARNING") and "scan" in line["msg"]
    ]
    assert errors and said in errors[0].get("error", ""), errors[:2]
    assert service.stop() == 0
    rtree.check_invariants(files)
    report(
        f"inotify_{setting}",
        limit=limit,
        subdirs=40,
        files=len(files),
        watcher_restarts_in_10s=restarts,
        mode="scan",
    )
