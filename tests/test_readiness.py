"""Readiness per route (rename, stable, marker, checksum), stalled uploads, unrouted files,
and new subfolders, end to end with the real service."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

from conftest import FiledockTree, command_route, wait_for


def _names(tree: FiledockTree, state: str | None = None) -> set[str]:
    return {bytes(r["name"]).decode() for r in tree.rows() if state in (None, r["state"])}


def test_stable_waits_for_a_slow_in_place_writer(tree: FiledockTree) -> None:
    tree.configure([command_route(readiness="stable", settle_s=1.0)], scan_interval_s=0.5)
    service = tree.start()
    target = tree.transfer / "slow.csv"
    written: list[float] = []

    def writer() -> None:  # 1 byte every 100 ms for 3 s, in place
        with open(target, "wb") as f:
            for _ in range(30):
                f.write(b"x")
                f.flush()
                written.append(time.time())
                time.sleep(0.1)

    t = threading.Thread(target=writer)
    t.start()
    t.join()
    tree.wait_final(1, timeout=30)
    row = tree.rows()[0]
    assert row["size"] == 30  # never claimed early, never cut short
    assert row["created_at"] >= written[-1] + 1.0  # claimed after settle_s of quiet
    assert row["state"] == "done"
    service.stop()


def test_marker_before_and_after_its_file(tree: FiledockTree) -> None:
    route = command_route(match="*.csv", readiness="marker", stalled_after_s=60)
    tree.configure([route], scan_interval_s=0.5)
    service = tree.start()
    tree.drop("late-marker.csv", b"a\n")
    tree.drop("early-marker.csv.done", b"")
    tree.drop("lonely.csv.done", b"")
    os.utime(tree.transfer / "lonely.csv.done", (time.time() - 3600,) * 2)  # an hour alone
    # Once a scan has reported the lonely marker, it has looked at the other two as well.
    wait_for(lambda: "without its file" in service.log(), what="a scan past the drops")
    assert _names(tree) == set()  # nothing is claimed without its marker
    tree.drop("early-marker.csv", b"b\n")
    tree.drop("late-marker.csv.done", b"")
    tree.wait_final(2)
    assert _names(tree, "done") == {"late-marker.csv", "early-marker.csv"}
    for folder in tree.archived().values():
        manifest = json.loads((folder / "manifest.json").read_text())
        companions = [f["name"] for f in manifest["files"] if f["role"] == "companion"]
        assert companions == [manifest["name"] + ".done"]  # the marker is archived beside
    assert (tree.transfer / "lonely.csv.done").exists()  # a marker without a file is kept...
    assert service.log().count("without its file") == 1  # ...and reported once
    service.stop()


def test_checksum_sidecar_match_and_mismatch(tree: FiledockTree) -> None:
    tree.configure([command_route(match="*.bin", checksum_sidecar=True)])
    good, bad = b"good content\n", b"tampered\n"
    tree.drop("good.bin.sha256", f"{hashlib.sha256(good).hexdigest()}  good.bin\n".encode())
    tree.drop("good.bin", good)
    tree.drop("bad.bin.sha256", f"{hashlib.sha256(b'original').hexdigest()}  bad.bin\n".encode())
    tree.drop("bad.bin", bad)
    tree.drop("waits.bin", b"no sidecar yet")
    assert tree.run_once().returncode == 1
    rows = {bytes(r["name"]): r for r in tree.rows()}
    assert rows[b"good.bin"]["state"] == "done"
    assert rows[b"bad.bin"]["error_class"] == "checksum_mismatch"
    failed = tree.failed()[rows[b"bad.bin"]["id"]]
    assert sorted(p.name for p in failed.iterdir() if p.name != "out") == [
        "bad.bin",
        "bad.bin.sha256",
        "error.json",
    ]  # both sent to failed/
    assert b"waits.bin" not in rows and (tree.transfer / "waits.bin").exists()
    status = json.loads(tree.cli("status", "--json").stdout)
    assert status["waiting_in_transfer"] == [
        {"path": "waits.bin", "route": "main", "reason": "waiting for its .sha256 checksum file"}
    ]


def test_unrouted_files_stay_and_are_reported_once(tree: FiledockTree) -> None:
    tree.configure([command_route(match="orders/*.csv")], scan_interval_s=0.2)
    service = tree.start()
    tree.drop("misc/readme.txt", b"?")
    tree.drop("orders/a.csv", b"a")
    tree.wait_final(1)
    wait_for(lambda: service.metric("filedock_unrouted_files") == 1, what="the metric")
    scans = service.metric("filedock_scan_duration_seconds_count")
    assert scans is not None, "filedock_scan_duration_seconds_count not exported"
    wait_for(
        lambda: service.metric("filedock_scan_duration_seconds_count") >= scans + 3,
        what="three more scans",
    )
    assert service.log().count("matches no route") == 1  # reported once, not on every scan
    assert (tree.transfer / "misc" / "readme.txt").exists()
    service.stop()


def test_stalled_upload_is_reported(tree: FiledockTree) -> None:
    tree.configure([command_route(stalled_after_s=0.5)], scan_interval_s=0.2)
    service = tree.start()
    (tree.transfer / "upload.csv.part").write_bytes(b"half of it")
    wait_for(lambda: service.metric("filedock_stalled_uploads") == 1, what="the stall metric")
    assert "upload stalled" in service.log()
    service.stop()


def test_stalled_upload_under_its_final_name_is_reported(tree: FiledockTree) -> None:
    """A writer that keeps its file open and stops writing: never claimed, reported as a
    stalled upload; claimed as soon as it closes the file."""
    tree.configure([command_route(stalled_after_s=1.0)], scan_interval_s=0.5)
    service = tree.start()
    with open(tree.transfer / "upload.csv", "wb") as writer:
        writer.write(b"half of it")
        writer.flush()
        wait_for(lambda: service.metric("filedock_stalled_uploads") == 1, what="the stall metric")
        assert "upload stalled" in service.log()
        assert tree.rows() == []
        writer.write(b" and the rest\n")
    tree.wait_final(1)
    assert [(r["size"], r["state"]) for r in tree.rows()] == [(24, "done")]
    service.stop()


def test_files_inside_a_new_subfolder_are_found(tree: FiledockTree) -> None:
    tree.configure(scan_interval_s=60)  # only events and the new-folder scan can find them
    service = tree.start()
    staging = tree.base / "staging"
    (staging / "deep" / "er").mkdir(parents=True)
    for i in range(20):
        (staging / "deep" / "er" / f"f{i}.csv").write_bytes(b"%d" % i)
    (staging / "top.csv").write_bytes(b"top")
    staging.rename(tree.transfer / "batch")  # a whole folder appears at once
    tree.wait_final(21, timeout=20)
    assert all(r["state"] == "done" for r in tree.rows())
    assert (tree.transfer / "batch").is_dir()  # upstreams own their folders: left in place
    service.stop()
