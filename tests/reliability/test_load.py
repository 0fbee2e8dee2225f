"""Sustained load with rolling restarts: no loss, flat memory and file descriptors.

Files arrive at a steady rate; every `restart_every_s` the service gets SIGTERM (a rolling
restart of a single replica) and a new one starts. RSS (/proc/<pid>/status) and the open
descriptors (/proc/<pid>/fd) are sampled through each process's life.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest

from reliability.support import RelTree, check_i4, python_route, report, rss_and_fds, wait_for


def sustained(tree: RelTree, *, rate: float, duration_s: float, restart_every_s: float) -> None:
    tree.configure(
        [python_route("quick", concurrency=8)],
        max_concurrency=8,
        scan_interval_s=5,
        min_free_bytes=0,
        shutdown_grace_s=10,
    )
    files: dict[bytes, bytes] = {}
    stop = threading.Event()

    def generate() -> None:
        started, i = time.monotonic(), 0
        while not stop.is_set() and time.monotonic() - started < duration_s:
            rel = f"feed-{i % 10}/f-{i:07d}.csv".encode()
            files[rel] = f"{i},{time.time()}\n".encode()
            tree.drop(rel, files[rel])
            i += 1
            ahead = i / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)  # pacing the load generator

    generator = threading.Thread(target=generate)
    service = tree.start()
    lives: list[list[tuple[float, int, int]]] = [[]]
    born = started = time.monotonic()
    backlog_max = restarts = 0
    generator.start()
    try:
        while generator.is_alive():
            time.sleep(1.0)  # the sampling interval
            now = time.monotonic()
            lives[-1].append((now - born, *rss_and_fds(service.proc.pid)))
            backlog_max = max(backlog_max, tree.transfer_files())
            if now - born >= restart_every_s and now - started < duration_s - 5:
                assert service.stop(signal.SIGTERM) == 0, service.log()[-3000:]
                service = tree.start()
                born, restarts = time.monotonic(), restarts + 1
                lives.append([])
    finally:
        stop.set()
        generator.join()
    offered_s = time.monotonic() - started
    wait_for(
        lambda: tree.settled(len(files)),
        timeout=max(120.0, len(files) / 50),
        interval=1.0,
        what=f"all {len(files)} files to end",
    )
    drained_s = time.monotonic() - started - offered_s
    assert service.stop(signal.SIGTERM) == 0
    tree.check_invariants(files)
    figures = check_i4(tree, set(files))
    growth = []
    for samples in lives:
        steady = [s for s in samples if s[0] >= 5]  # after start-up and recovery
        if len(steady) < 3:
            continue
        rss = [s[1] for s in steady]
        fds = [s[2] for s in steady]
        growth.append((min(rss), max(rss), min(fds), max(fds)))
    report(
        "sustained_load",
        rate=rate,
        duration_s=duration_s,
        files=len(files),
        achieved_rate=round(len(files) / offered_s, 1),
        restarts=restarts,
        backlog_max=backlog_max,
        drained_after_s=round(drained_s, 1),
        rss_mb=[(round(a / 2**20), round(b / 2**20)) for a, b, _, _ in growth],
        fds=[(c, d) for _, _, c, d in growth],
        lost=0,
        **figures,
    )
    for rss_min, rss_max, fd_min, fd_max in growth:
        assert rss_max - rss_min <= max(40 << 20, rss_min // 3), f"RSS grew: {growth}"
        assert fd_max - fd_min <= 24, f"file descriptors grew: {growth}"


def test_sustained_load_with_a_restart_short(rtree: RelTree) -> None:
    sustained(rtree, rate=200, duration_s=30, restart_every_s=15)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sustained_load_10_minutes_with_rolling_restarts(rtree: RelTree) -> None:
    sustained(rtree, rate=200, duration_s=600, restart_every_s=120)
