"""Ordered lanes, content dedup, per-route concurrency, and a bounded backlog."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from conftest import FiledockTree


def recording_route(name: str, match: str, sleep_s: float = 0.0, **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": match,
        "importer": {
            "kind": "python",
            "callable": "recording_importer:record",
            "options": {"sleep_s": sleep_s},
        },
        "max_attempts": 2,
        "backoff_s": 0,
        "max_backoff_s": 0,
        **kw,
    }


def _drop_aged(tree: FiledockTree, names: list[str]) -> None:
    """Drop files whose mtimes give their age order (oldest first in `names`)."""
    now = time.time()
    for i, name in enumerate(names):
        path = tree.drop(name, name.encode())
        os.utime(path, (now - 1000 + i, now - 1000 + i))


def _imports(tree: FiledockTree) -> list[dict[str, Any]]:
    return sorted((r for r in tree.records() if r["event"] == "import"), key=lambda r: r["started"])


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["started"] < b["ended"] and b["started"] < a["ended"]


def test_fifo_is_one_at_a_time_oldest_first(tree: FiledockTree) -> None:
    names = [f"batch/{n}.csv" for n in ("c", "a", "e", "b", "d", "f")]  # not alphabetical
    tree.configure([recording_route("fifo", "**", sleep_s=0.05, order="fifo", concurrency=4)])
    _drop_aged(tree, names)
    assert tree.run_once().returncode == 0
    runs = _imports(tree)
    assert [r["rel"] for r in runs] == names  # mtime order, not name or directory order
    for a, b in itertools.pairwise(runs):
        assert a["ended"] <= b["started"], "fifo imports overlapped"


def test_partition_keeps_order_per_key_and_runs_keys_in_parallel(tree: FiledockTree) -> None:
    route = recording_route(
        "byc",
        "*.csv",
        sleep_s=0.3,
        order="partition",
        partition_key=r"^(?P<key>[a-z]+)-",
        concurrency=4,
    )
    tree.configure([route])
    names = [f"{c}-{i}.csv" for i in range(3) for c in ("acme", "globex", "initech")]
    _drop_aged(tree, names)
    assert tree.run_once().returncode == 0
    runs = _imports(tree)
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_key.setdefault(r["rel"].split("-")[0], []).append(r)
    for key, same in by_key.items():
        assert [r["rel"] for r in same] == [f"{key}-{i}.csv" for i in range(3)]
        for a, b in itertools.pairwise(same):
            assert not _overlap(a, b), f"two {key} files ran at once"
    first = {key: same[0] for key, same in by_key.items()}
    assert _overlap(first["acme"], first["globex"]), "different keys did not run in parallel"


def test_duplicates_skip_archives_without_import(tree: FiledockTree) -> None:
    tree.configure([recording_route("dedup", "*.csv", duplicates="skip")])
    tree.drop("monday.csv", b"same content\n")
    assert tree.run_once().returncode == 0
    tree.drop("tuesday.csv", b"same content\n")
    tree.drop("monday.csv", b"different content\n")
    assert tree.run_once().returncode == 0
    rows = {(bytes(r["name"]), r["sha256"][:8]): r for r in tree.rows()}
    assert len(rows) == 3 and len(tree.archived()) == 3
    dup = next(r for r in tree.rows() if r["outcome"] == "duplicate")
    original = next(r for r in tree.rows() if r["id"] == dup["duplicate_of"])
    assert bytes(dup["name"]) == b"tuesday.csv" and bytes(original["name"]) == b"monday.csv"
    assert dup["attempts"] == 0
    assert [r["rel"] for r in _imports(tree)] == ["monday.csv", "monday.csv"]  # never tuesday
    shown = tree.jobs("--route", "dedup")
    assert {j["outcome"] for j in shown} == {"imported", "duplicate"}


def test_duplicates_import_is_the_default(tree: FiledockTree) -> None:
    tree.configure([recording_route("plain", "*.csv")])
    tree.drop("a.csv", b"x")
    tree.drop("b.csv", b"x")
    assert tree.run_once().returncode == 0
    assert len(_imports(tree)) == 2


def test_a_slow_route_does_not_starve_the_others(tree: FiledockTree) -> None:
    tree.configure(
        [
            recording_route("slow", "slow/*", sleep_s=2.0, concurrency=2),
            recording_route("fast", "fast/*", concurrency=2),
        ],
        max_concurrency=4,
    )
    for i in range(6):
        tree.drop(f"slow/{i}.bin", b"s")
    for i in range(20):
        tree.drop(f"fast/{i}.bin", b"f")
    assert tree.run_once(timeout=120).returncode == 0
    runs = _imports(tree)
    slow = [r for r in runs if r["route"] == "slow"]
    fast = [r for r in runs if r["route"] == "fast"]
    assert max(r["ended"] for r in fast) < slow[2]["started"] + 1.0, "fast files waited on slow"
    running = max(sum(1 for o in slow if _overlap(o, r)) for r in slow)
    assert running <= 2  # the slow route never exceeded its concurrency


@pytest.mark.parametrize(
    "files",
    [1_000, 20_000, pytest.param(100_000, marks=[pytest.mark.slow, pytest.mark.timeout(1800)])],
)
def test_backlog_waits_on_disk_not_in_memory(tree: FiledockTree, files: int) -> None:
    """The RSS of draining a backlog does not grow with it (figures: docs/benchmarks.md)."""
    tree.configure([recording_route("bulk", "**")], queue_size=256)
    for i in range(files):
        (tree.transfer / f"{i:06d}.dat").write_bytes(b"x")
    env = tree.env(FILEDOCK_TEST_RECORD=os.devnull)
    # A fresh parent whose only child is the service: its RUSAGE_CHILDREN peak is the service's.
    probe = (
        "import resource, subprocess, sys; "
        "r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.exit(r.returncode)"
    )
    cmd = [sys.executable, "-m", "service", "run", "--once", "--config", str(tree.config)]
    result = subprocess.run(
        [sys.executable, "-c", probe, *cmd], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-2000:]
    peak_mib = int(result.stdout.strip().splitlines()[-1]) / 1024
    assert tree.final_count() == files
    assert not any(tree.transfer.iterdir())
    print(f"backlog of {files} files: peak RSS {peak_mib:.1f} MiB")
    assert peak_mib < 150, f"peak RSS {peak_mib:.0f} MiB"
