"""Importer faults: a hung importer that ignores SIGTERM, a poison file, and an importer
that kills the service itself. Each ends in archive/ or failed/, never in a loop, and
never holds the other files back."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from conftest import command_route

from reliability.support import RelTree, check_i4, python_route, report, wait_for

HANG_IMPORTER = Path(__file__).with_name("hang_importer.py")


def _state(pid: int) -> str | None:
    """The process state letter (R, S, Z...), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_hung_importer_ignoring_sigterm_is_killed_reaped_and_retried(rtree: RelTree) -> None:
    route = command_route("hangs", max_attempts=3, backoff_s=0.5, max_backoff_s=0.5)
    route["importer"].update(
        argv=[sys.executable, str(HANG_IMPORTER), "{out_dir}", "--", "{path}"],
        timeout_s=1,
        kill_grace_s=0.5,
    )
    rtree.configure([command_route("others", match="others/*"), route])
    service = rtree.start()
    rtree.drop("hangs.csv", b"hang on the first attempt\n")
    wait_for(lambda: rtree.records(), what="the hanging importer to start")
    others = {f"others/o-{i}.csv".encode(): f"{i}\n".encode() for i in range(5)}
    for rel, content in others.items():
        rtree.drop(rel, content)
    wait_for(lambda: rtree.settled(6), timeout=30, what="the hung job to be retried, and others")
    assert service.stop() == 0
    rows = {bytes(r["relative_path"]): r for r in rtree.rows()}
    hung = rows[b"hangs.csv"]
    assert (hung["state"], hung["attempts"]) == ("done", 2), hung
    history = json.loads(hung["history"])
    assert history[0]["result"] == "timeout" and history[1]["result"] == "ok"
    first = next(r for r in rtree.records() if r.get("attempt") == 1)
    assert _state(first["pid"]) is None, "the hung importer was not reaped (zombie or alive)"
    assert _state(first["child"]) in (None, "Z"), "its child ignoring SIGTERM survived"
    done_at = {rel: rows[rel]["updated_at"] for rel in others}
    assert max(done_at.values()) < hung["updated_at"], "the hung job held the others back"
    rtree.check_invariants({b"hangs.csv": b"hang on the first attempt\n", **others})
    report(
        "hung_importer",
        attempts=hung["attempts"],
        killed_after_s=1.5,
        zombie=False,
        others_done_while_hung=len(others),
    )


def test_poison_file_ends_in_failed_without_blocking_others(rtree: RelTree) -> None:
    rtree.configure([command_route(concurrency=1, max_attempts=3, backoff_s=1, max_backoff_s=1)])
    service = rtree.start()
    rtree.drop("poison.csv", b"EXIT 3\n")
    wait_for(lambda: rtree.records(), what="the poison file's first import")
    good = {f"good-{i}.csv".encode(): f"{i}\n".encode() for i in range(10)}
    for rel, content in good.items():
        rtree.drop(rel, content)
    wait_for(lambda: rtree.settled(11), timeout=60, what="every file to end")
    assert service.stop() == 0
    rows = {bytes(r["relative_path"]): r for r in rtree.rows()}
    poison = rows[b"poison.csv"]
    assert (poison["state"], poison["outcome"], poison["attempts"]) == ("failed", "exhausted", 3)
    assert all(rows[rel]["state"] == "done" for rel in good)
    # concurrency 1: the good files ran in the poison file's backoff, not after it
    assert max(rows[rel]["updated_at"] for rel in good) < poison["updated_at"]
    error = json.loads((rtree.failed()[poison["id"]] / "error.json").read_text())
    assert [a["result"] for a in error["attempts"]] == ["import_error"] * 3
    rtree.check_invariants({b"poison.csv": b"EXIT 3\n", **good})
    report("poison_file", attempts=3, good_files_done_before_poison_failed=len(good))


