"""The benchmark harness (issue 8): its `--quick` smoke runs every scenario against a
real filedock, and its check of filedock's archives catches what it must.

The figures of a smoke run are not judged here (two cores shared with the rest of the
suite): performance is measured by `make bench` and recorded in docs/benchmarks.md.
What is judged is that the harness still works end to end, that filedock lost nothing
in it, and that every target of the issue got a measurement.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from fdbench.common import file_names, make_files, rename_all  # noqa: E402
from fdbench.contenders import Filedock, verify_filedock  # noqa: E402

QUICK_FILES = {"burst": 500, "big": 2_000}  # the --quick sizes


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, dict[str, Any]]:
    require_tool("inotifywait")
    base = tmp_path_factory.mktemp("bench")
    results = base / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run.py"),
            "--quick",
            "--no-settle",  # a smoke run beside the suite: leave the machine's caches be
            "--workdir",
            str(base / "work"),
            "--results",
            str(results),
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    files = sorted(results.glob("*-quick.json"))
    assert len(files) == 1, f"no results file; stderr:\n{proc.stderr[-3000:]}"
    return proc.returncode, proc.stdout, json.loads(files[0].read_text())


def test_quick_bench_measures_every_scenario_and_filedock_loses_nothing(
    quick_run: tuple[int, str, dict[str, Any]],
) -> None:
    code, stdout, results = quick_run
    assert code == 0, stdout[-3000:]
    assert results["lost_files"] == 0
    scenarios = results["scenarios"]
    assert set(scenarios) == {"burst", "sustained", "big", "backlog", "idle"}
    assert not [name for name, r in scenarios.items() if "error" in r]

    burst = scenarios["burst"]["runs"]
    assert set(burst) == {"floor", "layout", "work", "peer", "filedock"}
    for who, runs in burst.items():
        (run,) = runs
        assert run["files"] == QUICK_FILES["burst"], who
        assert run["files_per_s"] > 0, who
    (fd_run,) = burst["filedock"]
    assert fd_run["verify"]["ok"], fd_run["verify"]
    assert fd_run["verify"]["leftover"] == {"transfer": 0, "proc": 0, "failed": 0}

    (big_run,) = scenarios["big"]["runs"]
    assert big_run["verify"]["verified"] == QUICK_FILES["big"]
    assert big_run["verify"]["ok"], big_run["verify"]
    assert big_run["peak_pss_mib"] > 0


def test_quick_bench_reports_a_measurement_for_each_target_of_the_issue(
    quick_run: tuple[int, str, dict[str, Any]],
) -> None:
    _, stdout, results = quick_run
    targets = {t["target"]: t for r in results["scenarios"].values() for t in r.get("targets", [])}
    wanted = [
        "burst ≥ 0.8 x floor",
        "burst ≥ 6 x peer",
        "sustained p50 rename→archived ≤ 30 ms",
        "sustained p99 rename→archived ≤ 120 ms",
        "zero lost",
        "peak memory ≤ 80 MB",
        "first import ≤ 2 s",
        "peak memory ≤ 150 MB",
        "idle (empty) CPU ≤ 0.5 %",
    ]
    for want in wanted:
        matching = [t for name, t in targets.items() if name.endswith(want)]
        assert matching, f"no target {want!r} in {sorted(targets)}"
        for t in matching:
            assert t["measured"] is not None and t["pass"] is not None, t
            assert f"| {t['target']} |" in stdout  # the table says it too
    assert "(--no-settle: the file system was not settled between runs)" in stdout


def test_the_archive_check_catches_a_lost_file_and_a_damaged_archive(tmp_path: Path) -> None:
    """What makes the harness exit 1: a source with no `done` job, or an archive whose
    bytes are not the source's."""
    staging = tmp_path / "staging"
    names = file_names(3)
    sources = make_files(staging, names, 1024)
    fd = Filedock(tmp_path / "fd", service_dir=REPO, python=sys.executable)
    fd.start()
    try:
        fd.wait_ready()
        rename_all(staging, fd.transfer, names)
        fd.wait_done(len(names), timeout=60)
    finally:
        fd.stop()
    rows = fd.rows()

    verdict = verify_filedock(fd, sources, rows)
    assert verdict["ok"] and verdict["verified"] == 3, verdict

    never_dropped = {**sources, "f9999999.dat": "0" * 64}
    verdict = verify_filedock(fd, never_dropped, rows)
    assert not verdict["ok"]
    assert (verdict["lost"], verdict["examples"]) == (1, ["f9999999.dat"])

    damaged = next(r for r in rows if r["name"] == names[1])
    with gzip.open(Path(damaged["archive_path"]) / f"{names[1]}.gz", "wb") as gz:
        gz.write(b"not what was dropped\n")
    verdict = verify_filedock(fd, sources, rows)
    assert not verdict["ok"]
    assert (verdict["bad_archive"], verdict["examples"]) == (1, [names[1]])
