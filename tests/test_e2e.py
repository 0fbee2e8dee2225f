"""End to end: the real service on a tmp_path tree, files dropped as upstreams do."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal

from conftest import FiledockTree, command_route, wait_for


def test_backlog_and_live_files_are_archived_with_a_manifest(tree: FiledockTree) -> None:
    tree.configure()
    dropped = {b"before-1.csv": b"a,b\n1,2\n", b"eu/2026/before-2.csv": b"x\n"}
    for rel, content in dropped.items():
        tree.drop(rel, content)
    service = tree.start()
    tree.wait_final(2)
    live = {
        b"live.csv": b"live\n",
        b"nested/deep/er/live-2.txt": b"z" * 5000,
        b"large.bin": os.urandom(3 << 20),  # over 1 MiB: compressed as a stream
    }
    for rel, content in live.items():
        tree.drop(rel, content)
    dropped |= live
    tree.wait_final(5)
    assert service.stop() == 0
    tree.check_invariants(dropped)

    jobs = {j["relative_path"]: j for j in tree.jobs()}
    job = jobs["eu/2026/before-2.csv"]
    assert job["state"] == "done" and job["outcome"] == "imported" and job["attempts"] == 1
    assert job["name"] == "before-2.csv" and job["size"] == 2
    assert job["sha256"] == hashlib.sha256(b"x\n").hexdigest()
    for field in ("id", "route", "error_class", "error", "created_at", "updated_at"):
        assert field in job
    folder = tree.archived()[job["id"]]
    assert str(folder) == job["archive_path"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["relative_path"] == "eu/2026/before-2.csv"
    assert manifest["attempts"][0]["result"] == "ok"
    roles = {f["role"] for f in manifest["files"]}
    assert roles == {"source", "output", "log"}
    assert (folder / "out" / "result.txt").read_text() == "2 bytes\n"
    assert b"imported 2 bytes" in (folder / "importer.log").read_bytes()
    assert gzip.decompress((folder / "before-2.csv.gz").read_bytes()) == b"x\n"

    lines = service.log_lines()
    archived = [line for line in lines if line["msg"] == "archived"]
    assert len(archived) == 5
    assert {"ts", "level", "job_id", "route", "name", "state", "elapsed_s"} <= set(archived[0])


# What each client writes before it renames (tests/test_uploaders.py runs the real ones).
CLIENT_TEMP_NAMES = [
    "a.tmp",
    "a.temp",
    ".a.csv.Xy12Ab",  # rsync
    ".in.a.csv.",  # lftp xfer:use-temp-file
    "a.csv.ef15d4d0.partial",  # rclone
    "a.csv.part",  # Firefox, sftp `put a.csv.part`
    "a.csv.filepart",  # WinSCP
    "a.csv.crdownload",  # Chrome
    "a.csv.download",  # Safari
    "a.csv.writing",  # Spring Integration
    "a.csv.inprogress",  # Camel
    "~$a.xlsx",  # Office
]


def test_temp_names_are_never_claimed(tree: FiledockTree) -> None:
    tree.configure()
    for name in CLIENT_TEMP_NAMES:
        (tree.transfer / name).write_bytes(b"partial")
    tree.drop("real.csv")
    assert tree.run_once().returncode == 0
    assert sorted(p.name for p in tree.transfer.iterdir()) == sorted(CLIENT_TEMP_NAMES)
    assert [r["name"] for r in tree.rows()] == [b"real.csv"]


def test_importer_outcomes(tree: FiledockTree) -> None:
    tree.configure([command_route(max_attempts=3)])
    files = {
        b"ok.csv": b"plain\n",
        b"retry-then-ok.csv": b"FAIL_FIRST 1\n",
        b"rejected.csv": b"EXIT 65\n",
        b"always-fails.csv": b"EXIT 3\n",
        b"crashes.csv": b"CRASH\n",
    }
    for rel, content in files.items():
        tree.drop(rel, content)
    result = tree.run_once()
    assert result.returncode == 1, result.stdout + result.stderr  # some failed
    rows = {bytes(r["name"]): r for r in tree.rows()}
    assert rows[b"ok.csv"]["state"] == "done" and rows[b"ok.csv"]["attempts"] == 1
    assert rows[b"retry-then-ok.csv"]["state"] == "done"
    assert rows[b"retry-then-ok.csv"]["attempts"] == 2
    assert rows[b"rejected.csv"]["outcome"] == "rejected"
    assert rows[b"rejected.csv"]["attempts"] == 1  # a rejection is not retried
    assert rows[b"always-fails.csv"]["outcome"] == "exhausted"
    assert rows[b"always-fails.csv"]["attempts"] == 3
    assert rows[b"crashes.csv"]["outcome"] == "exhausted"
    assert "SIGSEGV" in rows[b"crashes.csv"]["error"]
    tree.check_invariants(files)

    error = json.loads((tree.failed()[rows[b"rejected.csv"]["id"]] / "error.json").read_text())
    assert error["error_class"] == "rejected"
    assert error["how_to_retry"] == f"filedock retry {rows[b'rejected.csv']['id']}"
    assert "flag file" not in error["message"]
    assert error["attempts"][0]["result"] == "rejected"
    exhausted = json.loads(
        (tree.failed()[rows[b"always-fails.csv"]["id"]] / "error.json").read_text()
    )
    assert exhausted["error_class"] == "exhausted"
    assert [a["n"] for a in exhausted["attempts"]] == [1, 2, 3]
    assert "exit code 3" in exhausted["message"]


def test_timeout_kills_a_child_that_ignores_sigterm(tree: FiledockTree) -> None:
    route = command_route(max_attempts=1)
    route["importer"]["timeout_s"] = 1
    route["importer"]["kill_grace_s"] = 0.5
    tree.configure([route])
    tree.drop("hangs.csv", b"HANG\n")
    tree.drop("fine.csv", b"ok\n")
    result = tree.run_once(timeout=60)
    assert result.returncode == 1
    rows = {bytes(r["name"]): r for r in tree.rows()}
    assert rows[b"hangs.csv"]["state"] == "failed"
    assert "timeout" in rows[b"hangs.csv"]["error"]
    assert rows[b"fine.csv"]["state"] == "done"
    hung = [r for r in tree.records() if r["event"] == "start" and r["size"] == 5]
    assert hung, "the hanging importer never started"
    for r in hung:  # killed and reaped: no process left behind
        assert not os.path.exists(f"/proc/{r['pid']}"), f"importer pid {r['pid']} still exists"


def test_sigterm_lets_imports_in_flight_finish(tree: FiledockTree) -> None:
    tree.configure(shutdown_grace_s=20)
    service = tree.start()
    files = {f"slow-{i}.csv".encode(): b"SLEEP 1.5\n" for i in range(3)}
    for rel, content in files.items():
        tree.drop(rel, content)
    wait_for(
        lambda: len([r for r in tree.records() if r["event"] == "start"]) == 3,
        what="three imports in flight",
    )
    assert service.stop(signal.SIGTERM) == 0
    tree.check_invariants(files)
    assert "filedock stopped" in service.log()


def test_second_signal_forces_exit_and_recovery_finishes_the_job(tree: FiledockTree) -> None:
    tree.configure(shutdown_grace_s=60)
    service = tree.start()
    files = {b"very-slow.csv": b"SLEEP_FIRST 30\n"}
    tree.drop(b"very-slow.csv", files[b"very-slow.csv"])
    wait_for(lambda: any(r["event"] == "start" for r in tree.records()), what="import start")
    service.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "shutting down" in service.log(), what="the first signal to be logged")
    assert service.stop(signal.SIGTERM, timeout=15) == 0
    row = tree.rows()[0]
    assert row["state"] == "importing" and row["attempts"] == 1
    assert (tree.folder("proc") / row["id"]).is_dir()
    # The next start re-queues the interrupted import; its first attempt was counted.
    assert tree.run_once().returncode == 0
    row = tree.rows()[0]
    assert row["state"] == "done" and row["attempts"] == 2
    assert json.loads(row["history"])[0]["result"] == "interrupted"
    tree.check_invariants(files)


def test_same_name_twice_is_two_jobs(tree: FiledockTree) -> None:
    tree.configure()
    tree.drop("daily.csv", b"monday\n")
    assert tree.run_once().returncode == 0
    tree.drop("daily.csv", b"tuesday\n")
    assert tree.run_once().returncode == 0
    rows = tree.rows()
    assert [bytes(r["name"]) for r in rows] == [b"daily.csv", b"daily.csv"]
    assert rows[0]["sha256"] != rows[1]["sha256"]
    assert len(tree.archived()) == 2


def test_a_lane_of_slow_imports_leaves_what_it_cannot_start_soon_in_transfer(
    tree: FiledockTree,
) -> None:
    # One slow import at a time and claims of 4: the lane takes one claim batch; the
    # rest waits in transfer/, where another replica could claim it.
    tree.configure(
        routes=[command_route(concurrency=1)],
        batch_max_files=4,
        queue_size=4,
        shutdown_grace_s=1,
    )
    for i in range(12):
        tree.drop(f"slow-{i:02}.csv", b"SLEEP 20\n")
    service = tree.start()
    wait_for(lambda: any(r["event"] == "start" for r in tree.records()), what="the first import")
    # The scan queues the next files, up to queue_size; the claimer leaves them queued.
    wait_for(lambda: service.metric("filedock_queue_depth") == 4, what="4 files queued")
    assert len(list(tree.folder("proc").iterdir())) == 4
    assert len(list(tree.transfer.iterdir())) == 8
    started = [r for r in tree.records() if r["event"] == "start"]
    assert len(started) == 1
    # Stopping with a full lane: the import in flight is stopped, every file stays put.
    assert service.stop(signal.SIGTERM, timeout=30) == 0
    assert not os.path.exists(f"/proc/{started[0]['pid']}")
    assert len(list(tree.folder("proc").iterdir())) == 4
    assert len(list(tree.transfer.iterdir())) == 8
