"""Progress of long work: the archive worker's progress files, read back by `status`,
`show`, the log line and the gauges."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import FiledockTree, command_route, wait_for
from prometheus_client import CollectorRegistry

from service.face.metrics import Metrics
from service.face.progress import ProgressReporter, describe
from service.storage.codec import BLOCK, Codec, compress_into
from service.storage.progress import STALE_S, Progress, read_progress


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_a_progress_file_is_written_once_a_second_and_removed_at_the_end(tmp_path: Path) -> None:
    clock = Clock()
    p = Progress(tmp_path, "J1", "orders", "archive", 100, clock=clock)
    p.add(10)  # the first add writes at once
    assert [d["done"] for d in read_progress(tmp_path, now=clock.now)] == [10]
    clock.now += 0.5
    p.add(10)
    assert [d["done"] for d in read_progress(tmp_path, now=clock.now)] == [10]
    clock.now += 0.6
    p.add(10)
    [doc] = read_progress(tmp_path, now=clock.now)
    assert (doc["job_id"], doc["route"], doc["stage"], doc["done"], doc["total"]) == (
        "J1",
        "orders",
        "archive",
        30,
        100,
    )
    assert read_progress(tmp_path, now=clock.now + STALE_S + 1) == []  # a killed process left it
    p.close()
    assert read_progress(tmp_path, now=clock.now) == []
    assert os.listdir(tmp_path) == []


def test_compressing_reports_every_block_written(tmp_path: Path) -> None:
    src = tmp_path / "big.csv"
    src.write_bytes(b"1,alpha,2026-12-07\n" * (5 * BLOCK // 19 + 1))
    seen: list[int] = []
    fd = os.open(src, os.O_RDONLY)
    try:
        compress_into(fd, str(tmp_path / "big.gz"), Codec(), threads=2, progress=seen.append)
    finally:
        os.close(fd)
    assert sum(seen) == src.stat().st_size
    assert len(seen) == 6 and all(n == BLOCK for n in seen[:5])


def test_the_reporter_logs_long_jobs_of_its_own_and_sets_the_gauges(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics(CollectorRegistry())
    reporter = ProgressReporter(Path("/nonexistent"), metrics, {"J1", "J2"}.__contains__)
    docs: list[dict[str, Any]] = [
        {"job_id": "J1", "route": "orders", "stage": "archive", "done": 3 << 30, "total": 20 << 30,
         "started_at": 900.0},
        {"job_id": "J2", "route": "orders", "stage": "archive", "done": 1 << 20, "total": 80 << 20,
         "started_at": 998.0},  # started 2 s ago: not logged yet
        {"job_id": "J3", "route": "orders", "stage": "archive", "done": 5, "total": 9,
         "started_at": 900.0},  # another replica's
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="filedock.progress"):
        reporter.report(docs, 1000.0)
    assert [r.getMessage() for r in caplog.records] == [
        "archive: 3.0 GiB of 20.0 GiB (15 %), 100 s"
    ]

    def gauge(name: str) -> float | None:
        labels = {"route": "orders", "stage": "archive"}
        return metrics.registry.get_sample_value(f"filedock_{name}", labels)

    assert gauge("work_in_progress_bytes") == (3 << 30) + (1 << 20)
    assert gauge("work_in_progress_total_bytes") == (20 << 30) + (80 << 20)
    reporter.report([], 1010.0)  # both ended
    assert gauge("work_in_progress_bytes") == 0
    assert gauge("work_in_progress_total_bytes") == 0


def test_status_and_show_tell_how_far_a_large_archive_has_come(tree: FiledockTree) -> None:
    # zstd at level 19 archives 128 MiB of text slowly enough to be seen at work.
    tree.configure(routes=[command_route(archive={"compression": "zstd", "level": 19})])
    size = 128 << 20
    tree.drop("extract.csv", os.urandom(1 << 16).hex().encode() * (size // (1 << 17)))
    service = tree.start()
    try:

        def in_progress() -> list[dict[str, Any]]:
            result = tree.cli("status", "--json")
            assert result.returncode == 0, result.stderr
            return list(json.loads(result.stdout)["in_progress"])

        [doc] = wait_for(in_progress, timeout=60, what="the archive in `status`")
        assert (doc["route"], doc["stage"], doc["total"]) == ("main", "archive", size)
        assert 0 <= doc["done"] < size
        shown = tree.cli("show", doc["job_id"])
        assert shown.returncode == 0
        assert "progress: archive: " in shown.stdout
        tree.wait_final(1, timeout=120)
        assert in_progress() == []
    finally:
        service.stop()
    assert describe({"stage": "archive", "done": 0, "total": 0, "started_at": 5}, 5) == (
        "archive: 0 MiB of 0 MiB (0 %), 0 s"
    )