def _kill_loop(tree: RelTree, max_runs: int) -> tuple[int, object]:
    kills = 0
    for _ in range(max_runs):
        result = tree.run_once(timeout=60)
        if result.returncode != -9:
            return kills, result
        kills += 1
    raise AssertionError(f"still killing the service after {max_runs} runs: a crash loop")


def test_importer_that_kills_the_service_ends_in_failed(rtree: RelTree) -> None:
    rtree.configure([python_route("kill_service", concurrency=1, max_attempts=3)])
    rtree.drop("kills-the-service.csv", b"KILL\n")
    started = time.monotonic()
    kills, result = _kill_loop(rtree, 10)
    assert kills == 3, f"{kills} kills for max_attempts=3"
    assert result.returncode == 1  # type: ignore[attr-defined]
    row = rtree.rows()[0]
    assert (row["state"], row["outcome"], row["attempts"]) == ("failed", "exhausted", 3)
    assert [h["result"] for h in json.loads(row["history"])] == ["interrupted"] * 3
    rtree.check_invariants({b"kills-the-service.csv": b"KILL\n"})
    report(
        "importer_kills_service",
        kills=kills,
        attempts=3,
        elapsed_s=round(time.monotonic() - started, 1),
    )


def test_files_in_flight_with_a_service_killer_do_not_pay_for_it(rtree: RelTree) -> None:
    """Innocent files imported alongside the killer file still end done."""
    rtree.configure([python_route("kill_service", concurrency=4, max_attempts=3)])
    rtree.drop("kills-the-service.csv", b"KILL\n")
    good = {f"good-{i:02d}.csv".encode(): b"SLEEP 1\n" for i in range(3)}
    for rel, content in good.items():
        rtree.drop(rel, content)
    kills, _ = _kill_loop(rtree, 10)
    rows = {bytes(r["relative_path"]): r for r in rtree.rows()}
    exhausted = sorted(rel for rel in good if rows[rel]["state"] != "done")
    report(
        "killer_with_innocents", kills=kills, innocent=len(good), innocent_exhausted=len(exhausted)
    )
    assert not exhausted, f"good files failed for the killer's crashes: {exhausted}"
    check_i4(rtree, set(good))
    rtree.check_invariants({b"kills-the-service.csv": b"KILL\n", **good})


def test_a_hung_python_import_among_quick_ones_is_charged_alone(rtree: RelTree) -> None:
    """A sync python importer's quick imports share a worker thread's call; one that
    hangs there times out alone. The others end done, each imported once: the abandoned
    thread starts none of them again when it wakes."""
    route = python_route("quick", concurrency=1, max_attempts=2)
    route["importer"]["timeout_s"] = 1
    rtree.configure([route])
    quick = {f"q-{i:02d}.csv".encode(): f"{i}\n".encode() for i in range(40)}
    dropped = {**quick, b"q-20-hangs.csv": b"SLEEP 3\n"}
    for rel, content in dropped.items():
        rtree.drop(rel, content)
    service = rtree.start()
    wait_for(lambda: rtree.settled(len(dropped)), timeout=60, what="every file to end")
    # The hung attempt's thread wakes 3 s after it started: give it its chance to misbehave.
    wait_for(
        lambda: sum(r["event"] == "end" for r in rtree.records()) >= len(quick) + 2,
        timeout=30,
        what="both hung attempts to return",
    )
    assert service.stop() == 0
    rows = {bytes(r["relative_path"]): r for r in rtree.rows()}
    hung = rows[b"q-20-hangs.csv"]
    assert (hung["state"], hung["outcome"]) == ("failed", "exhausted")
    assert [h["result"] for h in json.loads(hung["history"])] == ["timeout", "timeout"]
    assert all((rows[rel]["state"], rows[rel]["attempts"]) == ("done", 1) for rel in quick)
    runs = Counter(r["job_id"] for r in rtree.records() if r["event"] == "run")
    assert all(runs[rows[rel]["id"]] == 1 for rel in quick), runs
    rtree.check_invariants(dropped)
    report("hung_python_import", quick_files=len(quick), quick_reimported=0)
