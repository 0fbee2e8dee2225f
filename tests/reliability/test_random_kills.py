"""SIGKILL the real service at random moments while files keep arriving; restart each time.

At the end every file is in exactly one of archive/ and failed/, each archive
decompresses to its source's sha256, there is one ledger row per file and no temp
leftover (tree.check_invariants), and the importer ran at least once per job.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from typing import Any

import pytest

from reliability.support import (
    RelTree,
    check_i4,
    imports_per_job,
    python_route,
    report,
    wait_for,
)


def _deliver(tree: RelTree, files: dict[bytes, bytes], rate: float, done: threading.Event) -> None:
    """Drop the files at about `rate` per second (temp name, then rename)."""
    started = time.monotonic()
    try:
        for i, (rel, content) in enumerate(files.items()):
            tree.drop(rel, content)
            ahead = i / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)  # pacing the load generator, not synchronisation
    finally:
        done.set()


def soak(tree: RelTree, *, n_files: int, kills: int, rate: float, seed: int) -> None:
    rng = random.Random(seed)
    tree.configure(
        [python_route("quick", concurrency=4, max_attempts=5)],
        scan_interval_s=2,
        min_free_bytes=0,
        shutdown_grace_s=5,
    )
    files = {}
    for i in range(n_files):
        rel = f"batch-{i % 16:02d}/file-{i:06d}.csv".encode()
        body = b"REJECT\n" if i % 97 == 13 else b"id,value\n"
        files[rel] = body + f"{i},{rng.random()}\n".encode() + os.urandom(rng.randint(0, 512))
    delivered = threading.Event()
    generator = threading.Thread(target=_deliver, args=(tree, files, rate, delivered))
    started = time.monotonic()
    generator.start()
    done_kills = 0
    try:
        while done_kills < kills:
            service = tree.start(wait_ready=False)
            time.sleep(rng.uniform(0.2, 2.5))  # a random moment: start-up, recovery, busy
            assert service.proc.poll() is None, f"the service died by itself:\n{service.log()}"
            service.proc.send_signal(signal.SIGKILL)
            assert service.proc.wait(timeout=30) == -signal.SIGKILL
            done_kills += 1
        service = tree.start()
        generator.join()
        wait_for(
            lambda: _all_ended(tree, files),
            timeout=max(120.0, n_files / 50),
            interval=0.5,
            what=f"all {n_files} files to end in archive/ or failed/",
        )
        assert service.stop(signal.SIGTERM) == 0
    finally:
        delivered.wait(timeout=n_files / rate + 60)
        generator.join()
    elapsed = time.monotonic() - started
    rows = tree.rows()
    ended = {bytes(r["relative_path"]) for r in rows if r["state"] in ("done", "failed")}
    rejected = {rel for rel, body in files.items() if body.startswith(b"REJECT")}
    figures = {
        "kills": done_kills,
        "files": n_files,
        "lost": len(set(files) - ended),
        "duplicates": len(rows) - len({bytes(r["relative_path"]) for r in rows}),
        "rejected": len(rejected),
        "elapsed_s": round(elapsed, 1),
        **_known_defects(tree, rows, rejected),
    }
    figures.update(_import_counts(tree))
    assert figures["phantom_rows"] == 0, "a claim that never happened left a failed row"
    assert figures["innocent_exhausted"] == 0, "files were charged for kills of the service"
    tree.check_invariants(files)
    for r in rows:
        want = "failed" if bytes(r["relative_path"]) in rejected else "done"
        assert r["state"] == want, (r["relative_path"], r["state"], r["error"], r["history"])
    figures.update(check_i4(tree, set(files)))
    report("random_kills", **figures)
    assert figures["lost"] == 0 and figures["duplicates"] == 0


def _all_ended(tree: RelTree, files: dict[bytes, bytes]) -> bool:
    """Every file has a final row, none is still in progress, transfer/ is empty."""
    rows = tree.rows()
    if any(r["state"] not in ("done", "failed") for r in rows) or tree.transfer_files():
        return False
    return {bytes(r["relative_path"]) for r in rows} >= set(files)


def _known_defects(
    tree: RelTree, rows: list[dict[str, Any]], rejected: set[bytes]
) -> dict[str, int]:
    """Signatures of the two defects the soak found (see docs/reliability.md)."""
    phantom = [
        r
        for r in rows
        if r["error"] == "recovery found no file for this job in proc/, archive/ or failed/"
        and (tree.folder("proc") / r["id"]).is_dir()
        and not os.listdir(tree.folder("proc") / r["id"])
    ]
    innocent = [
        r
        for r in rows
        if r["outcome"] == "exhausted"
        and bytes(r["relative_path"]) not in rejected
        and all(h.get("result") == "interrupted" for h in json.loads(r["history"]))
    ]
    return {"phantom_rows": len(phantom), "innocent_exhausted": len(innocent)}


def _import_counts(tree: RelTree) -> dict[str, int]:
    runs = imports_per_job(tree)
    return {"imports": sum(runs.values()), "re_imports": sum(n - 1 for n in runs.values())}


def test_random_sigkills_short(rtree: RelTree) -> None:
    soak(rtree, n_files=500, kills=5, rate=100, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_random_sigkills_soak(rtree: RelTree) -> None:
    soak(rtree, n_files=20_000, kills=60, rate=150, seed=2)
