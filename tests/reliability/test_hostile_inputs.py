"""Hostile inputs beyond tests/test_inputs.py: a regular file swapped for a symlink to a
secret in a tight loop, a file changed after its claim, and the same name delivered
twice while the first is still in flight."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time

import pytest

from reliability.support import SECRET, Outside, RelTree, python_route, report, wait_for

NAMES = 16


def _swap_loop(tree: RelTree, outside: Outside, iterations: int) -> None:
    """Round-robin over 16 names: each becomes a regular file, then a symlink to the secret.

    The service looks at a name (scan, readiness) and claims it at arbitrary moments, so
    every claim races a swap of that very name.
    """
    transfer = os.fsencode(tree.transfer)
    tmp_file, tmp_link = transfer + b"/.race.tmp", transfer + b"/.race-link.tmp"
    secret = os.fsencode(outside.sentinel)
    for i in range(iterations):
        target = transfer + b"/race-%02d.csv" % (i % NAMES)
        with open(tmp_file, "wb") as f:
            f.write(b"regular-%d\n" % i)
        os.rename(tmp_file, target)
        os.symlink(secret, tmp_link)
        os.rename(tmp_link, target)


def swap_race(tree: RelTree, outside: Outside, iterations: int) -> None:
    tree.configure(
        [python_route("quick", concurrency=4)],
        watch_mode="events",
        scan_interval_s=1,
        min_free_bytes=0,
    )
    service = tree.start()
    started = time.monotonic()
    _swap_loop(tree, outside, iterations)
    swap_s = time.monotonic() - started
    wait_for(
        lambda: not tree.transfer_files() and not tree.proc_entries() and _all_final(tree),
        timeout=60,
        interval=0.2,
        what="every entry to be claimed and to end",
    )
    assert service.stop() == 0
    rows = tree.rows()
    regular = [r for r in rows if r["state"] == "done"]
    links = [r for r in rows if r["state"] == "failed"]
    assert len(regular) + len(links) == len(rows)
    assert all(r["error_class"] in ("symlink", "not_regular_file") for r in links), {
        r["error_class"] for r in links
    }
    for job_id, folder in tree.archived().items():
        manifest = json.loads((folder / "manifest.json").read_bytes())
        data = gzip.decompress((folder / manifest["files"][0]["name"]).read_bytes())
        assert data.startswith(b"regular-"), (job_id, data[:40])
        assert hashlib.sha256(data).hexdigest() == manifest["sha256"]
    for row in links:
        assert (tree.failed()[row["id"]] / bytes(row["name"]).decode()).is_symlink()
    assert SECRET not in tree.everything_written()
    assert all(r.get("size") != len(SECRET) for r in tree.records())
    outside.check()  # the secret's atime did not move: never opened
    report(
        "symlink_swap_race",
        iterations=iterations,
        swap_s=round(swap_s, 1),
        claimed=len(rows),
        archived_regular=len(regular),
        set_aside_links=len(links),
        secret_leaked=False,
    )


def _all_final(tree: RelTree) -> bool:
    return all(r["state"] in ("done", "failed") for r in tree.rows())


def test_symlink_swapped_in_between_scan_and_open(rtree: RelTree, outside: Outside) -> None:
    swap_race(rtree, outside, 1_000)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_symlink_swapped_in_10k_times(rtree: RelTree, outside: Outside) -> None:
    swap_race(rtree, outside, 10_000)


# -- a file changed after its claim -----------------------------------------------------


@pytest.mark.parametrize("size", ["small", "over_1_mib"])  # checked in memory / streamed
@pytest.mark.parametrize("importer", ["append_during_import", "rewrite_in_place"])
def test_file_changed_after_its_claim_is_never_archived(
    rtree: RelTree, importer: str, size: str
) -> None:
    """Appended to (size and mtime change), or rewritten in place with size and mtime kept
    (only the hash tells): set aside as `modified_during_processing`, never archived."""
    rtree.configure([python_route(importer)], min_free_bytes=0)
    content = b"id,amount\n1,100\n"
    if size != "small":
        content += b"".join(b"%d,%d\n" % (i, i % 977) for i in range(2, 200_000))
        assert len(content) > 1 << 20
    rtree.drop("changing.csv", content)
    result = rtree.run_once()
    assert result.returncode == 1, result.stdout[-3000:]
    row = rtree.rows()[0]
    assert (row["state"], row["error_class"]) == ("failed", "modified_during_processing"), row
    assert row["sha256"] == hashlib.sha256(content).hexdigest()  # the hash of what was claimed
    assert not rtree.archived(), "a changed file was archived"
    folder = rtree.failed()[row["id"]]
    assert json.loads((folder / "error.json").read_text())["error_class"] == (
        "modified_during_processing"
    )
    assert (folder / "changing.csv").read_bytes() != content  # kept, as it is now
    leftovers = [str(p) for p in rtree.folder("archive").rglob("*") if ".tmp" in str(p)]
    assert not leftovers, f"left in archive/: {leftovers}"
    rtree.check_invariants({b"changing.csv": content})
    # The operator retries it (with an importer that leaves it alone): the file is
    # imported and archived as it is now.
    now = (folder / "changing.csv").read_bytes()
    rtree.configure([python_route("quick")], min_free_bytes=0)
    assert rtree.cli("retry", row["id"]).returncode == 0
    assert rtree.run_once().returncode == 0
    row = rtree.rows()[0]
    assert (row["state"], row["sha256"]) == ("done", hashlib.sha256(now).hexdigest()), row
    rtree.check_invariants({b"changing.csv": now})


# -- the same name twice -------------------------------------------------------------------


def test_same_name_again_while_the_first_is_in_flight(rtree: RelTree) -> None:
    rtree.configure([python_route("quick", concurrency=4)], min_free_bytes=0)
    service = rtree.start()
    first, second = b"SLEEP 1.5\nmonday\n", b"tuesday\n"
    rtree.drop("daily.csv", first)
    wait_for(lambda: rtree.records(), what="the first import to start")
    rtree.drop("daily.csv", second)  # same name, while the first is being imported
    rtree.drop("eu/daily.csv", second)  # and the same name in another folder
    wait_for(lambda: rtree.settled(3), timeout=30, what="three jobs to end")
    assert service.stop() == 0
    rows = rtree.rows()
    assert len(rows) == 3 and all(r["state"] == "done" for r in rows)
    by_sha = {r["sha256"] for r in rows}
    assert by_sha == {hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest()}
    contents = set()
    for folder in rtree.archived().values():
        manifest = json.loads((folder / "manifest.json").read_bytes())
        contents.add(gzip.decompress((folder / manifest["files"][0]["name"]).read_bytes()))
    assert contents == {first, second}
    assert len(rtree.archived()) == 3


def test_same_content_twice_with_skip_is_archived_as_a_duplicate(rtree: RelTree) -> None:
    rtree.configure([python_route("quick", duplicates="skip")], min_free_bytes=0)
    rtree.drop("report.csv", b"same bytes\n")
    assert rtree.run_once().returncode == 0
    rtree.drop("report.csv", b"same bytes\n")
    assert rtree.run_once().returncode == 0
    rows = rtree.rows()
    assert [r["outcome"] for r in rows] == ["imported", "duplicate"]
    assert rows[1]["duplicate_of"] == rows[0]["id"]
    assert len(rtree.archived()) == 2  # never a silent skip: the second is archived too
    assert len([r for r in rtree.records() if r["event"] == "run"]) == 1
    manifest = json.loads((rtree.archived()[rows[1]["id"]] / "manifest.json").read_bytes())
    assert manifest["outcome"] == "duplicate" and manifest["duplicate_of"] == rows[0]["id"]
